"""Shared test setup: a persistent XLA compilation cache, and running helper scripts as children.

Most of a tiny model's test time on CPU is XLA compilation, and many tests (and their child
processes) compile the very same programs. One compilation cache per pytest session, shared with
every child and every xdist worker through the environment, turns those repeats into disk reads. A
cache hit returns the executable XLA would have built, so no result depends on it; a fresh session
starts it empty.

The suite runs in two xdist workers (pytest.ini): compilation and the Python around it use one
core each, so two workers on CI's two cores take about half the time. The tests that read one
session-wide run (the micro pipeline, the micro reasoning pipeline, the micro pretraining run) are
kept on one worker each (the scheduler below), so no run is built twice; the controller checks
that at the end of every session and fails it otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

# One scratch directory per session. The controller makes it before it starts the workers, which
# inherit its environment; only the process that made it removes it. It holds the XLA cache, each
# worker's test groups and the log of session-wide runs built (see below).
_OWN_SESSION_DIR = "GPTJAX_TEST_SESSION_DIR" not in os.environ
if _OWN_SESSION_DIR:
  os.environ["GPTJAX_TEST_SESSION_DIR"] = tempfile.mkdtemp(prefix="gptjax-test-session-")
_SESSION_DIR = os.environ["GPTJAX_TEST_SESSION_DIR"]
_CACHE_DIR = os.path.join(_SESSION_DIR, "xla-cache")
_GROUPS_DIR = os.path.join(_SESSION_DIR, "xdist-groups")
_BUILDS_LOG = os.path.join(_SESSION_DIR, "session-runs-built.log")
# Set before jax is imported anywhere, so this process and every child read the same settings.
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# The suite's programs are micro models, so most of its time is XLA compiling them, and most of
# that is LLVM optimising machine code that then runs for milliseconds. Tests compile with LLVM's
# optimisation off (the same HLO, the same XLA passes; 25-35% less wall time measured on
# test_sft + test_step). Float results can differ from an optimised build in the last bits, so
# every comparison in the suite is between programs compiled alike, or carries a tolerance.
# GPTJAX_TEST_XLA_OPT=1 keeps XLA's default, to run the suite as users' code compiles.
if (os.environ.get("GPTJAX_TEST_XLA_OPT", "0") != "1"
    and "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

# The same malloc settings as the `gptjax` command (gptjax/perf.py), before any test starts JAX.
from gptjax import perf  # noqa: E402

perf.retain_host_memory()

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = os.path.join(REPO, "tests", "helpers")
# The helper modules (e.g. tiny_training) are shared by the tests and the child scripts.
sys.path.insert(0, HELPERS)
MICRO = os.path.join(REPO, "experiments", "shakespeare_char.py") + ":micro"


# Session fixtures that build a whole run: every test that uses one goes to the same worker.
_SHARED_RUNS = ("micro_pipeline", "micro_reasoning", "micro_run")

# Keeping a group of tests on one worker. pytest-xdist's own `--dist loadgroup` reads the
# `xdist_group` marks in each worker and passes the group to the controller by appending
# "@group" to the test's node id. Neither half works here: xdist's hook runs before a conftest's
# (it registers after the initial conftests, and pluggy calls the last registered first), so marks
# added in this file's hook were never seen; and on pytest 9.2 the id xdist 3.8 rewrites
# (`item._nodeid`) is no longer the one pytest reports (`item._id`), so no mark is seen at all
# (pytest-dev/pytest-xdist#1386). Each group's tests were spread over both workers, and both
# built the micro pipeline. Instead each worker writes the groups it collected to a file, and the
# controller's scheduler (xdist's scope scheduler, whose scope is the group) reads them: workers
# write before they report their collection, and the controller schedules only once every
# worker has reported.


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  """Marks the users of a session-wide run with its group, then (in an xdist worker) writes every
  grouped test's group. Last, so the marks of every other hook are in."""
  for item in items:
    for name in _SHARED_RUNS:
      if name in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.xdist_group(name))
        break
  worker = os.environ.get("PYTEST_XDIST_WORKER")
  if not worker:
    return
  groups = {}
  for item in items:
    names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                    for m in item.iter_markers("xdist_group")})
    if names:
      groups[item.nodeid] = "_".join(names)
  os.makedirs(_GROUPS_DIR, exist_ok=True)
  path = os.path.join(_GROUPS_DIR, f"{worker}.json")
  with open(path + ".tmp", "w") as f:
    json.dump(groups, f)
  os.replace(path + ".tmp", path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """`--dist loadgroup` with the groups the workers wrote (other --dist modes: xdist's own)."""
  if config.getvalue("dist") != "loadgroup":
    return None
  from xdist.scheduler import LoadScopeScheduling

  class GroupScheduling(LoadScopeScheduling):
    """A work unit is a group's tests, or one ungrouped test (as in xdist's loadgroup); units go
    out largest first, so the longest group starts at once."""
    groups = None

    def _split_scope(self, nodeid):
      if self.groups is None:
        self.groups = {}
        for name in sorted(os.listdir(_GROUPS_DIR)) if os.path.isdir(_GROUPS_DIR) else ():
          if name.endswith(".json"):
            with open(os.path.join(_GROUPS_DIR, name)) as f:
              self.groups.update(json.load(f))
      group = self.groups.get(nodeid)
      return nodeid if group is None else "group:" + group

  return GroupScheduling(config, log)


def _record_build(name: str):
  """Logs that this process builds the session-wide run `name` (checked at the session's end)."""
  with open(_BUILDS_LOG, "a") as f:
    f.write(f"{name} {os.environ.get('PYTEST_XDIST_WORKER', 'main')}\n")


def _builds() -> dict[str, list[str]]:
  """Each session-wide run built in this session: the processes that built it."""
  out: dict[str, list[str]] = {}
  if os.path.exists(_BUILDS_LOG):
    with open(_BUILDS_LOG) as f:
      for line in f:
        name, builder = line.split()
        out.setdefault(name, []).append(builder)
  return out


_BUILT: dict[str, list[str]] = {}


def pytest_sessionfinish(session, exitstatus):
  if not _OWN_SESSION_DIR:
    return
  _BUILT.update(_builds())
  shutil.rmtree(_SESSION_DIR, ignore_errors=True)
  # A run built by two workers costs CI its whole build time again: the session fails.
  if any(len(who) > 1 for who in _BUILT.values()):
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  """One line naming who built each session-wide run (after pytest_sessionfinish above)."""
  if not _BUILT:
    return
  twice = any(len(who) > 1 for who in _BUILT.values())
  terminalreporter.write_line(
      ("FAILED: a session-wide run was built more than once; " if twice else "") +
      "session-wide runs built: " + "; ".join(f"{name} by {', '.join(who)}"
                                              for name, who in sorted(_BUILT.items())),
      red=twice)


def child_env(num_devices: int | None = None, **extra) -> dict:
  """The environment for a child Python: this checkout importable, and optionally N fake CPUs."""
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if num_devices:
    flags.append(f"--xla_force_host_platform_device_count={num_devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def run_helper(script: str, *args, num_devices: int | None = None, timeout: float = 300,
               env_extra: dict | None = None) -> subprocess.CompletedProcess:
  """Runs tests/helpers/<script> in a child; fails the test with its output if it fails."""
  cmd = [sys.executable, os.path.join(HELPERS, script), *map(str, args)]
  proc = subprocess.run(cmd, env=child_env(num_devices, **(env_extra or {})), cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    pytest.fail(f"{script} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                f"\n--- stderr\n{proc.stderr[-4000:]}")
  return proc


_PLAYS = []


def _cache_plays(monkeypatch):
  from gptjax.data import shakespeare
  real = shakespeare.load_plays

  def load_plays():
    if not _PLAYS:
      _PLAYS.extend(real())
    return list(_PLAYS)
  monkeypatch.setattr(shakespeare, "load_plays", load_plays)


@pytest.fixture
def cached_corpus(monkeypatch):
  """The real Shakespeare plays, parsed once per session instead of several times per run
  (parsing costs seconds; the tests that use this exercise the trainer, not the parser)."""
  _cache_plays(monkeypatch)


def run_micro(workdir: str, *overrides: str, progress: bool = False):
  """The micro preset's pretraining stage, in this process."""
  from gptjax import config as config_lib
  from gptjax.stages import pretrain
  return pretrain.run(config_lib.load(MICRO, list(overrides)), workdir, progress=progress)


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
  """One micro pretraining run (20 steps, evals and checkpoints at 10 and 20), shared by the
  tests that only read what a finished run leaves behind."""
  _record_build("micro_run")
  workdir = str(tmp_path_factory.mktemp("micro_run"))
  with pytest.MonkeyPatch.context() as mp:
    _cache_plays(mp)
    result = run_micro(workdir, "train.steps=20", "train.eval_every=10",
                       "train.checkpoint_every=10", "train.log_every=5")
  return workdir, result


PIPELINE_MICRO = os.path.join(REPO, "experiments", "shakespeare_assistant.py") + ":micro"
# Every branch, so the notebooks executed afterwards find all stages complete.
PIPELINE_STAGES = ("tokenizer", "pretrain", "sft", "rm_data", "reward", "ppo", "grpo", "dpo",
                   "ppo_beta0", "compare", "report")


def pipeline_cmd(run_dir: str, stages=PIPELINE_STAGES) -> list[str]:
  return [sys.executable, "-m", "gptjax.main", "pipeline", "--config", PIPELINE_MICRO,
          "--workdir", run_dir, "--no_progress", f"--config.pipeline.stages={tuple(stages)!r}"]


@pytest.fixture(scope="session")
def micro_pipeline(tmp_path_factory):
  """One uninterrupted micro pipeline per session, shared by the pipeline and notebook tests."""
  _record_build("micro_pipeline")
  run_dir = str(tmp_path_factory.mktemp("pipeline") / "run")
  proc = subprocess.run(pipeline_cmd(run_dir), env=child_env(), cwd=REPO, capture_output=True,
                        text=True, timeout=1800)
  if proc.returncode != 0:
    pytest.fail(f"micro pipeline failed ({proc.returncode})\n{proc.stdout[-4000:]}\n"
                f"{proc.stderr[-4000:]}")
  # What a person saw on the console, for the tests of what the pipeline says.
  for name, text in (("console.txt", proc.stdout), ("console_stderr.txt", proc.stderr)):
    with open(os.path.join(os.path.dirname(run_dir), name), "w") as f:
      f.write(text)
  return run_dir


REASONING_MICRO = os.path.join(REPO, "experiments", "arithmetic_reasoning.py") + ":micro"


def reasoning_cmd(run_dir: str, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "gptjax.main", "pipeline", "--config", REASONING_MICRO,
          "--workdir", run_dir, "--no_progress", *overrides]


@pytest.fixture(scope="session")
def micro_reasoning(tmp_path_factory):
  """One micro arithmetic-reasoning pipeline per session, for its tests and notebook 06."""
  _record_build("micro_reasoning")
  run_dir = str(tmp_path_factory.mktemp("reasoning") / "run")
  proc = subprocess.run(reasoning_cmd(run_dir), env=child_env(), cwd=REPO, capture_output=True,
                        text=True, timeout=1800)
  if proc.returncode != 0:
    pytest.fail(f"micro reasoning pipeline failed ({proc.returncode})\n{proc.stdout[-4000:]}\n"
                f"{proc.stderr[-4000:]}")
  return run_dir
