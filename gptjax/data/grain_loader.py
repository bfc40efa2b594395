"""Pretraining and SFT batches from a grain pipeline (`data.loader = "grain"`).

    pretraining (GrainStreamLoader):
      documents (random access) -> epoch order and process shard -> (inputs, targets, mask)
      [-> grain worker processes] -> grain ConcatThenSplitIterDataset -> batch -> thread prefetch
    SFT (GrainPackedLoader):
      examples (random access) -> epoch order and process shard [-> grain worker processes]
      -> our BinPacker as a grain iterator (first_fit | best_fit | pad) -> thread prefetch

Both yield exactly the batches of `PackedLoader` in the same mode (tests/test_grain_loader.py
checks this batch for batch, and tests/test_sft.py an SFT run resumed through grain onto the
packed loader's weights): the documents come in the same order, `epoch_order(seed, epoch)` split
across processes by `shard_indices`. grain's concat-then-split packing has our stream semantics (a
document cut at the end of a row goes on in the next row as a new segment whose positions restart
at 0; segment ids count from 1), so pretraining uses it. For SFT grain's FirstFit/BestFit packers
do not: they emit all their open bins together when an example does not fit, while ours closes
only the fullest row and keeps the rest open, so rows (and every SFT figure) would change; our
packer runs inside the grain pipeline instead, preparing examples in the consuming process so
`pack_stats` counts every truncated or dropped one. The order stays ours rather than grain's
`MapDataset.shuffle` because grain's permutation is another one and would change every figure;
`GrainStreamLoader(shuffle="grain")` selects grain's.

State: grain's iterator state (a small JSON-able dict) plus the worker count, saved in the
checkpoint as the other loaders' state is; a restored iterator yields what an uninterrupted one
would have. Worker processes (`worker_count > 0`) read documents; grain hands their outputs back
round-robin, which restores the single-process order, and packing stays in this process so rows
do not depend on the number of workers.

Speed (benchmarks/RESULTS.md, 2 CPUs): pretraining 4-8x below `PackedLoader` (grain's
concat-then-split packs one row at a time in Python), SFT about 0.75x; worker processes slow
both further, since shipping an in-memory token array to another process costs more than reading
it. That is why `PackedLoader` stays the default; the grain path is for sources whose reading is
the expensive part.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import grain
import numpy as np
from grain import experimental as grain_exp

from gptjax.data import packing
from gptjax.data.loader import process_share, shard_indices

SHUFFLES = ("ours", "grain", "none")


class _ShardEpochs(grain.MapDataset):
  """Random access to this process's documents, epoch after epoch, in the loader's order:
  element i is document shard(epoch)[j] with (epoch, j) = divmod(i, shard length)."""

  def __init__(self, documents, *, seed: int, shuffle: bool, process_index: int,
               process_count: int, with_ids: bool = False):
    super().__init__()
    self._docs, self._seed, self._shuffle, self._with_ids = documents, seed, shuffle, with_ids
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
    doc_id = int(self._shard(epoch)[j])
    return (doc_id, self._docs[doc_id]) if self._with_ids else self._docs[doc_id]

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
    self.process_index, self.process_count, self.batch_size = process_share(
        documents, global_batch=global_batch, process_index=process_index,
        process_count=process_count, name=name)
    del pad_id  # the stream is endless, so every row is full: there is never padding
    self.seq_len = seq_len
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


class _BinPackIterator(grain.DatasetIterator):
  """Our SFT packing (`packing.BinPacker`: first fit, best fit or one example per row) as a grain
  iterator over (doc_id, example) elements: the rows `PackedLoader` makes, in its order.

  Examples are prepared here, in the consuming process, so `pack_stats` counts every truncated
  or dropped one even when grain workers read them. The state names the examples in open and
  pending rows by id; a restore reads those again from `documents` (random access), as
  `PackedLoader.set_state` does, and counts them in a scratch PackStats since they were counted
  before the checkpoint.
  """

  def __init__(self, parent, *, documents, seq_len: int, batch_size: int, mode: str,
               overlong: str, num_bins: int, pad_id: int, stats: packing.PackStats, name: str):
    super().__init__(parent)
    # Attribute names stay clear of grain's own (DatasetIterator keeps `_stats`).
    self._documents, self._seq_len, self._batch_size = documents, seq_len, batch_size
    self._overlong, self._pad_id, self._counts, self._label = overlong, pad_id, stats, name
    self._packer = packing.BinPacker(seq_len=seq_len, method=mode, num_bins=num_bins)
    self._pending: list[list[int]] = []
    self._prepared: dict[int, tuple] = {}

  def _prepare(self, doc_id: int, doc, stats: packing.PackStats):
    if doc is None:
      stats.examples += 1
      stats.dropped_untrained += 1
      return None
    ids, mask = doc if isinstance(doc, tuple) else (doc, None)
    return packing.prepare_example(ids, mask, seq_len=self._seq_len, overlong=self._overlong,
                                   stats=stats, where=f"({self._label} #{doc_id}) ")

  def __next__(self) -> dict[str, np.ndarray]:
    while len(self._pending) < self._batch_size:
      doc_id, doc = next(self._parent)
      pairs = self._prepare(doc_id, doc, self._counts)
      if pairs is None:
        continue
      self._prepared[doc_id] = pairs
      self._pending += self._packer.add(doc_id, len(pairs[0]))
    rows = self._pending[:self._batch_size]
    self._pending = self._pending[self._batch_size:]
    batch = packing.rows_to_batch([[self._prepared[k] for k in row] for row in rows],
                                  seq_len=self._seq_len, pad_id=self._pad_id, stats=self._counts)
    live = {k for row in self._pending for k in row} | {
        k for _, keys in self._packer.bins for k in keys}
    self._prepared = {k: v for k, v in self._prepared.items() if k in live}
    return batch

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "bins": self._packer.get_state(),
            "pending": [list(r) for r in self._pending]}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._packer.set_state(state["bins"])
    self._pending = [list(r) for r in state["pending"]]
    scratch = packing.PackStats()
    self._prepared = {}
    for row in self._pending + [keys for _, keys in self._packer.bins]:
      for k in row:
        self._prepared[k] = self._prepare(k, self._documents[k], scratch)


class _BinPackDataset(grain.IterDataset):
  def __init__(self, parent, **kw):
    super().__init__(parent)
    self._kw = kw

  def __iter__(self):
    return _BinPackIterator(self._parent.__iter__(), **self._kw)

  def __str__(self) -> str:
    return f"_BinPackDataset(mode={self._kw['mode']})"


class GrainPackedLoader(GrainStreamLoader):
  """SFT batches through grain: our order and process shard, read by grain (optionally in
  worker processes), packed by our `BinPacker` inside the grain pipeline, thread-prefetched by
  grain. The same batches and `pack_stats` as `PackedLoader(mode=first_fit|best_fit|pad)`;
  endless (epoch after epoch), as the training loader is."""

  def __init__(self, documents: Sequence[Any], *, seq_len: int, global_batch: int, seed: int,
               pad_id: int, mode: str = "first_fit", overlong: str = "truncate",
               num_bins: int | None = None, shuffle: bool = True,
               process_index: int | None = None, process_count: int | None = None,
               worker_count: int = 0, prefetch: int = 2, read_threads: int = 0,
               name: str = "data"):
    if mode not in packing.PACKING_METHODS:
      raise ValueError(f"mode must be one of {packing.PACKING_METHODS}, got {mode!r}")
    if overlong not in packing.OVERLONG_POLICIES:
      raise ValueError(f"overlong must be one of {packing.OVERLONG_POLICIES}, got {overlong!r}")
    self.process_index, self.process_count, self.batch_size = process_share(
        documents, global_batch=global_batch, process_index=process_index,
        process_count=process_count, name=name)
    self.seq_len = seq_len
    self.worker_count, self.name = worker_count, name
    self.pack_stats = packing.PackStats()
    ds = _ShardEpochs(documents, seed=seed, shuffle=shuffle, process_index=self.process_index,
                      process_count=self.process_count, with_ids=True)
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=read_threads * 4))
    if worker_count > 0:
      _absl_flags_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    ds = _BinPackDataset(ds, documents=documents, seq_len=seq_len, batch_size=self.batch_size,
                         mode=mode, overlong=overlong, num_bins=num_bins or self.batch_size,
                         pad_id=pad_id, stats=self.pack_stats, name=name)
    if prefetch > 0:
      ds = grain_exp.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    self._dataset = ds
    self._iter = None


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
