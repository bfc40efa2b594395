"""Every Colab notebook executes headlessly on CPU with the micro preset, so they cannot rot."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(REPO, "colab")) if f.endswith(".ipynb"))


def test_notebooks_are_generated_from_the_script():
  assert NOTEBOOKS == ["01_pretrain.ipynb", "02_sft.ipynb", "03_reward_model.ipynb",
                       "04_rlhf.ipynb", "05_using_the_model.ipynb", "06_reasoning.ipynb"]


# Notebooks on the arithmetic recipe's models (05 uses them: its tool model, ORM and task).
REASONING_NOTEBOOKS = ("05_using_the_model.ipynb", "06_reasoning.ipynb")


def _run_group(name):
  # The session run a notebook reads; under xdist its notebooks share that run's worker.
  return "micro_reasoning" if name in REASONING_NOTEBOOKS else "micro_pipeline"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group(_run_group(n)))
                                  for n in NOTEBOOKS])
def test_notebook_executes(name, request, monkeypatch):
  # The notebooks share the session's micro pipeline run, so they exercise their own cells
  # (plots, sampling, scoring) without training every stage again.
  monkeypatch.setenv("GPTJAX_NOTEBOOK_SMOKE", "1")
  if _run_group(name) == "micro_reasoning":
    # The arithmetic recipe, run once per session and shared with tests/test_reasoning.py.
    monkeypatch.setenv("GPTJAX_REASONING_RUN_DIR", request.getfixturevalue("micro_reasoning"))
  else:
    monkeypatch.setenv("GPTJAX_RUN_DIR", request.getfixturevalue("micro_pipeline"))
  monkeypatch.setenv("GPTJAX_REPO", REPO)
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(os.path.join(REPO, "colab", name), as_version=4)
  client = NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": os.path.join(REPO, "colab")}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors


def _install_cell():
  nb = nbformat.read(os.path.join(REPO, "colab", "01_pretrain.ipynb"), as_version=4)
  return nb.cells[1].source


@pytest.mark.parametrize("where", ["inside the checkout", "in Colab"])
def test_install_cell_installs_from_the_checkout_or_clones_repo_url(where, tmp_path):
  """The first cell, run as a fresh runtime would run it (GPTJAX_REINSTALL=1 stands for gptjax
  not being installed), with pip in dry-run mode and offline, so nothing is installed or
  downloaded. Inside a checkout it installs that checkout; elsewhere it clones REPO_URL (here
  set to this checkout, which git clones without a network) and installs the clone; on a TPU
  runtime without libtpu it asks for the `tpu` extra (jax[tpu])."""
  import importlib.util
  import subprocess
  import sys
  from conftest import child_env
  source = _install_cell()
  url_line = next(line for line in source.splitlines() if line.startswith("REPO_URL = "))
  cwd = os.path.join(REPO, "colab") if where == "inside the checkout" else str(tmp_path)
  script = source.replace(url_line, f"REPO_URL = {REPO!r}") + "\nprint('REPO=' + REPO)"
  env = child_env(GPTJAX_REINSTALL=1, PIP_DRY_RUN=1, PIP_NO_INDEX=1, PIP_NO_DEPS=1,
                  PIP_NO_BUILD_ISOLATION=0, TPU_ACCELERATOR_TYPE="v5litepod-8")
  env.pop("GPTJAX_REPO", None)
  env.pop("COLAB_TPU_ADDR", None)
  proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  expected = REPO if where == "inside the checkout" else str(tmp_path / "gptjax")
  assert f"REPO={expected}\n" in proc.stdout
  extra = "[tpu]" if importlib.util.find_spec("libtpu") is None else ""
  assert f"installing: pip install -q -e {expected}{extra}\n" in proc.stdout, proc.stdout
  if where == "in Colab":
    assert os.path.exists(tmp_path / "gptjax" / "setup.py")
