"""The epoch-aware, sharded, resumable loader that turns documents into packed batches.

Order. Epoch e visits the documents in a permutation seeded by (seed, e); process p of P reads
positions p, p + P, p + 2P, ... of it, so the processes' shards are disjoint and together cover the
data. Every process always yields a batch of the same shape (its streams run on into the next epoch),
which keeps multi-host steps in lockstep.

State. `get_state()` is a small JSON-able dict naming the position after the last batch handed out
(epoch, position in the shard, how far into the current document, and for SFT the example keys in
the open rows). `set_state()` restores it, and the batches that follow are exactly those an
uninterrupted run would have produced. The state belongs in the checkpoint next to the train state.

Batches are host-local numpy dicts of [global_batch / process_count, T] (see `packing.py` for the
keys); `to_global` assembles the global jax.Array for the step. A background thread prepares
`prefetch` batches ahead.

Documents are any random-access sequence (len, __getitem__) whose items are token id arrays
(pretraining: every target trained), (ids, mask) pairs (SFT), or None for an example that has
nothing to train on (counted as dropped).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Sequence

import numpy as np

from gptjax.data import packing
from gptjax.data.errors import DataError

MODES = ("stream",) + packing.PACKING_METHODS


def _process_defaults(process_index, process_count):
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  return process_index, process_count


def process_share(documents, *, global_batch: int, process_index, process_count, name: str):
  """(process index, process count, rows per process batch), after checking that the batch and
  the documents can be shared among the processes. Both loaders split work this way."""
  process_index, process_count = _process_defaults(process_index, process_count)
  if global_batch % process_count:
    raise ValueError(f"global_batch={global_batch} is not divisible by "
                     f"process_count={process_count}")
  if len(documents) < process_count:
    raise DataError(f"{name}: {len(documents)} documents cannot be shared among "
                    f"{process_count} processes")
  return process_index, process_count, global_batch // process_count


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """The global visiting order of epoch `epoch`: a pure function of (seed, epoch)."""
  if not shuffle:
    return np.arange(n)
  return np.random.default_rng([seed, epoch]).permutation(n)


def shard_indices(n: int, *, seed: int, epoch: int, process_index: int, process_count: int,
                  shuffle: bool = True) -> np.ndarray:
  return epoch_order(n, seed=seed, epoch=epoch, shuffle=shuffle)[process_index::process_count]


class _EndOfData(Exception):
  pass


class PackedLoader:
  """Iterator of packed host-local batches with exact resume.

  mode: `stream` (pretraining: documents split across rows, no padding) or an SFT packing method,
  `first_fit`, `best_fit` or `pad` (whole examples, over-long ones handled by `overlong`).
  num_epochs: None runs forever; a number ends the iterator after that many passes, the last
  batch padded with empty rows (useful for evaluation).
  """

  def __init__(self, documents: Sequence[Any], *, seq_len: int, global_batch: int, seed: int,
               pad_id: int, mode: str = "stream", overlong: str = "truncate",
               num_bins: int | None = None, shuffle: bool = True, num_epochs: int | None = None,
               process_index: int | None = None, process_count: int | None = None,
               prefetch: int = 2, name: str = "data"):
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if overlong not in packing.OVERLONG_POLICIES:
      raise ValueError(f"overlong must be one of {packing.OVERLONG_POLICIES}, got {overlong!r}")
    self.process_index, self.process_count, self.batch_size = process_share(
        documents, global_batch=global_batch, process_index=process_index,
        process_count=process_count, name=name)
    self.documents, self.name = documents, name
    self.seq_len = seq_len
    self.seed, self.pad_id, self.mode, self.overlong = seed, pad_id, mode, overlong
    self.num_bins = num_bins or self.batch_size
    self.shuffle, self.num_epochs, self.prefetch = shuffle, num_epochs, prefetch
    self.pack_stats = packing.PackStats()
    self._state = self._initial_state()
    self._thread = None
    self._queue = None
    self._stop = None

  # --- state ---------------------------------------------------------------------------------------

  def _initial_state(self) -> dict:
    state = {"epoch": 0, "index": 0}
    if self.mode == "stream":
      state["offset"] = 0
    else:
      state.update(bins=[], pending=[])
    return state

  def get_state(self) -> dict:
    return _copy_state(self._state)

  def set_state(self, state: dict) -> None:
    expected = set(self._initial_state())
    if set(state) != expected:
      raise ValueError(f"loader state has keys {sorted(state)}, expected {sorted(expected)} "
                       f"for mode={self.mode!r}")
    self._shutdown()
    self._state = _copy_state(state)

  # --- iteration -----------------------------------------------------------------------------------

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.prefetch <= 0:
      if self._thread is None:
        self._thread = self._produce(_copy_state(self._state), threading.Event())
      try:
        item = next(self._thread)
      except BaseException as e:  # the generator is finished; the same handling as a queued error
        item = e
    else:
      if self._thread is None:
        self._start()
      item = self._queue.get()
    if isinstance(item, BaseException):
      self._thread = None
      if isinstance(item, _EndOfData):
        raise StopIteration
      raise item
    batch, self._state = item
    return batch

  def _start(self):
    self._stop = threading.Event()
    self._queue = queue.Queue(maxsize=self.prefetch)
    start, stop, q = _copy_state(self._state), self._stop, self._queue

    def work():
      try:
        for item in self._produce(start, stop):
          while not stop.is_set():
            try:
              q.put(item, timeout=0.1)
              break
            except queue.Full:
              continue
          if stop.is_set():
            return
      except BaseException as e:  # handed to the consumer, which re-raises it
        q.put(e)

    self._thread = threading.Thread(target=work, name=f"{self.name}-prefetch", daemon=True)
    self._thread.start()

  def _shutdown(self):
    if isinstance(self._thread, threading.Thread):
      self._stop.set()
      self._thread.join()
    self._thread = None

  def close(self):
    self._shutdown()

  def __del__(self):
    try:
      self._shutdown()
    except Exception:
      pass

  def _shard(self, epoch: int) -> np.ndarray:
    return shard_indices(len(self.documents), seed=self.seed, epoch=epoch,
                         process_index=self.process_index, process_count=self.process_count,
                         shuffle=self.shuffle)

  def _produce(self, state: dict, stop: threading.Event):
    produce = self._produce_stream if self.mode == "stream" else self._produce_packed
    yield from produce(state, stop)
    raise _EndOfData()

  def _produce_stream(self, state: dict, stop: threading.Event):
    epoch, index, offset = state["epoch"], state["index"], state["offset"]
    shard = self._shard(epoch)
    need = self.batch_size * self.seq_len
    while not stop.is_set():
      inputs, targets, masks, starts, have = [], [], [], [], 0
      ended = False
      while have < need:
        if index >= len(shard):
          epoch, index, offset = epoch + 1, 0, 0
          if self.num_epochs is not None and epoch >= self.num_epochs:
            ended = True
            break
          shard = self._shard(epoch)
        doc = self.documents[int(shard[index])]
        ids, mask = doc if isinstance(doc, tuple) else (doc, None)
        n_pairs = 0 if doc is None else len(ids) - 1
        take = min(need - have, n_pairs - offset)
        if take > 0:
          ids = np.asarray(ids)
          inputs.append(ids[offset:offset + take])
          targets.append(ids[offset + 1:offset + take + 1])
          masks.append(np.ones(take, np.float32) if mask is None
                       else np.asarray(mask, np.float32)[offset + 1:offset + take + 1])
          start = np.zeros(take, bool)
          start[0] = offset == 0
          starts.append(start)
          have += take
        if take > 0 and offset + take < n_pairs:
          offset += take
        else:
          index, offset = index + 1, 0
      if have == 0 and ended:
        return
      cat = (lambda xs: np.concatenate(xs)) if inputs else (lambda xs: np.zeros(0, np.int32))
      batch = packing.pack_stream(cat(inputs), cat(targets), cat(masks), cat(starts),
                                  seq_len=self.seq_len, pad_id=self.pad_id)
      batch = _fill_rows(batch, self.batch_size, self.seq_len, self.pad_id)
      yield batch, {"epoch": epoch, "index": index, "offset": offset}
      if ended:
        return

  def _prepare(self, doc_id: int, stats: packing.PackStats):
    doc = self.documents[doc_id]
    if doc is None:
      stats.examples += 1
      stats.dropped_untrained += 1
      return None
    ids, mask = doc if isinstance(doc, tuple) else (doc, None)
    return packing.prepare_example(ids, mask, seq_len=self.seq_len, overlong=self.overlong,
                                   stats=stats, where=f"({self.name} #{doc_id}) ")

  def _produce_packed(self, state: dict, stop: threading.Event):
    epoch, index = state["epoch"], state["index"]
    packer = packing.BinPacker(seq_len=self.seq_len, method=self.mode, num_bins=self.num_bins)
    packer.set_state(state["bins"])
    pending = [list(row) for row in state["pending"]]
    # Examples in open or pending rows are prepared again after a restore; their stats were
    # counted before the checkpoint, so they go to a scratch PackStats.
    prepared, scratch = {}, packing.PackStats()
    for row in pending + [keys for _, keys in packer.bins]:
      for k in row:
        prepared[k] = self._prepare(k, scratch)
    shard = self._shard(epoch)
    ended = False
    while not stop.is_set():
      while len(pending) < self.batch_size and not ended:
        if index >= len(shard):
          epoch, index = epoch + 1, 0
          if self.num_epochs is not None and epoch >= self.num_epochs:
            ended = True
            pending += packer.flush()
            break
          shard = self._shard(epoch)
        doc_id = int(shard[index])
        index += 1
        pairs = self._prepare(doc_id, self.pack_stats)
        if pairs is None:
          continue
        prepared[doc_id] = pairs
        pending += packer.add(doc_id, len(pairs[0]))
      if not pending:
        return
      rows, pending = pending[:self.batch_size], pending[self.batch_size:]
      batch = packing.rows_to_batch([[prepared[k] for k in row] for row in rows],
                                    seq_len=self.seq_len, pad_id=self.pad_id, stats=self.pack_stats)
      batch = _fill_rows(batch, self.batch_size, self.seq_len, self.pad_id)
      live = {k for row in pending for k in row} | {k for _, keys in packer.bins for k in keys}
      prepared = {k: v for k, v in prepared.items() if k in live}
      yield batch, {"epoch": epoch, "index": index, "bins": packer.get_state(),
                    "pending": [list(r) for r in pending]}


def _fill_rows(batch, rows, seq_len, pad_id):
  have = batch["inputs"].shape[0]
  if have == rows:
    return batch
  empty = packing.empty_batch(rows - have, seq_len, pad_id=pad_id)
  return {k: np.concatenate([batch[k], empty[k]]) for k in batch}


def _copy_state(state: dict) -> dict:
  out = {}
  for k, v in state.items():
    out[k] = [[x if not isinstance(x, list) else list(x) for x in r] if isinstance(r, list) else r
              for r in v] if isinstance(v, list) else int(v)
  return out


def to_global(batch: dict[str, np.ndarray], sharding) -> dict:
  """Host-local batch -> global jax.Arrays laid out by `sharding` (e.g. batch axis over data)."""
  import jax
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
