import numpy as np
import pytest

from gptjax.data import packing

KEYS = packing.BATCH_KEYS


def _docs(n=30, seed=0, lo=2, hi=50):
  rng = np.random.default_rng(seed)
  return [(np.arange(rng.integers(lo, hi)) + 1000 * (i + 1)).astype(np.int32) for i in range(n)]


def _check_layout(batch, pad_id):
  for k in KEYS:
    assert batch[k].dtype == (np.float32 if k == "loss_mask" else np.int32)
  seg, pos = batch["segment_ids"], batch["positions"]
  pad = seg == 0
  assert (batch["inputs"][pad] == pad_id).all() and (batch["targets"][pad] == pad_id).all()
  assert (batch["loss_mask"][pad] == 0).all()
  for r in range(seg.shape[0]):
    for s in np.unique(seg[r][seg[r] > 0]):
      cols = np.nonzero(seg[r] == s)[0]
      assert (np.diff(cols) == 1).all()                        # a segment is contiguous
      np.testing.assert_array_equal(pos[r, cols], np.arange(len(cols)))


def _assert_no_cross_attention(batch):
  mask = packing.attention_mask(batch["segment_ids"])
  # Documents are numbered by thousands, so a token's document is id // 1000.
  doc = np.where(batch["segment_ids"] > 0, batch["inputs"] // 1000, -1)
  same_doc = doc[:, :, None] == doc[:, None, :]
  assert not (mask & ~same_doc).any()
  # ...and each token does see its own earlier tokens.
  assert mask[batch["segment_ids"] > 0].any(axis=-1).all()


def test_pretraining_packing_fills_rows_and_keeps_every_pair():
  docs = _docs()
  batch = packing.pack_documents(docs, seq_len=32, pad_id=0)
  _check_layout(batch, 0)
  _assert_no_cross_attention(batch)
  real = batch["segment_ids"] > 0
  assert real[:-1].all()                                      # only the last row pads
  want = sum(len(d) - 1 for d in docs)
  assert real.sum() == want
  # Every (input, target) pair of every document is present, in order.
  flat_in, flat_tgt = batch["inputs"][real], batch["targets"][real]
  np.testing.assert_array_equal(flat_in, np.concatenate([d[:-1] for d in docs]))
  np.testing.assert_array_equal(flat_tgt, np.concatenate([d[1:] for d in docs]))


def test_target_mask_is_shifted():
  ids = np.array([1001, 1002, 1003, 1004], np.int32)
  mask = np.array([0, 0, 1, 1], np.float32)
  batch = packing.pack_documents([(ids, mask)], seq_len=4, pad_id=0)
  np.testing.assert_array_equal(batch["loss_mask"][0], [0, 1, 1, 0])
  np.testing.assert_array_equal(batch["targets"][0, :3], [1002, 1003, 1004])


@pytest.mark.parametrize("method", packing.PACKING_METHODS)
def test_sft_packing_keeps_examples_whole(method):
  docs = _docs(40, seed=1, lo=3, hi=30)
  examples = [(d, np.r_[np.zeros(2), np.ones(len(d) - 2)]) for d in docs]
  batch, stats = packing.pack_examples(examples, seq_len=32, pad_id=7, method=method)
  _check_layout(batch, 7)
  _assert_no_cross_attention(batch)
  assert stats.examples == 40 and stats.truncated == stats.dropped_overlong == 0
  # Each document lies whole in one row: its pair count equals its segment's length.
  for d in docs:
    r, c = np.argwhere(batch["inputs"] == d[0])[0]
    seg = batch["segment_ids"][r, c]
    assert (batch["segment_ids"][r] == seg).sum() == len(d) - 1
  assert 0 <= stats.padding_fraction < 1
  assert stats.real_tokens == sum(len(d) - 1 for d in docs)
  if method == "pad":
    assert batch["inputs"].shape[0] == 40


def test_packing_beats_padding():
  examples = [(d, None) for d in _docs(60, seed=2, lo=3, hi=20)]
  fractions = {m: packing.pack_examples(examples, seq_len=64, pad_id=0, method=m)[1].padding_fraction
               for m in packing.PACKING_METHODS}
  assert fractions["best_fit"] < fractions["pad"] and fractions["first_fit"] < fractions["pad"]


def test_overlong_and_untrained_policies_are_counted():
  long = (np.arange(100) + 1000).astype(np.int32)
  untrained = (np.arange(5) + 2000, np.zeros(5))
  late = (np.arange(40) + 3000, np.r_[np.zeros(35), np.ones(5)])  # trained part cut off
  examples = [(long, None), untrained, late, (np.arange(5) + 4000, None)]
  batch, stats = packing.pack_examples(examples, seq_len=16, pad_id=0, overlong="truncate")
  assert (stats.truncated, stats.dropped_overlong, stats.dropped_untrained) == (2, 0, 2)
  assert batch["inputs"].shape[0] == 2
  batch, stats = packing.pack_examples(examples, seq_len=16, pad_id=0, overlong="drop")
  assert (stats.truncated, stats.dropped_overlong, stats.dropped_untrained) == (0, 2, 1)
  with pytest.raises(ValueError, match="overlong"):
    packing.pack_examples(examples, seq_len=16, pad_id=0, overlong="ignore")
