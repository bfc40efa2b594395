"""A tiny model trained by the real step on a given mesh: what the parity tests compare.

Used in-process (one device) and by the child scripts next to this file (8 simulated devices,
or two real processes). Everything here goes through the library's own pieces: logical-axis
shardings, `state_shardings`, init straight into those shardings, `to_global`, `make_train_step`.
"""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptjax import batches
from gptjax import sharding as shd
from gptjax import step as step_lib
from gptjax.losses import lm
from gptjax.model import GPT, ModelConfig

VOCAB, SEQ, BATCH = 64, 16, 8
# Four heads and a vocabulary of 64 divide every tensor size used (1, 2, 4), so the parity runs
# really shard every kernel rather than falling back to replication.
MODEL = ModelConfig(vocab_size=VOCAB, max_len=SEQ, num_layers=2, num_heads=4, d_model=32)
OPTIM = types.SimpleNamespace(lr=1e-2, warmup_steps=1, decay_steps=100, min_lr_ratio=0.1, b1=0.9,
                              b2=0.99, eps=1e-8, weight_decay=0.1, clip_norm=1.0)


def global_batches(num_steps: int, seed: int = 0) -> list[dict]:
  """Deterministic numpy batches [BATCH, SEQ], the same in every process. Each row counts up
  from a random start, a pattern the model learns within a few steps, so the loss falls."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num_steps):
    starts = rng.integers(0, VOCAB, (BATCH, 1))
    tokens = ((starts + np.arange(SEQ + 1)) % VOCAB).astype(np.int32)
    out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy(),
                "segment_ids": np.ones((BATCH, SEQ), np.int32),
                "loss_mask": np.ones((BATCH, SEQ), np.float32)})
  return out


def init_on_mesh(mesh, optimizer, seed: int = 0):
  """The train state placed in its shardings on `mesh`.

  Initialised once per optimizer and process, then copied into each mesh's shardings: the values
  do not depend on the mesh, and one init compilation is much cheaper than one per mesh.
  """
  model = GPT(MODEL)
  init_params = lambda r: model.init(r, jnp.zeros((1, SEQ), jnp.int32))["params"]
  boxed = jax.eval_shape(init_params, jax.random.key(seed))
  state_sh = step_lib.state_shardings(boxed, optimizer, mesh, shd.DEFAULT_RULES)
  key = (id(optimizer), seed)
  if key not in _INITIAL:
    make = lambda r: step_lib.init_state(nn.meta.unbox(init_params(r)), optimizer, seed)
    _INITIAL[key] = (optimizer, jax.device_get(jax.jit(make)(jax.random.key(seed))))
  return model, jax.device_put(_INITIAL[key][1], state_sh), state_sh


_INITIAL = {}   # (optimizer id, seed) -> (optimizer kept alive so its id stays unique, host state)


def default_optimizer():
  if "adamw" not in _OPTIMIZERS:
    _OPTIMIZERS["adamw"] = step_lib.make_optimizer(OPTIM)
  return _OPTIMIZERS["adamw"]


_OPTIMIZERS = {}


def train(mesh, local_batches, *, grad_accum: int = 1, optimizer=None):
  """Runs one step per batch; returns (losses, final params as numpy).

  `local_batches` hold this process's rows only: `to_global` assembles the global batch.
  """
  optimizer = optimizer or default_optimizer()
  model, state, state_sh = init_on_mesh(mesh, optimizer)
  step = step_lib.make_train_step(lm.lm, optimizer, model=model, state_sharding=state_sh,
                                  mesh=mesh, grad_accum=grad_accum)
  losses = []
  for b in local_batches:
    state, metrics = step(state, batches.LMBatch.from_dict(shd.to_global(b, mesh)), None)
    losses.append(metrics["train/loss"])
  losses = [float(x) for x in jax.device_get(losses)]
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state.params)
  return losses, params


def flat(params) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(params)}
