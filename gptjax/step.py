"""The one update step every stage shares.

    step = make_train_step(loss_fn, optimizer, model=model, state_sharding=...)
    state, metrics = step(state, batch, frozen)

`loss_fn(params, batch, *, frozen, rng, model) -> (loss, metrics)` is any registered loss with its
hyperparameters bound. The step does value_and_grad (optionally over micro-batches with lax.scan),
the optax update and the norms. The state is donated, so its buffers are reused in place; `frozen`
(networks a loss reads but never trains: LoRA's frozen base) is a plain argument and is never
donated or updated. Reference log-probs travel in the batch instead (gptjax/objectives says why).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from gptjax import sharding as shd


@struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar
  params: Any
  opt_state: Any
  rng: jax.Array         # raw uint32 key data, so orbax saves it like any array


def lr_schedule(cfg) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to `lr · min_lr_ratio` at `decay_steps`."""
  decay = max(int(cfg.decay_steps), int(cfg.warmup_steps) + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=int(cfg.warmup_steps), decay_steps=decay,
      end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params):
  """Weight decay applies to matmul kernels only: never to norms, biases or embeddings."""
  def is_kernel(path, _):
    return getattr(path[-1], "key", None) == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(cfg) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
      optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=decay_mask))


def init_state(params, optimizer, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)))


def state_shardings(abstract_params_boxed, optimizer, mesh, rules):
  """Shardings for the whole TrainState: optimizer moments follow their parameters."""
  param_sh = shd.logical_to_sharding(abstract_params_boxed, mesh, rules)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nn.meta.unbox(abstract_params_boxed))
  abstract_opt = jax.eval_shape(optimizer.init, params)
  repl = shd.replicated(mesh)
  # optax states hold trees shaped like the params (moments) and scalars (counts): moments
  # follow their parameters' shardings, everything else is replicated.
  param_struct = jax.tree.structure(params)
  opt_sh = _map_subtrees(abstract_opt, param_struct, param_sh, repl)
  return TrainState(step=repl, params=param_sh, opt_state=opt_sh, rng=repl)


def _map_subtrees(tree, param_struct, param_sh, repl):
  if jax.tree.structure(tree) == param_struct:
    return param_sh
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):        # NamedTuple optax states
    return type(tree)(*[_map_subtrees(t, param_struct, param_sh, repl) for t in tree])
  if isinstance(tree, (tuple, list)):
    return type(tree)(_map_subtrees(t, param_struct, param_sh, repl) for t in tree)
  if isinstance(tree, dict):
    return {k: _map_subtrees(v, param_struct, param_sh, repl) for k, v in tree.items()}
  return jax.tree.map(lambda _: repl, tree)


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *, model,
                    state_sharding=None, mesh=None, grad_accum: int = 1, schedule=None,
                    donate: bool = True):
  """Returns `step(state, batch, frozen) -> (state, metrics)`, jitted once per batch shape.

  A step whose loss, gradient norm or new parameters are not finite leaves the parameters and the
  optimizer state as they were (only the step counter moves on) and reports
  `train/nonfinite` = 1. The guard is a select inside the step, so a NaN can never reach the
  state, whatever the caller then decides (halt or skip) and however late it looks at the flag.
  """

  def compute(params, batch, frozen, rng):
    return loss_fn(params, batch, frozen=frozen, rng=rng, model=model)

  grad_fn = jax.value_and_grad(compute, has_aux=True)

  def step(state: TrainState, batch, frozen):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if grad_accum == 1:
      (loss, metrics), grads = grad_fn(state.params, batch, frozen, rng)
    else:
      def split(x):
        # Micro-batch i takes rows i, i+A, i+2A, ... so that every device keeps working on its
        # own rows in every micro-batch (a contiguous split would idle most of the mesh).
        x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
          x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, shd.BATCH_AXES)))
        return x
      micro = jax.tree.map(split, batch)
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)

      def body(carry, xs):
        i, mb = xs
        (l, m), g = grad_fn(state.params, mb, frozen, jax.random.fold_in(rng, i))
        acc_g, acc_l, acc_m = carry
        acc_g = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc_g, g)
        acc_m = jax.tree.map(jnp.add, acc_m, m)
        return (acc_g, acc_l + l, acc_m), None

      m0 = jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro),
                                          frozen, rng)[0][1])
      m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
      (grads, loss, metrics), _ = jax.lax.scan(
          body, (zeros, jnp.zeros((), jnp.float32), m0), (jnp.arange(grad_accum), micro))
      grads = jax.tree.map(lambda g, p: (g / grad_accum).astype(p.dtype), grads, state.params)
      loss = loss / grad_accum
      metrics = jax.tree.map(lambda m: m / grad_accum, metrics)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    metrics["train/loss"] = loss
    metrics["train/grad_norm"] = grad_norm = _global_norm(grads)
    metrics["train/update_norm"] = _global_norm(updates)
    metrics["train/param_norm"] = param_norm = _global_norm(params)
    if schedule is not None:
      metrics["train/lr"] = schedule(state.step)
    # The parameter norm catches an update that overflowed although its gradient was finite.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    metrics["train/nonfinite"] = (~finite).astype(jnp.int32)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state))
    return new_state, metrics

  out_sh = (state_sharding, None) if state_sharding is not None else None
  return jax.jit(step, out_shardings=out_sh, donate_argnums=(0,) if donate else ())
