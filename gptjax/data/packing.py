"""Packing token documents into fixed-shape rows: the batch layout every stage trains on.

A batch is a dict of numpy arrays, each [B, T]:

    inputs, targets   int32   a document d gives inputs = d[:-1], targets = d[1:]
    positions         int32   restart at 0 for every segment
    segment_ids       int32   1, 2, 3, ... per segment within a row; 0 on padding
    loss_mask         float32 for a per-token mask m, loss_mask = m[1:]: it marks trained *targets*

Attention may only connect tokens with the same non-zero segment id (`attention_mask` below builds
that mask), so packed documents never see each other.

Pretraining (`pack_stream`) cuts one stream of documents into full rows: a document that runs past
the end of a row continues in the next row as a new segment. Nothing is dropped and there is no
padding. SFT keeps each conversation whole inside one row (`BinPacker`: first fit in order, best
fit, or one conversation per row), so a row ends in padding. A conversation longer than a row is
truncated or dropped, and one with nothing to train (no assistant turn) is dropped. Either way it is
counted in `PackStats`, and the first of each kind is logged.

This module holds pure functions over arrays and lengths. Order, sharding and resumption belong to
`loader.py`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Sequence

import numpy as np

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
PACKING_METHODS = ("first_fit", "best_fit", "pad")
OVERLONG_POLICIES = ("truncate", "drop")


@dataclasses.dataclass
class PackStats:
  """Counts for one packing run; never silent about what was cut or left out."""
  examples: int = 0            # examples seen
  rows: int = 0
  slots: int = 0               # rows * seq_len
  real_tokens: int = 0         # non-padding positions
  truncated: int = 0
  dropped_overlong: int = 0
  dropped_untrained: int = 0   # nothing to train: no assistant turn, or nothing left after truncation

  @property
  def padding_fraction(self) -> float:
    return 1.0 - self.real_tokens / self.slots if self.slots else 0.0

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "padding_fraction": self.padding_fraction}

  def add(self, other: "PackStats") -> None:
    for f in dataclasses.fields(self):
      setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def attention_mask(segment_ids: np.ndarray) -> np.ndarray:
  """[B, T, T] bool: causal and within one non-padding segment. The model's rule, spelled out."""
  seg = np.asarray(segment_ids)
  t = seg.shape[-1]
  causal = np.tril(np.ones((t, t), bool))
  same = (seg[..., :, None] == seg[..., None, :]) & (seg[..., :, None] > 0)
  return same & causal


def empty_batch(rows: int, seq_len: int, *, pad_id: int) -> dict[str, np.ndarray]:
  shape = (rows, seq_len)
  return {
      "inputs": np.full(shape, pad_id, np.int32),
      "targets": np.full(shape, pad_id, np.int32),
      "positions": np.zeros(shape, np.int32),
      "segment_ids": np.zeros(shape, np.int32),
      "loss_mask": np.zeros(shape, np.float32),
  }


def document_pairs(ids, mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs, targets, target_mask) of one document, each len(ids) - 1 long."""
  ids = np.asarray(ids, np.int32)
  m = np.ones(len(ids), np.float32) if mask is None else np.asarray(mask, np.float32)
  if m.shape != ids.shape:
    raise ValueError(f"mask has shape {m.shape}, ids have {ids.shape}")
  return ids[:-1], ids[1:], m[1:]


def pack_stream(inputs: np.ndarray, targets: np.ndarray, loss_mask: np.ndarray,
                starts: np.ndarray, *, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Cuts flat (input, target) pairs into rows of `seq_len`, padding only the last row.

  `starts[i]` is true where a document begins. Every row also begins a segment, because a document
  carried over from the previous row must not attend back to it.
  """
  n = len(inputs)
  rows = -(-n // seq_len)
  batch = empty_batch(rows, seq_len, pad_id=pad_id)
  if n == 0:
    return batch
  flat = {k: v.reshape(-1) for k, v in batch.items()}
  flat["inputs"][:n] = inputs
  flat["targets"][:n] = targets
  flat["loss_mask"][:n] = loss_mask
  start = np.zeros(rows * seq_len, bool)
  start[:n] = starts
  start = start.reshape(rows, seq_len)
  start[:, 0] = True
  real = (np.arange(rows * seq_len) < n).reshape(rows, seq_len)
  batch["segment_ids"][:] = np.where(real, np.cumsum(start, axis=1), 0)
  col = np.arange(seq_len, dtype=np.int32)
  seg_start = np.maximum.accumulate(np.where(start, col, 0), axis=1)
  batch["positions"][:] = np.where(real, col - seg_start, 0)
  return batch


def pack_documents(docs: Iterable, *, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Pretraining packing of whole documents (token id sequences, or (ids, mask) pairs)."""
  parts = [document_pairs(*d) if isinstance(d, tuple) else document_pairs(d) for d in docs]
  parts = [p for p in parts if len(p[0])]
  if not parts:
    return empty_batch(0, seq_len, pad_id=pad_id)
  starts = np.concatenate([np.arange(len(p[0])) == 0 for p in parts])
  return pack_stream(*(np.concatenate([p[j] for p in parts]) for j in range(3)), starts,
                     seq_len=seq_len, pad_id=pad_id)


_warned: set[str] = set()


def _warn_once(kind: str, message: str) -> None:
  if kind not in _warned:
    _warned.add(kind)
    logging.warning("%s (further cases are only counted in PackStats)", message)


def prepare_example(ids, mask, *, seq_len: int, overlong: str, stats: PackStats, where: str = ""):
  """Applies the over-long and nothing-to-train policies to one SFT example.

  Returns (inputs, targets, target_mask) or None when the example is dropped; updates `stats`.
  """
  if overlong not in OVERLONG_POLICIES:
    raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
  stats.examples += 1
  ids = np.asarray(ids, np.int32)
  mask = np.ones(len(ids), np.float32) if mask is None else np.asarray(mask, np.float32)
  if len(ids) - 1 > seq_len:
    if overlong == "drop":
      stats.dropped_overlong += 1
      _warn_once("overlong", f"dropped an example of {len(ids)} tokens {where}longer than a row "
                 f"of {seq_len} + 1 (overlong='drop')")
      return None
    stats.truncated += 1
    _warn_once("truncated", f"truncated an example of {len(ids)} tokens {where}to {seq_len} + 1 "
               "(overlong='truncate')")
    ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
  pairs = document_pairs(ids, mask)
  if len(pairs[0]) == 0 or not pairs[2].any():
    stats.dropped_untrained += 1
    _warn_once("untrained", f"dropped an example {where}with no trained token (no assistant turn, "
               "or none left after truncation)")
    return None
  return pairs


def rows_to_batch(rows: Sequence[Sequence[tuple]], *, seq_len: int, pad_id: int,
                  stats: PackStats | None = None) -> dict[str, np.ndarray]:
  """Lays out whole examples, each row a list of (inputs, targets, mask) that fit in `seq_len`."""
  batch = empty_batch(len(rows), seq_len, pad_id=pad_id)
  for r, row in enumerate(rows):
    at = 0
    for seg, (inp, tgt, m) in enumerate(row, start=1):
      n = len(inp)
      if at + n > seq_len:
        raise ValueError(f"row {r} overflows: {at} + {n} > seq_len={seq_len}")
      batch["inputs"][r, at:at + n] = inp
      batch["targets"][r, at:at + n] = tgt
      batch["loss_mask"][r, at:at + n] = m
      batch["positions"][r, at:at + n] = np.arange(n)
      batch["segment_ids"][r, at:at + n] = seg
      at += n
    if stats is not None:
      stats.real_tokens += at
  if stats is not None:
    stats.rows += len(rows)
    stats.slots += len(rows) * seq_len
  return batch


class BinPacker:
  """Online bin packing of example lengths into rows of `seq_len`, keeping `num_bins` rows open.

  `first_fit` puts an example into the first open row with room; `best_fit` into the open row it
  fills most tightly; `pad` gives every example its own row. When no open row has room, the fullest
  open row is closed and a fresh one opened. Bins hold example keys, not tokens, so the packer's
  state is small and JSON-able (see `get_state`).
  """

  def __init__(self, *, seq_len: int, method: str = "first_fit", num_bins: int = 8):
    if method not in PACKING_METHODS:
      raise ValueError(f"packing method must be one of {PACKING_METHODS}, got {method!r}")
    self.seq_len, self.method = seq_len, method
    self.num_bins = 1 if method == "pad" else max(1, num_bins)
    self.bins: list[list] = []   # each [used, [keys...]]

  def add(self, key, length: int) -> list[list]:
    """Adds one example; returns the rows (lists of keys) this closed, in closing order."""
    if not 0 < length <= self.seq_len:
      raise ValueError(f"example length {length} not in [1, seq_len={self.seq_len}]")
    if self.method == "pad":
      return [[key]]
    room = [i for i, (used, _) in enumerate(self.bins) if used + length <= self.seq_len]
    closed = []
    if room:
      i = room[0] if self.method == "first_fit" else min(room, key=lambda j: self.seq_len - self.bins[j][0])
    else:
      if len(self.bins) >= self.num_bins:
        fullest = max(range(len(self.bins)), key=lambda j: self.bins[j][0])
        closed.append(self.bins.pop(fullest)[1])
      self.bins.append([0, []])
      i = len(self.bins) - 1
    self.bins[i][0] += length
    self.bins[i][1].append(key)
    if self.bins[i][0] == self.seq_len:
      closed.append(self.bins.pop(i)[1])
    return closed

  def flush(self) -> list[list]:
    rows = [keys for _, keys in self.bins]
    self.bins = []
    return rows

  def get_state(self) -> list:
    return [[used, list(keys)] for used, keys in self.bins]

  def set_state(self, state: list) -> None:
    self.bins = [[int(used), list(keys)] for used, keys in state]


def pack_examples(examples: Iterable[tuple], *, seq_len: int, pad_id: int,
                  method: str = "first_fit", overlong: str = "truncate", num_bins: int = 8,
                  ) -> tuple[dict[str, np.ndarray], PackStats]:
  """Packs (ids, mask) examples (e.g. rendered chats) into rows. Returns (batch [N, T], stats)."""
  stats = PackStats()
  packer = BinPacker(seq_len=seq_len, method=method, num_bins=num_bins)
  prepared, rows = [], []
  for ids, mask in examples:
    pairs = prepare_example(ids, mask, seq_len=seq_len, overlong=overlong, stats=stats)
    if pairs is None:
      continue
    prepared.append(pairs)
    rows += packer.add(len(prepared) - 1, len(pairs[0]))
  rows += packer.flush()
  batch = rows_to_batch([[prepared[k] for k in row] for row in rows], seq_len=seq_len,
                        pad_id=pad_id, stats=stats)
  return batch, stats
