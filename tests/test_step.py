"""The one train step on a single device: gradient accumulation, metrics, donation, the schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax import batches
from gptjax import sharding as shd
from gptjax import step as step_lib
from gptjax.losses import lm
import tiny_training


def test_grad_accum_matches_one_big_batch():
  # Plain SGD, so parameter differences are gradient differences (Adam's first step is close to
  # sign(g) and would hide them).
  mesh = shd.make_mesh((1, 1, 1))
  data = tiny_training.global_batches(1)
  sgd = optax.sgd(0.5)
  one_loss, one_params = tiny_training.train(mesh, data, optimizer=sgd)
  two_loss, two_params = tiny_training.train(mesh, data, grad_accum=2, optimizer=sgd)
  np.testing.assert_allclose(two_loss, one_loss, rtol=1e-6)
  _, init_params = tiny_training.train(mesh, [], optimizer=sgd)
  one, two, init = (tiny_training.flat(p) for p in (one_params, two_params, init_params))
  moved = 0.0
  for k in one:
    np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
    moved = max(moved, float(np.abs(one[k] - init[k]).max()))
  assert moved > 1e-3      # the step did change the parameters, so the comparison means something


def test_step_metrics_donation_and_frozen():
  mesh = shd.make_mesh((1, 1, 1))
  optimizer = optax.sgd(0.1)
  model, state, state_sh = tiny_training.init_on_mesh(mesh, optimizer)
  batch = batches.LMBatch.from_dict(shd.to_global(tiny_training.global_batches(1)[0], mesh))

  def loss_fn(params, batch, *, frozen, rng, model):
    loss, metrics = lm.lm(params, batch, frozen=None, rng=rng, model=model)
    return loss + 0.0 * frozen["anchor"], metrics

  frozen = {"anchor": jnp.ones(())}
  expected_loss, grads = jax.jit(jax.value_and_grad(
      lambda p: lm.lm(p, batch, rng=None, model=model)[0]))(state.params)
  expected_grad_norm = optax.tree.norm(grads)
  old_params = state.params
  step = step_lib.make_train_step(loss_fn, optimizer, model=model, state_sharding=state_sh,
                                  mesh=mesh)
  state, metrics = step(state, batch, frozen)
  m = jax.device_get(metrics)
  np.testing.assert_allclose(m["train/loss"], expected_loss, rtol=1e-6)
  np.testing.assert_allclose(m["train/grad_norm"], expected_grad_norm, rtol=1e-5)
  np.testing.assert_allclose(m["train/update_norm"], 0.1 * expected_grad_norm, rtol=1e-5)
  np.testing.assert_allclose(m["train/param_norm"], optax.tree.norm(state.params), rtol=1e-6)
  assert int(state.step) == 1
  # The state is donated (its buffers reused for the new state); frozen parameters are not.
  assert all(x.is_deleted() for x in jax.tree.leaves(old_params))
  assert not frozen["anchor"].is_deleted()


def test_lr_schedule_warmup_then_cosine_to_floor():
  cfg = tiny_training.OPTIM.__class__(lr=1.0, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
  sched = step_lib.lr_schedule(cfg)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(sched(60)), 0.55, rtol=1e-5)   # halfway down the cosine
  np.testing.assert_allclose(float(sched(110)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(sched(500)), 0.1, rtol=1e-6)


def test_weight_decay_masks_only_kernels():
  mesh = shd.make_mesh((1, 1, 1))
  _, state, _ = tiny_training.init_on_mesh(mesh, optax.sgd(0.1))
  mask = tiny_training.flat(step_lib.decay_mask(state.params))
  decayed = sorted(k for k, v in mask.items() if v)
  assert decayed and all(k.endswith("['kernel']") for k in decayed)
  assert not mask["['embed']['embedding']"] and not mask["['ln_final']['scale']"]
