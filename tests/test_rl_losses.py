"""The PPO / GRPO / DPO / IPO losses on a tiny hand-built model: identical parameters give ratio 1,
KL 0 and no clipping on the first minibatch; DPO and IPO equal a hand computation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import batches, objectives
from gptjax.data import chat, tokenizers
from gptjax.losses import dpo as dpo_lib
from gptjax.losses import policy
from gptjax.model import GPT, ModelConfig
from gptjax.rl import kl as kl_lib
from gptjax.rl import rollout

TOK = tokenizers.CharTokenizer.from_text("abcde lovhr")
CFG = ModelConfig(vocab_size=TOK.vocab_size, num_layers=1, num_heads=2, d_model=16, max_len=32)


def _params(cfg, seed=0):
  model = GPT(cfg)
  return model, model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]


def _source(model, params, algorithm, prompts_per_iteration=4, **kw):
  msgs = [chat.as_messages(p) for p in ("ab", "cde", "a b", "love")]
  ids = [chat.render_prompt(m, TOK) for m in msgs]
  p = max(map(len, ids))
  prompts = np.full((len(ids), p), TOK.pad_id, np.int32)
  for i, x in enumerate(ids):
    prompts[i, :len(x)] = x
  cfg = rollout.RolloutConfig(objective=objectives.get(algorithm),
                              prompts_per_iteration=prompts_per_iteration,
                              max_new_tokens=8,
                              temperature=0.7, epochs=2, minibatch_size=4, seed=3, **kw)
  return rollout.RolloutSource(
      model=model, ref_params=params, prompts=prompts, prompt_lengths=[len(x) for x in ids],
      prompt_texts=["ab", "cde", "a b", "love"], tokenizer=TOK,
      scorer=rollout.TextScorer(rollout.make_reward_fn("char_fraction:e")), cfg=cfg,
      controller=kl_lib.make_controller(beta=0.1), eos_ids=chat.reply_stop_ids(TOK))


@dataclasses.dataclass
class _State:
  params: object


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rollout_logs_how_the_proxy_ranks_against_the_gold(sign):
  # The proxy is the fraction of 'e's; a gold that agrees with it (or reverses it) must give a
  # rank agreement of exactly +1 (or -1) on the iteration's samples, whatever their ties.
  model, params = _params(dataclasses.replace(CFG, scalar_head=True))
  src = _source(model, params, "ppo", prompts_per_iteration=16)
  proxy = rollout.make_reward_fn("char_fraction:e")
  src.gold_fn = lambda prompts, texts: sign * proxy(prompts, texts)
  src.next(_State(params))
  m = src.pop_metrics()
  assert m["rl/gold_score"] == pytest.approx(sign * m["rl/score"], abs=1e-6)
  assert m["rl/proxy_gold_spearman"] == pytest.approx(sign, abs=1e-9)


@pytest.mark.parametrize("rollout_engine", [True, False])
def test_ppo_identical_params_ratio_one_kl_zero(rollout_engine):
  """On either decoder (`rl.rollout_engine`): the recorded log-probs are a plain forward's."""
  model, params = _params(dataclasses.replace(CFG, scalar_head=True))
  src = _source(model, params, "ppo", rollout_engine=rollout_engine)
  batch = src.next(_State(params))
  m = src.pop_metrics()
  assert m["rl/kl"] == 0.0                      # same path, same temperature: exactly zero
  assert float(jnp.sum(batch.completion_mask)) > 0
  _, metrics = policy.ppo(params, batch, model=model, temperature=0.7)
  assert float(metrics["rl/ratio_mean"]) == pytest.approx(1.0, abs=1e-5)
  assert float(metrics["rl/approx_kl"]) == pytest.approx(0.0, abs=1e-9)
  assert float(metrics["rl/clipfrac"]) == 0.0
  # Old log-probs match the sampler's own (raw-logit, temperature) log-probs.
  _, out = src.sample(params, 0)
  lp = rollout.score_tokens(model, params, model, params, rollout.rollout_layout(out),
                            temperature=0.7, with_values=False)[0]
  lay = rollout.rollout_layout(out)
  picked = np.asarray(lp)[np.asarray(lay["completion_mask"]) > 0]
  sampler = np.asarray(out.logprobs)[np.asarray(out.completion_mask) > 0]
  np.testing.assert_allclose(picked, sampler, atol=2e-5)
  assert m["rl/rollout_engine"] == float(rollout_engine)


def test_engine_rollouts_are_the_engines_draws_fixed_shape_and_reproducible():
  """RL rollouts on the engine (`rl.rollout_engine`): every row is request i of
  `engine.generate` under the iteration's key (so the slot count changes no token), the arrays have the static
  sampler's fixed shapes with the mask ending at each row's stop, a fresh source with the same
  seed draws them again bitwise, and the logged cost is the engine's row-steps."""
  from gptjax import engine
  model, params = _params(CFG, seed=2)
  kw = dict(prompts_per_iteration=3, group_size=4)
  src = _source(model, params, "grpo", rollout_engine=True, **kw)
  idx, out = src.sample(params, 5)
  _, again = _source(model, params, "grpo", rollout_engine=True, **kw).sample(params, 5)
  _, fewer = _source(model, params, "grpo", rollout_engine=True, engine_slots=3,
                     **kw).sample(params, 5)
  _, static = _source(model, params, "grpo", **kw).sample(params, 5)
  key = jax.random.fold_in(jax.random.key(3 + 7919), 5)
  want = engine.generate(model, params, src.prompts[idx], src.prompt_lengths[idx], rng=key,
                         max_new_tokens=8, temperature=0.7, eos_ids=src.eos_ids,
                         pad_id=TOK.pad_id, slots=1)
  for f in ("tokens", "completion", "logprobs", "completion_mask", "lengths", "total_lengths"):
    got = np.asarray(getattr(out, f))
    assert got.shape == np.asarray(getattr(static, f)).shape, f
    # The same program again: bitwise. Other slot counts are other programs (the rows sit in
    # batches of another shape), and XLA promises no bitwise agreement between shapes: at the
    # test session's -O0 one shape's dot contracts multiply-adds and another's does not, so the
    # log-probs agree to float rounding while every token, mask and length is the same.
    np.testing.assert_array_equal(got, np.asarray(getattr(again, f)), f)
    for other in (fewer, want):
      if f == "logprobs":
        np.testing.assert_allclose(got, np.asarray(getattr(other, f)), rtol=1e-6, atol=0,
                                   err_msg=f)
      else:
        np.testing.assert_array_equal(got, np.asarray(getattr(other, f)), f)
  lengths, mask = np.asarray(out.lengths), np.asarray(out.completion_mask)
  assert (mask.sum(1) == lengths).all() and len(set(lengths.tolist())) > 1
  # The cost: never more row-steps than the static batch's worst case, 12 rows × 7 steps.
  _, m = src.make_rollouts(params, 5)
  assert 0 < m["rl/decode_row_steps"] <= 12 * 7 and m["rl/rollout_engine"] == 1.0


def test_grpo_identical_params_ratio_one_kl_zero():
  model, params = _params(CFG)
  src = _source(model, params, "grpo", prompts_per_iteration=2, group_size=2)
  batch = src.next(_State(params))
  src.pop_metrics()
  for agg in policy.AGGREGATIONS:
    _, metrics = policy.grpo(params, batch, model=model, temperature=0.7, kl_coef=0.1,
                             aggregation=agg, max_len=8)
    assert float(metrics["rl/kl_loss"]) == pytest.approx(0.0, abs=1e-9)
    assert float(metrics["rl/clipfrac"]) == 0.0
    assert float(metrics["rl/ratio_mean"]) in (pytest.approx(1.0, abs=1e-5), 0.0)


def test_ppo_clipping_by_hand():
  """A single-token batch with a known ratio: the loss is the clipped surrogate."""
  model, params = _params(dataclasses.replace(CFG, scalar_head=True))
  inputs = jnp.asarray([[TOK.bos_id, 12, 13]], jnp.int32)
  targets = jnp.asarray([[12, 13, 14]], jnp.int32)
  out = model.apply({"params": params}, inputs)
  logp = np.asarray(jax.nn.log_softmax(out.logits, -1))[0, np.arange(3), [12, 13, 14]]
  mask = np.array([[0, 0, 1]], np.float32)
  old = logp - np.log(1.5)                       # ratio 1.5 on the trained token
  b = batches.RolloutBatch(inputs=inputs, targets=targets, positions=jnp.arange(3)[None],
                           segment_ids=jnp.ones((1, 3), jnp.int32), completion_mask=mask,
                           old_logp=jnp.asarray(old[None]), ref_logp=jnp.asarray(old[None]),
                           advantages=jnp.asarray([[0, 0, 2.0]]),
                           returns=jnp.asarray([[0, 0, 1.0]]), values=out.values)
  loss, m = policy.ppo(params, b, model=model, clip_eps=0.2, vf_coef=0.0)
  assert float(m["rl/ratio_mean"]) == pytest.approx(1.5, rel=1e-5)
  assert float(m["rl/clipfrac"]) == 1.0
  assert float(loss) == pytest.approx(-2.0 * 1.2, rel=1e-5)    # min(1.5·2, 1.2·2)
  assert float(m["rl/value_loss"]) == pytest.approx(
      0.5 * (float(out.values[0, 2]) - 1.0) ** 2, rel=1e-5)


def _lm_rows(rows, t=10):
  inputs = np.full((len(rows), t), TOK.pad_id, np.int32)
  targets = np.full((len(rows), t), TOK.pad_id, np.int32)
  mask = np.zeros((len(rows), t), np.float32)
  seg = np.zeros((len(rows), t), np.int32)
  for i, (prompt, reply) in enumerate(rows):
    ids = prompt + reply
    inputs[i, :len(ids) - 1], targets[i, :len(ids) - 1] = ids[:-1], ids[1:]
    mask[i, len(prompt) - 1:len(ids) - 1] = 1
    seg[i, :len(ids) - 1] = 1
  pos = np.broadcast_to(np.arange(t), (len(rows), t))
  return batches.LMBatch(inputs=inputs, targets=targets, positions=pos, segment_ids=seg,
                         loss_mask=mask)


@pytest.mark.parametrize("kind", ["dpo", "ipo"])
def test_dpo_and_ipo_by_hand(kind):
  model, params = _params(CFG, seed=1)
  chosen = _lm_rows([([1, 5, 12], [13, 14, 7]), ([1, 5, 15], [12, 7])])
  rejected = _lm_rows([([1, 5, 12], [16, 16, 16, 7]), ([1, 5, 15], [14, 13, 7])])
  ref_c, ref_r = np.array([-9.0, -7.5], np.float32), np.array([-8.0, -9.5], np.float32)
  batch = batches.DPOBatch(chosen=chosen, rejected=rejected, ref_chosen_logp=ref_c,
                           ref_rejected_logp=ref_r)
  beta = 0.3

  def seq_logp(b):
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(b.inputs),
                                    positions=jnp.asarray(b.positions),
                                    segment_ids=jnp.asarray(b.segment_ids)).logits, np.float64)
    out = []
    for i in range(b.inputs.shape[0]):
      s = 0.0
      for t in range(b.inputs.shape[1]):
        if b.loss_mask[i, t]:
          row = logits[i, t]
          s += row[b.targets[i, t]] - np.log(np.sum(np.exp(row - row.max()))) - row.max()
      out.append(s)
    return np.array(out)

  h = (seq_logp(chosen) - ref_c) - (seq_logp(rejected) - ref_r)
  if kind == "dpo":
    want = np.mean(np.log1p(np.exp(-beta * h)))
    loss, m = dpo_lib.dpo(params, batch, model=model, beta=beta)
  else:
    want = np.mean((h - 1 / (2 * beta)) ** 2)
    loss, m = dpo_lib.ipo(params, batch, model=model, beta=beta)
  assert float(loss) == pytest.approx(want, rel=1e-4)
  cr, rr = beta * (seq_logp(chosen) - ref_c), beta * (seq_logp(rejected) - ref_r)
  assert float(m["dpo/accuracy"]) == pytest.approx(np.mean(cr > rr))
  assert float(m["dpo/margin"]) == pytest.approx(np.mean(cr - rr), rel=1e-4)
  assert float(m["dpo/chosen_reward"]) == pytest.approx(np.mean(cr), rel=1e-4)


def test_token_scorer_passes_the_real_token_mask():
  class FakeRM:
    def score_tokens(self, tokens, mask):
      return jnp.sum(mask, axis=1).astype(jnp.float32)
  s = rollout.TokenScorer(FakeRM())
  got = s(tokens=jnp.zeros((2, 6), jnp.int32), total_lengths=jnp.asarray([3, 5]))
  np.testing.assert_array_equal(got, [3.0, 5.0])
