import json

import jax
import numpy as np
import pytest

from gptjax.data import loader as loader_lib
from gptjax.data.errors import DataError
from gptjax.data.loader import PackedLoader


def _docs(n=40, seed=0):
  rng = np.random.default_rng(seed)
  return [(np.arange(rng.integers(2, 40)) + 1000 * (i + 1)).astype(np.int32) for i in range(n)]


def _sft(docs):
  return [(d, (np.arange(len(d)) % 2).astype(np.float32)) for d in docs]


def _make(docs, **kw):
  args = dict(seq_len=16, global_batch=4, seed=7, pad_id=0, process_index=0, process_count=1)
  args.update(kw)
  return PackedLoader(docs, **args)


def _same(a, b):
  return all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", loader_lib.MODES)
def test_same_seed_same_batches_and_exact_resume(mode):
  docs = _docs() if mode == "stream" else _sft(_docs())
  ref = [next(_make(docs, mode=mode)) for _ in range(1)]  # a fresh loader's first batch
  full = _make(docs, mode=mode)
  batches = [next(full) for _ in range(30)]               # runs past the first epoch
  assert _same(batches[0], ref[0])
  assert not _same(batches[0], next(_make(docs, mode=mode, seed=8)))
  partial = _make(docs, mode=mode)
  for _ in range(13):
    next(partial)
  state = json.loads(json.dumps(partial.get_state()))     # the state is JSON-able
  partial.close()
  resumed = _make(docs, mode=mode, prefetch=0)
  resumed.set_state(state)
  for b in batches[13:]:
    assert _same(next(resumed), b)


def test_two_processes_read_disjoint_shards_covering_the_data():
  docs = _docs(41)
  seen = []
  for p in range(2):
    it = _make(docs, global_batch=4, process_index=p, process_count=2, num_epochs=1, shuffle=True)
    batches = list(it)
    assert all(b["inputs"].shape == (2, 16) for b in batches)
    ids = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
    seen.append(set((ids // 1000).tolist()))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(1, 42))


def test_one_epoch_covers_every_pair_once():
  docs = _docs(25)
  batches = list(_make(docs, num_epochs=1))
  real = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
  assert len(real) == sum(len(d) - 1 for d in docs)
  assert sorted(real.tolist()) == sorted(np.concatenate([d[:-1] for d in docs]).tolist())


@pytest.mark.parametrize("mode", ["stream", "first_fit"])
def test_finite_epoch_ends_the_same_with_and_without_prefetch(mode):
  # Without a prefetch thread the producer's end-of-data marker used to escape as an exception
  # instead of ending the iteration.
  docs = _docs(25) if mode == "stream" else _sft(_docs(25))
  threaded = list(_make(docs, mode=mode, num_epochs=1))
  inline = list(_make(docs, mode=mode, num_epochs=1, prefetch=0))
  assert len(inline) == len(threaded) > 1
  assert all(_same(a, b) for a, b in zip(inline, threaded))


def test_sft_dropped_examples_are_counted():
  docs = _sft(_docs(20)) + [None, None]
  it = _make(docs, mode="first_fit", num_epochs=1)
  list(it)
  assert it.pack_stats.dropped_untrained == 2 and it.pack_stats.examples == 22


def test_bad_configuration_errors():
  with pytest.raises(ValueError, match="divisible"):
    _make(_docs(), global_batch=3, process_count=2)
  with pytest.raises(DataError, match="cannot be shared"):
    _make(_docs(1), process_count=2, global_batch=4)
  with pytest.raises(ValueError, match="mode"):
    _make(_docs(), mode="zigzag")
  with pytest.raises(ValueError, match="keys"):
    _make(_docs()).set_state({"step": 3})


def test_to_global_single_process():
  batch = next(_make(_docs()))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  out = loader_lib.to_global(batch, sharding)
  assert out["inputs"].shape == (4, 16)
  np.testing.assert_array_equal(np.asarray(out["targets"]), batch["targets"])
