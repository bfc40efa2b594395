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


def objective_name_comparisons(path: str, names: set[str]) -> list[str]:
  """`x == 'ppo'`, `x != 'grpo'`, `x in ('ppo', 'grpo')`: code that branches on an objective's
  name (line numbers)."""
  tree = ast.parse(open(path).read(), filename=path)
  found = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Compare):
      continue
    for op, right in zip(node.ops, node.comparators):
      consts = [right] if isinstance(right, ast.Constant) else \
          list(right.elts) if isinstance(right, (ast.Tuple, ast.List, ast.Set)) else []
      left = node.left if isinstance(node.left, ast.Constant) else None
      values = {c.value for c in consts + ([left] if left else [])
                if isinstance(c, ast.Constant) and isinstance(c.value, str)}
      if values & names and isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)):
        found.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
  return found


def test_no_code_outside_the_registry_branches_on_a_policy_objective_name():
  """The rollouts, the runners, the pipeline, the comparison and the report read Objective
  fields; only gptjax/objectives/ (and the stage-name module, for the report's order) name them."""
  from gptjax import objectives
  names = {o.name for o in objectives.registered() if o.runner in ("rl", "preference")}
  allowed = (os.path.join(PKG, "objectives"), os.path.join(PKG, "stage_names.py"))
  # Not an objective: a pipeline run's stage directory, suggested in a help message.
  directory_names = {"gptjax/checkpoint.py"}
  found = [hit for p in list(library_files()) + [os.path.join(STAGES, r + ".py") for r in RUNNERS]
           if not p.startswith(allowed) for hit in objective_name_comparisons(p, names)
           if hit.split(":")[0] not in directory_names]
  assert not found, f"branches on an objective's name: {found}"
