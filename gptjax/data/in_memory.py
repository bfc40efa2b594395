"""A resumable batch source over arrays held in memory, for data small enough to encode up front
(preference pairs, reward-model rankings, unpaired KTO examples).

    source = InMemorySource(arrays, wrap=batches.RewardBatch.from_dict, mesh=mesh,
                            global_batch=32, seed=0)
    batch = source.next()          # the global batch, each process contributing its own rows

`arrays` is any pytree of numpy arrays with the rows on axis 0. Epoch e visits the rows in
`loader.epoch_order(seed, e)`, and process p of P takes every P-th row of that order, so the
processes read disjoint rows and together the same ones one process would. The JSON state is
(epoch, index into this process's share), saved inside each checkpoint, so a resumed run continues
with exactly the rows an uninterrupted one would have read.

The tail of an epoch: `drop_remainder=False` fills a batch across the epoch boundary (every row
is read equally often); True starts the next epoch instead, so a batch never mixes two epochs.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from gptjax import sharding as shd
from gptjax.data import loader as loader_lib


def num_rows(arrays) -> int:
  return int(jax.tree.leaves(arrays)[0].shape[0])


def take_rows(arrays, idx):
  return jax.tree.map(lambda v: v[idx], arrays)


class InMemorySource:
  """See the module docstring. `wrap(global_arrays) -> batch` builds the loss's batch type."""

  def __init__(self, arrays, *, wrap: Callable, mesh, global_batch: int, seed: int,
               shuffle: bool = True, drop_remainder: bool = False, what: str = "rows"):
    self.arrays, self.wrap, self.mesh = arrays, wrap, mesh
    self.seed, self.shuffle, self.drop_remainder = seed, shuffle, drop_remainder
    self.n = num_rows(arrays)
    self.batch = global_batch // jax.process_count()
    if self.n < global_batch and drop_remainder:
      raise ValueError(f"train.batch_size={global_batch} exceeds the {self.n} {what}")
    self.state = {"epoch": 0, "index": 0}

  def _share(self, epoch):
    return loader_lib.shard_indices(self.n, seed=self.seed, epoch=epoch,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count(), shuffle=self.shuffle)

  def next(self, state=None):
    epoch, index = self.state["epoch"], self.state["index"]
    picked = []
    while len(picked) < self.batch:
      share = self._share(epoch)
      room = len(share) - index
      if room <= 0 or (self.drop_remainder and not picked and room < self.batch):
        epoch, index = epoch + 1, 0
        continue
      take = share[index:index + self.batch - len(picked)]
      picked.extend(int(i) for i in take)
      index += len(take)
    self.state = {"epoch": epoch, "index": index}
    return self.wrap(shd.to_global(take_rows(self.arrays, np.asarray(picked)), self.mesh))

  def get_state(self) -> dict:
    return dict(self.state)

  def set_state(self, s: dict) -> None:
    self.state = {"epoch": int(s["epoch"]), "index": int(s["index"])}


def fixed_batches(arrays, global_batch: int, *, limit: int = 0):
  """The rows in order as global batches of `global_batch` (this process's rows of each), the last
  padded with all-zero rows; yields (local arrays, {'rows': real rows in the global batch}).
  `limit` > 0 stops after that many batches. For evaluation: the same rows every time."""
  n = num_rows(arrays)
  local = global_batch // jax.process_count()
  mine = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
  for b, start in enumerate(range(0, n, global_batch)):
    if limit and b >= limit:
      return
    part = take_rows(arrays, np.arange(start, min(start + global_batch, n)))
    short = global_batch - (min(start + global_batch, n) - start)
    if short:
      part = jax.tree.map(lambda v: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]),
                          part)
    yield take_rows(part, mine), {"rows": float(global_batch - short)}
