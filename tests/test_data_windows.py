import numpy as np
import pytest

from gptjax.data.windows import RandomWindows


def _windows(**kw):
  args = dict(seq_len=16, batch_size=4, seed=3)
  args.update(kw)
  return RandomWindows(np.arange(1000, dtype=np.int32), **args)


def test_shapes_and_shift():
  b = next(_windows())
  for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask"):
    assert b[k].shape == (4, 16)
  assert b["loss_mask"].dtype == np.float32 and b["inputs"].dtype == np.int32
  np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
  np.testing.assert_array_equal(b["positions"][0], np.arange(16))
  assert (b["segment_ids"] == 1).all() and (b["loss_mask"] == 1).all()


def test_batch_is_pure_function_of_step_and_resume():
  a = _windows()
  first = [next(a) for _ in range(5)]
  b = _windows()
  b.set_state({"step": 3})
  np.testing.assert_array_equal(next(b)["inputs"], first[3]["inputs"])
  assert b.get_state() == {"step": 4}


def test_processes_draw_different_windows():
  a = next(_windows(process_index=0, process_count=2))
  b = next(_windows(process_index=1, process_count=2))
  assert not np.array_equal(a["inputs"], b["inputs"])


def test_too_short():
  with pytest.raises(ValueError, match="seq_len"):
    RandomWindows(np.arange(5), seq_len=8, batch_size=1, seed=0)
