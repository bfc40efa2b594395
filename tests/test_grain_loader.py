"""The grain pretraining pipeline gives the packed loader's batches, resumes exactly (with and
without worker processes) and shards documents across processes."""

import json

import numpy as np
import pytest

from gptjax.data.grain_loader import GrainStreamLoader
from gptjax.data.loader import PackedLoader


def _docs(n=40, seed=0):
  # Lengths from 1 (a document with no pair, which contributes nothing) to 39; document i's
  # tokens are 1000 * (i + 1) + position, so a token names its document.
  rng = np.random.default_rng(seed)
  return [(np.arange(rng.integers(1, 40)) + 1000 * (i + 1)).astype(np.int32) for i in range(n)]


def _kw(**kw):
  args = dict(seq_len=16, global_batch=4, seed=7, pad_id=0, process_index=0, process_count=1)
  args.update(kw)
  return args


def _same(a, b):
  return set(a) == set(b) and all(
      np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("process_index", [0, 1])
def test_grain_batches_equal_the_packed_loaders(process_index):
  docs = _docs(41)
  kw = _kw(process_index=process_index, process_count=2)
  packed = PackedLoader(docs, mode="stream", **kw)
  grain_it = GrainStreamLoader(docs, **kw)
  for _ in range(25):                       # past several epochs of a 20-document shard
    assert _same(next(grain_it), next(packed))
  packed.close()
  grain_it.close()


def test_grain_masks_of_masked_documents_equal_the_packed_loaders():
  docs = [(d, (np.arange(len(d)) % 3 == 0).astype(np.float32)) for d in _docs()]
  packed = PackedLoader(docs, mode="stream", **_kw())
  grain_it = GrainStreamLoader(docs, **_kw(prefetch=0))
  for _ in range(12):
    assert _same(next(grain_it), next(packed))
  packed.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_grain_resumes_exactly_from_a_json_state(workers):
  docs = _docs()
  reference = PackedLoader(docs, mode="stream", **_kw())
  expected = [next(reference) for _ in range(24)]
  reference.close()
  first = GrainStreamLoader(docs, worker_count=workers, **_kw())
  for b in expected[:11]:
    assert _same(next(first), b)
  state = json.loads(json.dumps(first.get_state()))      # as the checkpoint stores it
  first.close()
  resumed = GrainStreamLoader(docs, worker_count=workers, **_kw())
  resumed.set_state(state)
  for b in expected[11:]:
    assert _same(next(resumed), b)
  resumed.close()
  if workers:
    other = GrainStreamLoader(docs, worker_count=0, **_kw())
    with pytest.raises(ValueError, match="data.grain_workers=2"):
      other.set_state(state)


def test_grains_own_shuffle_shards_disjointly_and_reshuffles_each_epoch():
  docs = _docs(40)
  docs = [np.r_[d, d[-1] + 1].astype(np.int32) for d in docs]   # every document has a pair
  orders = []
  for p in range(2):
    it = GrainStreamLoader(docs, shuffle="grain", prefetch=0,
                           **_kw(process_index=p, process_count=2))
    order = []
    while len(order) < 41:                    # two epochs of this process's 20 documents
      b = next(it)
      starts = (b["inputs"] % 1000 == 0) & (b["segment_ids"] > 0)
      order += [int(t) // 1000 - 1 for t in b["inputs"][starts]]
    orders.append(order)
    it.close()
  for epoch in (0, 1):
    parts = [set(o[20 * epoch:20 * (epoch + 1)]) for o in orders]
    assert len(parts[0]) == len(parts[1]) == 20 and not parts[0] & parts[1]
    assert parts[0] | parts[1] == set(range(40))
  assert orders[0][:20] != orders[0][20:40]
  ours = PackedLoader(docs, mode="stream", **_kw())
  grain_it = GrainStreamLoader(docs, shuffle="grain", **_kw())
  assert not _same(next(ours), next(grain_it))
  ours.close()
  grain_it.close()


def test_pretraining_through_grain_trains_as_through_the_packed_loader(tmp_path, cached_corpus):
  from conftest import run_micro
  losses = {}
  for loader in ("packed", "grain"):
    workdir = str(tmp_path / loader)
    run_micro(workdir, f"data.loader={loader}", "train.steps=6", "train.log_every=1",
              "train.eval_every=0", "train.checkpoint_every=3")
    rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
    losses[loader] = [r["train/loss"] for r in rows if "train/loss" in r]
    with open(f"{workdir}/config.json") as f:
      assert json.load(f)["data"]["loader"] == loader
  assert len(losses["grain"]) == 6
  assert losses["grain"] == losses["packed"]
  # Stopped at the step-3 checkpoint and run again: grain's state came back from orbax.
  workdir = str(tmp_path / "resumed")
  for steps in (3, 6):
    run_micro(workdir, "data.loader=grain", f"train.steps={steps}", "train.log_every=1",
              "train.eval_every=0", "train.checkpoint_every=3")
  rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
  logged = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
  # Steps 4-6 were trained once, after the restore (a fresh start would log 1-3 twice), and
  # on the batches the uninterrupted run saw then.
  assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 6]
  assert [loss for _, loss in logged] == losses["grain"]


@pytest.mark.parametrize("mode,workers", [("first_fit", 0), ("best_fit", 0), ("pad", 2)])
def test_grain_sft_batches_stats_and_resume_equal_the_packed_loaders(mode, workers):
  from gptjax.data.grain_loader import GrainPackedLoader
  docs = [(d, (np.arange(len(d)) % 2).astype(np.float32)) for d in _docs()]
  docs[5] = None                                           # nothing to train: counted as dropped
  # No prefetch: both count examples when they are packed, so a thread running ahead would
  # make the counts depend on timing.
  ours = PackedLoader(docs, mode=mode, **_kw(prefetch=0))
  expected = [next(ours) for _ in range(24)]
  grain_it = GrainPackedLoader(docs, mode=mode, worker_count=workers, **_kw(prefetch=0))
  for b in expected:
    assert _same(next(grain_it), b)
  # Truncated (seq_len 16 < most examples) and dropped examples are counted alike.
  assert grain_it.pack_stats.as_dict() == ours.pack_stats.as_dict()
  assert grain_it.pack_stats.truncated > 0 and grain_it.pack_stats.dropped_untrained > 0
  ours.close()
  grain_it.close()
  first = GrainPackedLoader(docs, mode=mode, worker_count=workers, **_kw())
  for _ in range(9):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  first.close()
  resumed = GrainPackedLoader(docs, mode=mode, worker_count=workers, **_kw(prefetch=0))
  resumed.set_state(state)
  for b in expected[9:]:
    assert _same(next(resumed), b)
  resumed.close()
