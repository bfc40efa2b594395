"""Random windows over one long token array: the simplest pretraining input.

Each row is one contiguous window of `seq_len + 1` tokens, so a row holds a single segment and every
target is trained. Batch k is a pure function of (seed, k, process_index): resuming only needs the
step counter, and processes draw independent windows without talking to each other. This is
sampling with replacement, which is what nanoGPT-style training on a small corpus wants; the packed,
epoch-aware loader lives in `loader.py`.
"""

from __future__ import annotations

import numpy as np

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


class RandomWindows:
  """Iterator of dicts `inputs, targets, positions, segment_ids, loss_mask`, each [batch_size, seq_len].

  `batch_size` is the per-process batch (global batch / process_count).
  """

  def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
      raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if len(tokens) < seq_len + 1:
      raise ValueError(f"tokens has {len(tokens)} ids, fewer than seq_len + 1 = {seq_len + 1}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    self.tokens = tokens.astype(np.int32, copy=False)
    self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
    self.process_index, self.process_count = process_index, process_count
    self.step = 0
    # The positions / segment ids / mask never change, so they are built once and copied per batch
    # (copying keeps callers free to mutate what they get).
    self._positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len))
    self._offsets = np.arange(seq_len + 1, dtype=np.int64)

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, step, self.process_index])
    starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
    windows = self.tokens[starts[:, None] + self._offsets]  # [B, T+1]
    shape = (self.batch_size, self.seq_len)
    return {
        "inputs": windows[:, :-1],
        "targets": windows[:, 1:],
        "positions": self._positions.copy(),
        "segment_ids": np.ones(shape, np.int32),
        "loss_mask": np.ones(shape, np.float32),
    }

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch_at(self.step)
    self.step += 1
    return batch

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])
