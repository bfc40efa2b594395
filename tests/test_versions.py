"""Installs that respect the accelerator's jax: floors without caps, a warning past the tested
releases, and `pip install -e .` over an environment holding the tested jax changing no jax
package (what a notebook's first cell does on a Colab TPU runtime)."""

import importlib.metadata
import json
import os
import subprocess
import sys
import warnings

import pytest
from packaging.requirements import Requirement

from conftest import REPO
from gptjax import versions

JAX_FAMILY = {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "libtpu",
              "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt"}


def _normal(name):
  return name.lower().replace("_", "-")


def _dry_run_report(*targets):
  """pip's resolver report for installing `targets` into this interpreter's environment.

  --dry-run changes nothing; --no-index keeps pip off every index (only wheels already on disk
  and the installed packages can satisfy a requirement), and --no-build-isolation builds the
  editable project's metadata with the setuptools already installed, so nothing is downloaded.
  """
  cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
         "--quiet", "--report", "-", *targets]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout)


def test_installing_the_package_over_the_tested_jax_changes_no_jax_package():
  # The environment holds the tested releases, as a Colab runtime holds its own jax. A fresh
  # install after a new release holds that one instead (there is no cap), and the premise fails.
  other = {name: importlib.metadata.version(name) for name in versions.TESTED
           if importlib.metadata.version(name) != versions.TESTED[name]}
  if other:
    pytest.skip(f"this environment holds {other}, not the tested {versions.TESTED}")
  report = _dry_run_report("-e", ".")
  to_install = {_normal(item["metadata"]["name"]): item["metadata"]["version"]
                for item in report["install"]}
  # pip would install the project itself and nothing of the jax stack.
  assert "gptjax" in to_install
  assert not JAX_FAMILY & set(to_install), to_install
  # Read from the same report: the project's own requirements have floors and no caps there.
  gptjax_item = next(i for i in report["install"] if _normal(i["metadata"]["name"]) == "gptjax")
  requires = [Requirement(r) for r in gptjax_item["metadata"]["requires_dist"]]
  plain = {_normal(r.name): r for r in requires if r.marker is None}
  for name, floor in versions.FLOORS.items():
    specs = {(s.operator, s.version) for s in plain[name].specifier}
    assert specs == {(">=", floor)}, (name, specs)
  extras = {str(r.marker): r for r in requires if r.marker is not None and r.name == "jax"}
  assert set(extras["extra == \"tpu\""].extras) == {"tpu"}
  assert set(extras["extra == \"cuda\""].extras) == {"cuda12"}


def test_importing_gptjax_is_silent_on_the_tested_versions():
  code = "import warnings; warnings.simplefilter('error'); import gptjax"
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stderr == ""


def test_a_newer_release_warns_once_and_names_the_tested_one(monkeypatch):
  newer = dict(versions.TESTED, jax="0.11.0", optax="0.2.8")
  assert versions.newer_than_tested(newer) == [("jax", "0.11.0", "0.10.2")]
  # Older, equal and unparseable versions are not "newer".
  assert versions.newer_than_tested({"jax": "0.10.0", "flax": "0.12.8", "optax": "x.y"}) == []
  monkeypatch.setattr(versions, "_warned", False)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    versions.warn_if_untested(newer)
    versions.warn_if_untested(newer)
  messages = [str(w.message) for w in caught]
  assert len(messages) == 1
  assert "jax 0.11.0 is newer" in messages[0] and "(jax 0.10.2)" in messages[0]
