"""Checkpoints: exact resume, save on SIGTERM, fallback from a damaged checkpoint, init_from."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import MICRO, REPO, child_env, run_micro
import tiny_training

# A fixed decay horizon: with decay_steps=0 the schedule stretches to train.steps, and a run
# extended from N to 2N steps would then follow another learning-rate curve than a 2N-step run.
FIXED = ("optim.decay_steps=50", "train.eval_every=0", "train.checkpoint_every=0",
         "train.log_every=0")


def _assert_params_equal(a, b):
  fa, fb = tiny_training.flat(jax.device_get(a)), tiny_training.flat(jax.device_get(b))
  assert fa.keys() == fb.keys()
  for k in fa:
    assert np.array_equal(fa[k], fb[k]), k


def test_resume_is_bitwise_exact(tmp_path, cached_corpus, capsys):
  n = 3
  straight = run_micro(str(tmp_path / "straight"), f"train.steps={2 * n}", *FIXED)
  split_dir = str(tmp_path / "split")
  first = run_micro(split_dir, f"train.steps={n}", *FIXED)
  assert first.step == n
  capsys.readouterr()
  resumed = run_micro(split_dir, f"train.steps={2 * n}", *FIXED)
  assert f"resumed from step {n}" in capsys.readouterr().out
  assert resumed.step == straight.step == 2 * n
  _assert_params_equal(resumed.state.params, straight.state.params)
  _assert_params_equal(resumed.state.opt_state, straight.state.opt_state)
  # And the runs did train: the parameters moved between step n and step 2n.
  moved = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                       jax.device_get(first.state.params), jax.device_get(resumed.state.params))
  assert not all(jax.tree.leaves(moved))


def test_sigterm_saves_and_the_same_command_resumes(tmp_path, cached_corpus, capsys):
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "gptjax.main", "train", "--config", MICRO, "--workdir", workdir,
         "--no_progress", "--config.train.steps=100000", "--config.train.checkpoint_every=5",
         "--config.train.eval_every=0", "--config.train.log_every=0",
         # The resume test's schedule: the same step program, so a compilation cache hit.
         "--config.optim.decay_steps=50"]
  proc = subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(workdir, "checkpoints", "5", "commit_success.txt")):
      assert proc.poll() is None, proc.stdout.read()
      assert time.time() < deadline, "no checkpoint within the deadline"
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 128 + signal.SIGTERM, out
  assert "Traceback" not in out
  msg = [l for l in out.splitlines() if "SIGTERM: saved checkpoint at step" in l]
  assert msg, out
  stopped = int(msg[-1].split("at step ")[1].split(";")[0])
  assert stopped >= 5
  steps = sorted(int(os.path.basename(d)) for d in glob.glob(os.path.join(workdir, "checkpoints",
                                                                          "[0-9]*")))
  assert steps[-1] == stopped
  # Running the same command again resumes there (here in-process, with fewer steps to go).
  capsys.readouterr()
  result = run_micro(workdir, f"train.steps={stopped + 2}", "train.eval_every=0",
                     "train.log_every=0", "optim.decay_steps=50")
  assert f"resumed from step {stopped}" in capsys.readouterr().out
  assert result.step == stopped + 2


def test_damaged_newest_checkpoint_falls_back_to_the_previous(micro_run, tmp_path, cached_corpus,
                                                              capfd):
  src, _ = micro_run
  workdir = str(tmp_path / "copy")
  shutil.copytree(src, workdir)
  newest = os.path.join(workdir, "checkpoints", "20")
  for path in glob.glob(os.path.join(newest, "state", "**"), recursive=True):
    if os.path.isfile(path):
      with open(path, "wb") as f:
        f.write(b"not a checkpoint")
  capfd.readouterr()
  result = run_micro(workdir, "train.steps=20", "train.eval_every=10",
                     "train.checkpoint_every=10", "train.log_every=5")
  out = capfd.readouterr()
  text = out.out + out.err
  assert "WARNING: checkpoint" in text and "unreadable" in text, text
  assert "resumed from step 10" in text
  assert result.step == 20
  # The damaged checkpoint is kept aside for a person to look at, never deleted.
  assert glob.glob(os.path.join(workdir, "checkpoints", "unreadable-20-*"))
  assert os.path.exists(os.path.join(workdir, "checkpoints", "20", "commit_success.txt"))


def test_init_from_loads_another_runs_parameters(micro_run, tmp_path, cached_corpus, capsys):
  src, src_result = micro_run
  workdir = str(tmp_path / "next")
  # Zero steps: the new run only initialises (from `src`) and saves step 0.
  result = run_micro(workdir, "train.steps=0", f"train.init_from={src}")
  assert result.step == 0
  _assert_params_equal(result.state.params, src_result.state.params)
  # A fresh optimizer state, not the previous run's.
  assert int(jax.device_get(result.state.step)) == 0
  mu = jax.tree.leaves(jax.device_get(result.state.opt_state))
  assert all(not np.any(x) for x in mu if np.ndim(x) > 0)
  # And the saved checkpoint holds those parameters.
  from gptjax import checkpoint as ckpt_lib
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        result.state.params)
  restored = ckpt_lib.restore_params(workdir, target)
  _assert_params_equal(restored, src_result.state.params)


def test_init_from_a_directory_without_a_run_fails_clearly(tmp_path, cached_corpus):
  with pytest.raises(FileNotFoundError, match="init_from"):
    run_micro(str(tmp_path / "x"), "train.steps=0", f"train.init_from={tmp_path / 'nothing'}")


def test_sibling_writes_that_die_of_a_full_disk_are_not_reported_but_other_errors_are():
  """A save's first disk failure is the one message; the sibling write tasks that failed the
  same way and were never awaited must not print a traceback each when collected."""
  import asyncio
  import gc
  import io
  import logging
  from gptjax import checkpoint
  checkpoint._ignore_abandoned_io()
  stream = io.StringIO()
  handler = logging.StreamHandler(stream)
  logging.getLogger("asyncio").addHandler(handler)

  async def fails(text):
    raise ValueError(text)

  try:
    loop = asyncio.new_event_loop()
    tasks = [loop.create_task(fails("Failed writing: [os_error_code='28']")),
             loop.create_task(fails("a bug, not the disk"))]
    loop.run_until_complete(asyncio.sleep(0.01))
    assert all(t.done() for t in tasks)
    del tasks
    gc.collect()
    loop.close()
  finally:
    logging.getLogger("asyncio").removeHandler(handler)
  text = stream.getvalue()
  assert "a bug, not the disk" in text and "Traceback" in text
  assert "os_error_code='28'" not in text
