"""Every Colab notebook executes headlessly on CPU with the micro preset, so they cannot rot."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(REPO, "colab")) if f.endswith(".ipynb"))


def test_notebooks_are_generated_from_the_script():
  assert NOTEBOOKS == ["01_pretrain.ipynb", "02_sft.ipynb", "03_reward_model.ipynb",
                       "04_rlhf.ipynb", "05_using_the_model.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, micro_pipeline, monkeypatch):
  # The notebooks share the session's micro pipeline run, so they exercise their own cells
  # (plots, sampling, scoring) without training every stage again.
  monkeypatch.setenv("GPTJAX_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("GPTJAX_RUN_DIR", micro_pipeline)
  monkeypatch.setenv("GPTJAX_REPO", REPO)
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(os.path.join(REPO, "colab", name), as_version=4)
  client = NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": os.path.join(REPO, "colab")}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
