"""Pretraining batches from a grain pipeline (`data.loader = "grain"`).

    documents (random access) -> epoch order and process shard -> (inputs, targets, mask) pairs
      [-> grain worker processes] -> grain ConcatThenSplitIterDataset -> batch -> thread prefetch

It yields exactly the batches of `PackedLoader(mode="stream")` (tests/test_grain_loader.py checks
this batch for batch): the documents come in the same order, `epoch_order(seed, epoch)` split
across processes by `shard_indices`, and grain's concat-then-split packing has our stream
semantics (a document cut at the end of a row goes on in the next row as a new segment whose
positions restart at 0; segment ids count from 1). The order stays ours rather than grain's
`MapDataset.shuffle`, because grain's permutation is a different one and would change every
figure measured with the packed loader; `shuffle="grain"` selects grain's instead.

State: grain's own iterator state (a small JSON-able dict), saved in the checkpoint as the other
loaders' state is; a restored iterator yields what an uninterrupted one would have.

Worker processes (`worker_count > 0`) read and cut documents; grain hands their outputs back
round-robin, which restores the single-process order, and packing stays in this process so rows
do not depend on the number of workers.

Speed: 4-8x below `PackedLoader` on 2 CPUs (benchmarks/RESULTS.md), because grain's
concat-then-split packs one row at a time in Python; that is why `packed` stays the default.

SFT keeps `PackedLoader`: grain's FirstFit/BestFit packers emit all their open bins together when
an example does not fit, while ours closes only the fullest row and keeps the rest open, so rows
(and every SFT figure) would change; and our over-long/untrained counts (`pack_stats`) are updated
where examples are prepared, which worker processes would not report back.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import grain
import numpy as np
from grain import experimental as grain_exp

from gptjax.data.errors import DataError
from gptjax.data.loader import _process_defaults, shard_indices

SHUFFLES = ("ours", "grain", "none")


class _ShardEpochs(grain.MapDataset):
  """Random access to this process's documents, epoch after epoch, in the loader's order:
  element i is document shard(epoch)[j] with (epoch, j) = divmod(i, shard length)."""

  def __init__(self, documents, *, seed: int, shuffle: bool, process_index: int,
               process_count: int):
    super().__init__()
    self._docs, self._seed, self._shuffle = documents, seed, shuffle
    self._pi, self._pc = process_index, process_count
    self._shard_len = len(range(process_index, len(documents), process_count))
    self._cached = (None, None)

  def __len__(self) -> int:
    return sys.maxsize          # epochs without end, as the packed loader runs

  def _shard(self, epoch: int) -> np.ndarray:
    if self._cached[0] != epoch:
      self._cached = (epoch, shard_indices(len(self._docs), seed=self._seed, epoch=epoch,
                                           process_index=self._pi, process_count=self._pc,
                                           shuffle=self._shuffle))
    return self._cached[1]

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, j = divmod(int(index), self._shard_len)
    return self._docs[int(self._shard(epoch)[j])]

  def __str__(self) -> str:
    return f"_ShardEpochs(shard_len={self._shard_len})"


def _absl_flags_parsed():
  """grain's worker processes read absl flags; gptjax parses its own command line, so absl's
  flags keep their defaults and are marked parsed (else grain raises on reading them)."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _pairs(doc) -> dict[str, np.ndarray]:
  """A document's (input, target) pairs and the mask on targets, as grain features."""
  ids, mask = doc if isinstance(doc, tuple) else (doc, None)
  if ids is None:
    ids = np.zeros(0, np.int32)
  ids = np.asarray(ids, np.int32)
  m = np.ones(len(ids), np.float32) if mask is None else np.asarray(mask, np.float32)
  return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": m[1:]}


def _to_batch_keys(row: dict) -> dict[str, np.ndarray]:
  return {"inputs": row["inputs"], "targets": row["targets"],
          "positions": row["inputs_positions"].astype(np.int32),
          "segment_ids": row["inputs_segment_ids"].astype(np.int32),
          "loss_mask": row["loss_mask"].astype(np.float32)}


class GrainStreamLoader:
  """Packed pretraining batches through grain; the interface of `PackedLoader` (iteration,
  `get_state`, `set_state`, `close`).

  shuffle: "ours" (the packed loader's order: same batches), "grain" (grain's per-epoch
  `MapDataset.shuffle`), or "none". worker_count: grain worker processes for reading documents
  (0 = in this process). read_threads: grain's read-ahead threads (0 = none).
  """

  def __init__(self, documents: Sequence[Any], *, seq_len: int, global_batch: int, seed: int,
               pad_id: int, shuffle: str = "ours", process_index: int | None = None,
               process_count: int | None = None, worker_count: int = 0, prefetch: int = 2,
               read_threads: int = 0, name: str = "data"):
    if shuffle not in SHUFFLES:
      raise ValueError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")
    self.process_index, self.process_count = _process_defaults(process_index, process_count)
    if global_batch % self.process_count:
      raise ValueError(f"global_batch={global_batch} is not divisible by "
                       f"process_count={self.process_count}")
    if len(documents) < self.process_count:
      raise DataError(f"{name}: {len(documents)} documents cannot be shared among "
                      f"{self.process_count} processes")
    del pad_id  # the stream is endless, so every row is full: there is never padding
    self.seq_len, self.batch_size = seq_len, global_batch // self.process_count
    self.worker_count, self.name = worker_count, name
    if shuffle == "grain":
      ds = (grain.MapDataset.source(documents).shuffle(seed=seed).repeat()
            [self.process_index::self.process_count])
    else:
      ds = _ShardEpochs(documents, seed=seed, shuffle=shuffle == "ours",
                        process_index=self.process_index, process_count=self.process_count)
    # grain reads ahead with 16 threads by default, which suits slow storage; our documents are
    # token arrays in memory, and on 2 CPU cores those threads' bookkeeping cost 20x the
    # throughput (0.8M against 17.5M tokens/s measured). `read_threads` restores them.
    ds = ds.map(_pairs).to_iter_dataset(grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=max(read_threads, 1) * 4 if read_threads
        else 0))
    if worker_count > 0:
      _absl_flags_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    # Documents with no pair (one token, or None) contribute nothing, as in the packed loader.
    ds = ds.filter(lambda d: len(d["inputs"]) > 0)
    feature_len = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
    ds = grain_exp.ConcatThenSplitIterDataset(ds, length_struct=feature_len,
                                              meta_features=())
    ds = ds.map(_to_batch_keys).batch(self.batch_size, drop_remainder=True)
    if prefetch > 0:
      ds = grain_exp.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    self._dataset = ds
    self._iter = None

  def _iterator(self):
    if self._iter is None:
      self._iter = iter(self._dataset)
    return self._iter

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator())

  def get_state(self) -> dict:
    return {"grain": _jsonable(self._iterator().get_state()), "worker_count": self.worker_count}

  def set_state(self, state: dict) -> None:
    if set(state) != {"grain", "worker_count"}:
      raise ValueError(f"{self.name}: loader state has keys {sorted(state)}, expected "
                       "['grain', 'worker_count'] (a checkpoint of another data.loader?)")
    if state["worker_count"] != self.worker_count:
      # grain's state records one position per worker; it cannot be re-split.
      raise ValueError(f"{self.name}: the checkpoint was written with data.grain_workers="
                       f"{state['worker_count']}, this run has {self.worker_count}; resume with "
                       "the same number")
    self.close()
    self._iterator().set_state(_from_json(state["grain"]))

  def close(self):
    it, self._iter = self._iter, None
    if it is not None and hasattr(it, "close"):
      it.close()

  def __del__(self):
    try:
      self.close()
    except Exception:
      pass


def _jsonable(x):
  """grain states hold tuples; JSON (the checkpoint's format) holds lists. Tuples are tagged so
  `_from_json` gives grain back exactly what it produced."""
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, tuple):
    return {"__tuple__": [_jsonable(v) for v in x]}
  if isinstance(x, list):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.integer):
    return int(x)
  return x


def _from_json(x):
  if isinstance(x, dict):
    if set(x) == {"__tuple__"}:
      return tuple(_from_json(v) for v in x["__tuple__"])
    return {k: _from_json(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_from_json(v) for v in x]
  return x
