"""The stage layer's import rules, read from the source: a stage runner imports only library
code, never a sibling runner, and library code never imports a runner (DESIGN.md, "objectives,
not stages"). Runners are the modules of gptjax/stages/ other than its shared `common` and the
`run_stage` dispatcher in its __init__ (which imports runners by name, at run time)."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "gptjax")
STAGES = os.path.join(PKG, "stages")
RUNNERS = sorted(f[:-3] for f in os.listdir(STAGES)
                 if f.endswith(".py") and f not in ("__init__.py", "common.py"))


def imported_modules(path: str) -> set[str]:
  """Every module an import statement in `path` names (`from a import b` gives a and a.b)."""
  tree = ast.parse(open(path).read(), filename=path)
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


def runners_imported(path: str) -> set[str]:
  return {m.split(".")[2] for m in imported_modules(path)
          if m.startswith("gptjax.stages.") and m.split(".")[2] in RUNNERS}


def library_files():
  for root, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py") and os.path.dirname(os.path.join(root, f)) != STAGES:
        yield os.path.join(root, f)
  yield os.path.join(STAGES, "common.py")


def test_there_are_runners_to_check():
  assert {"pretrain", "sft", "reward", "rl", "dpo"} <= set(RUNNERS)


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_stage_runner_imports_no_sibling_runner(runner):
  found = runners_imported(os.path.join(STAGES, runner + ".py")) - {runner}
  assert not found, f"gptjax/stages/{runner}.py imports the runner(s) {sorted(found)}"


def test_library_code_imports_no_stage_runner():
  bad = {os.path.relpath(p, REPO): sorted(runners_imported(p)) for p in library_files()}
  bad = {k: v for k, v in bad.items() if v}
  assert not bad, f"library modules import stage runners: {bad}"


def test_the_checker_sees_a_sibling_import(tmp_path):
  """The rule can fail: a file with a sibling import is caught, in both spellings."""
  p = tmp_path / "x.py"
  p.write_text("from gptjax.stages import rl as rl_stage\nimport gptjax.stages.sft\n")
  assert runners_imported(str(p)) == {"rl", "sft"}
