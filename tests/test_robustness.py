"""What gptjax does when things go wrong: non-finite steps, bad input and config, broken
checkpoints and full disks. Each failure ends in one line that names the problem, never in a
traceback or a silent restart; see the README's "When things go wrong"."""

import glob
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import MICRO, REPO, child_env, run_micro
from gptjax import batches
from gptjax import checkpoint as ckpt_lib
from gptjax import sharding as shd
from gptjax import step as step_lib
from gptjax import trainer
from gptjax.losses import lm
import tiny_training


def gptjax_cli(*args, timeout=300, **env):
  return subprocess.run([sys.executable, "-m", "gptjax.main", *args], env=child_env(**env),
                        cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _steps(workdir):
  return sorted(int(os.path.basename(d))
                for d in glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*")))


def _all_finite(tree):
  return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------ non-finite --

def test_a_nonfinite_step_changes_nothing_but_the_step_counter():
  mesh = shd.make_mesh((1, 1, 1))
  optimizer = optax.adam(0.1)
  model, state, state_sh = tiny_training.init_on_mesh(mesh, optimizer)
  batch = batches.LMBatch.from_dict(shd.to_global(tiny_training.global_batches(1)[0], mesh))

  def loss_fn(params, batch, *, frozen, rng, model):
    loss, metrics = lm.lm(params, batch, frozen=None, rng=rng, model=model)
    return loss * frozen["scale"], metrics

  step = step_lib.make_train_step(loss_fn, optimizer, model=model, state_sharding=state_sh,
                                  mesh=mesh, donate=False)
  before = jax.device_get(state)
  for bad in (jnp.nan, jnp.inf):
    state, m = step(state, batch, {"scale": jnp.asarray(bad, jnp.float32)})
    assert int(m["train/nonfinite"]) == 1
    after = jax.device_get(state)
    for a, b in zip(jax.tree.leaves((after.params, after.opt_state)),
                    jax.tree.leaves((before.params, before.opt_state))):
      np.testing.assert_array_equal(a, b)
  assert int(state.step) == 2
  state, m = step(state, batch, {"scale": jnp.ones((), jnp.float32)})
  assert int(m["train/nonfinite"]) == 0
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                                                    jax.tree.leaves(before.params))]
  assert any(moved)


def test_a_nonfinite_loss_halts_the_run_and_keeps_the_good_checkpoints(tmp_path, cached_corpus):
  # lr=1e6 makes the loss NaN within a few steps (it trained on to the end and saved NaN
  # checkpoints before). The run stops at the first such step and names it.
  workdir = str(tmp_path / "w")
  with pytest.raises(trainer.NonFiniteError) as info:
    run_micro(workdir, "optim.lr=1e6", "train.steps=40", "train.checkpoint_every=2",
              "train.log_every=0", "train.eval_every=0")
  msg = str(info.value)
  at = int(msg.split(" at step ")[1].split()[0])
  assert "train/loss=nan" in msg and "nan_policy" in msg, msg
  assert 1 < at < 40
  steps = _steps(workdir)
  assert steps and max(steps) < at, (steps, at)
  assert f"checkpoints kept: steps {', '.join(map(str, steps[-3:]))}" in msg
  for s in steps:
    _, params, _, _ = ckpt_lib.load_for_inference(workdir, s)
    assert _all_finite(params), s


def test_nan_policy_skip_counts_skipped_steps_and_finishes_finite(tmp_path, cached_corpus):
  workdir = str(tmp_path / "w")
  res = run_micro(workdir, "optim.lr=1e6", "train.steps=12", "train.checkpoint_every=6",
                  "train.log_every=3", "train.eval_every=0", "train.nan_policy=skip")
  assert res.step == 12 and _steps(workdir) == [6, 12]
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  counts = [r["train/skipped_steps"] for r in rows if "train/skipped_steps" in r]
  assert counts == sorted(counts) and counts[-1] > 0, counts
  # The count is the number of steps whose flag was up (every step is logged here).
  _, params, _, _ = ckpt_lib.load_for_inference(workdir, 12)
  assert _all_finite(params)
