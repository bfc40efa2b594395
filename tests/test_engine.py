"""The continuous-batching engine: log-probs equal a plain forward, finished slots are refilled,
results do not depend on slot assignment (slots, chunk, order of prompts), greedy equals the
static sampler, and the cost follows the tokens generated."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import engine, sampling
from gptjax.model import GPT, ModelConfig

CFG = ModelConfig(vocab_size=40, num_layers=2, num_heads=4, num_kv_heads=2, d_model=32,
                  max_len=64, variant="llama")
EOS = 3


@pytest.fixture(scope="module")
def setup():
  model = GPT(CFG)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  # Make EOS likely enough that rows stop at different lengths.
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, EOS].add(0.6)
  rng = np.random.default_rng(0)
  n, p = 10, 7
  lengths = rng.integers(2, p + 1, size=n).astype(np.int32)
  prompts = np.zeros((n, p), np.int32)
  for i, l in enumerate(lengths):
    prompts[i, :l] = rng.integers(4, CFG.vocab_size, size=l)
  return model, params, prompts, lengths


def _gen(setup, **kw):
  model, params, prompts, lengths = setup
  args = dict(rng=7, max_new_tokens=20, temperature=1.0, eos_ids=(EOS,), pad_id=0)
  args.update(kw)
  stats = engine.EngineStats()
  out = engine.generate(model, params, prompts, lengths, stats=stats, **args)
  return out, stats


def test_logprobs_equal_plain_forward(setup):
  model, params, *_ = setup
  out, _ = _gen(setup, slots=4, chunk=4)
  plain = sampling.completion_logprobs(model, params, out, temperature=1.0)
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(plain), atol=2e-5)
  lengths = np.asarray(out.lengths)
  assert len(set(lengths.tolist())) > 2                # rows stopped at different lengths
  comp, mask = np.asarray(out.completion), np.asarray(out.completion_mask)
  for row, m, l in zip(comp, mask, lengths):
    assert m.sum() == l and (l == 20 or row[l - 1] == EOS)
    assert EOS not in row[:l - 1].tolist()


def test_finished_slots_are_refilled_and_results_ignore_slot_assignment(setup):
  base, _ = _gen(setup, slots=10, chunk=3)
  few, stats = _gen(setup, slots=3, chunk=5)
  assert stats.refills >= 7 and stats.admitted == 10
  for f in ("tokens", "completion", "completion_mask", "lengths"):
    np.testing.assert_array_equal(np.asarray(getattr(few, f)), np.asarray(getattr(base, f)), f)
  np.testing.assert_allclose(np.asarray(few.logprobs), np.asarray(base.logprobs), atol=2e-5)


def test_greedy_equals_static_sampler(setup):
  model, params, prompts, lengths = setup
  out, _ = _gen(setup, slots=4, chunk=4, temperature=0.0)
  ref = sampling.generate(model, params, prompts, lengths, rng=0, max_new_tokens=20,
                          temperature=0.0, eos_ids=(EOS,), pad_id=0)
  for f in ("tokens", "completion", "lengths"):
    np.testing.assert_array_equal(np.asarray(getattr(out, f)), np.asarray(getattr(ref, f)), f)
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=2e-5)


def test_cost_follows_generated_tokens(setup):
  out, stats = _gen(setup, slots=10, chunk=2)
  generated = int(np.asarray(out.lengths).sum())
  static = 10 * int(np.asarray(out.lengths).max())
  # Compaction shrinks the batch as rows finish: well under rows × longest, at most one chunk of
  # slack per row and power-of-two rounding above the tokens generated.
  assert stats.compactions >= 1
  # (each row's first token comes from its admission, not a decode step)
  assert generated - 10 <= stats.row_steps < static
  # Compaction keeps a power-of-two slot count (below the first width), so each size compiles
  # once per run, not once for every number of live rows it happens to reach.
  assert len(stats.slot_counts) > 1 and stats.slot_counts <= {10, 8, 4, 2, 1}, stats.slot_counts


def test_the_cache_grows_in_phases_and_changes_no_result(setup):
  """Generations long enough for two decode phases: the cache starts at the first phase's length
  and grows; with refills the clock also runs past the full length and the cache shifts. Neither
  changes a token, and the log-probs still equal a plain forward."""
  model, params, prompts, lengths = setup
  # EOS less likely than in the fixture, so that rows outlive the first phase.
  params = {**params, "lm_head": {"kernel": params["lm_head"]["kernel"].at[:, EOS].add(-0.6)}}
  setup = (model, params, prompts, lengths)
  ladder = engine.cache_ladder(engine.EngineControls(max_new_tokens=64, prompt_width=7, chunk=4))
  assert ladder == (7 + 32 + 4, 7 + 64 + 4)
  whole, stats = _gen(setup, slots=10, chunk=4, max_new_tokens=64)
  assert stats.cache_lengths == set(ladder) and stats.shifts == 0
  # Attention read fewer slots than a cache of the full length from the start would have.
  assert stats.slot_reads < stats.row_steps * ladder[-1]
  refilled, stats = _gen(setup, slots=3, chunk=4, max_new_tokens=64)
  assert stats.refills >= 7 and stats.shifts >= 1
  for f in ("tokens", "completion", "completion_mask", "lengths"):
    np.testing.assert_array_equal(np.asarray(getattr(refilled, f)), np.asarray(getattr(whole, f)),
                                  f)
  np.testing.assert_allclose(np.asarray(refilled.logprobs), np.asarray(whole.logprobs), atol=2e-5)
  plain = sampling.completion_logprobs(model, params, whole, temperature=1.0)
  np.testing.assert_allclose(np.asarray(whole.logprobs), np.asarray(plain), atol=2e-5)
  assert int(np.asarray(whole.lengths).max()) > 32        # some row decoded into the second phase
  # A one-off call (`gptjax sample`) and a chat stream keep one full-length cache, so one decode
  # program: the same tokens.
  full, stats = _gen(setup, slots=10, chunk=4, max_new_tokens=64, grow_cache=False)
  assert stats.cache_lengths == {ladder[-1]}
  np.testing.assert_array_equal(np.asarray(full.tokens), np.asarray(whole.tokens))
  stats = engine.EngineStats()
  streamed = list(engine.stream(model, params, prompts[0, :lengths[0]].tolist(), rng=7,
                                max_new_tokens=64, eos_ids=(EOS,), pad_id=0, stats=stats))
  assert len(stats.cache_lengths) == 1 and streamed


def test_grpo_micro_run_with_engine_rollouts(tmp_path):
  """RL rollouts from the engine (`rl.rollout_engine`; here with fewer slots than rows, so
  finished rows are refilled): the run trains end to end, the KL starts at exactly 0 (the
  engine's rollouts are scored by the same plain forward as the reference), the decode cost is
  reported, and a run stopped after one iteration resumes bitwise (the engine's draws are a
  function of the seed and the iteration, not of the process that made them)."""
  import json
  import os
  from gptjax import config as config_lib
  from gptjax.stages import run_stage
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "rl.py")
  run = lambda wd, n: run_stage(config_lib.load(f"{path}:grpo_micro", [
      f"rl.iterations={n}", "rl.rollout_engine=True", "rl.engine_slots=8"]), str(wd),
      progress=False)
  straight = run(tmp_path / "straight", 2)
  cfg = config_lib.load(f"{path}:grpo_micro", [])
  its = [json.loads(l) for l in open(tmp_path / "straight" / "rl_iterations.jsonl")]
  assert len(its) == 2 and its[0]["rl/kl"] == 0.0
  rows = cfg.rl.prompts_per_iteration * cfg.rl.group_size
  for it in its:
    assert 0 < it["rl/decode_row_steps"] <= rows * cfg.rl.max_new_tokens + 8 * 16
    assert it["rl/rollout_engine"] == 1.0
  run(tmp_path / "split", 1)
  resumed = run(tmp_path / "split", 2)
  assert resumed.step == straight.step
  for x, y in zip(jax.tree.leaves(jax.device_get(straight.state.params)),
                  jax.tree.leaves(jax.device_get(resumed.state.params))):
    np.testing.assert_array_equal(x, y)
  got = [json.loads(l) for l in open(tmp_path / "split" / "rl_iterations.jsonl")]
  assert [i["rl/score"] for i in got] == [i["rl/score"] for i in its]


def test_stream_yields_request_zero_of_generate(setup):
  """`engine.stream` (gptjax chat) draws with the keys of `generate`'s request 0, so a streamed
  reply is the batched one; greedy, it also equals the static sampler's stream."""
  model, params, prompts, lengths = setup
  for i in (0, 3):
    ids = prompts[i, :lengths[i]].tolist()
    got = list(engine.stream(model, params, ids, rng=7, max_new_tokens=20, eos_ids=(EOS,),
                             pad_id=0))
    out = engine.generate(model, params, prompts[i:i + 1], lengths[i:i + 1], rng=7,
                          max_new_tokens=20, eos_ids=(EOS,), pad_id=0, slots=1)
    assert got == np.asarray(out.completion)[0, :int(out.lengths[0])].tolist()
    greedy = list(engine.stream(model, params, ids, rng=0, max_new_tokens=20, temperature=0.0,
                                eos_ids=(EOS,), pad_id=0))
    static = list(sampling.stream(model, params, ids, rng=0, max_new_tokens=20,
                                  temperature=0.0, eos_ids=(EOS,), pad_id=0))
    assert greedy == static


def test_best_of_n_samplers_run_on_the_engine(setup):
  """Best-of-N's samplers (`sample_replies(engine=True)`, the reward stage's;
  `evaluate_policy(engine=...)`, the comparison's): greedy replies equal the static sampler's,
  and sampled ones are the engine's draws under each batch's key."""
  model, params, prompts, lengths = setup
  ids = [prompts[i, :lengths[i]].tolist() for i in range(len(lengths))]
  kw = dict(max_new_tokens=12, pad_id=0, eos_ids=(EOS,), batch_size=4)
  greedy_engine, ended_engine = sampling.sample_replies(model, params, ids, seed=3,
                                                        temperature=0.0, engine=True, **kw)
  greedy_static, ended_static = sampling.sample_replies(model, params, ids, seed=3,
                                                        temperature=0.0, **kw)
  assert greedy_engine == greedy_static and (ended_engine == ended_static).all()
  drawn, _ = sampling.sample_replies(model, params, ids, seed=3, engine=True, **kw)
  static, _ = sampling.sample_replies(model, params, ids, seed=3, **kw)
  assert drawn != static                 # the engine's keys are per request, not per batch
  arr, lens = sampling.pad_prompts(ids[4:8], pad_id=0, rows=4, width=max(map(len, ids)))
  out = engine.generate(model, params, arr, lens, rng=jax.random.fold_in(jax.random.key(3), 1),
                        max_new_tokens=12, eos_ids=(EOS,), pad_id=0, slots=4)
  want = [np.asarray(out.completion)[r, :int(out.lengths[r])].tolist() for r in range(4)]
  assert drawn[4:8] == want


def test_supports_names_what_sends_a_caller_to_the_static_sampler():
  assert engine.supports()
  assert not engine.supports(repetition_penalty=1.2)
  assert not engine.supports(stop_sequences=((5, 6),))
  assert engine.supports(stop_sequences=((),))          # an empty --stop is no stop string
  assert engine.supports(params={"w": jnp.ones(3)})     # whole on this (the only) process


def test_evaluate_policy_on_the_engine_greedy_equals_the_static_sampler(monkeypatch):
  """The comparison's best-of-N curve samples through `evaluate_policy(engine=True)`: greedy,
  its replies are the static sampler's, and the engine is what decoded them."""
  from gptjax import evaluation
  from gptjax.data.tokenizers import CharTokenizer
  tok = CharTokenizer("abcdefgh ?!")
  model = GPT(ModelConfig(vocab_size=tok.vocab_size, num_layers=1, num_heads=2, d_model=16,
                          max_len=64))
  params = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"])
  calls = []
  real = engine.generate
  monkeypatch.setattr(engine, "generate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
  kw = dict(prompts=["ab", "cd e", "fgh", "a?"], max_new_tokens=10, temperature=0.0,
            prompt_len=16, batch_size=2, num_samples=4)
  on_engine = evaluation.evaluate_policy((model, params, tok), engine=True, **kw)
  assert len(calls) == 2                                  # one engine run per batch
  static = evaluation.evaluate_policy((model, params, tok), engine=False, **kw)
  assert len(calls) == 2
  assert [s["reply"] for s in on_engine["samples"]] == [s["reply"] for s in static["samples"]]
  assert on_engine["eos_fraction"] == static["eos_fraction"]
