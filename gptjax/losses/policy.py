"""Policy-gradient losses over a `RolloutBatch`: PPO (clipped policy + clipped value loss) and
GRPO (clipped policy with separate low/high bounds + k3 KL to the reference).

Both recompute log π of the sampled tokens with a plain forward at the sampling temperature
(`token_logprobs`, the path the sampler and the reference use), so on the first minibatch of an
iteration the ratio is 1 and the clip fraction 0. Dropout is always off: a dropout mask would make
π_θ differ from the π_old the rollouts were scored with, so the ratio would not start at 1.

The rollout's rewards, reference log-probs, old values and advantages are inputs (computed outside
the step by `gptjax.rl.rollout`); these losses only differentiate.

Each registered loss is a thin wrapper: `policy_forward` gives log π, and a model-free function of
log-probs, masks and advantages does the rest, so it can be tested (and reused by new
objectives) without a model:

    clipped_surrogate(logp, old_logp, advantages, mask, *, clip_eps_low, clip_eps_high)
    ppo_value_loss(values, old_values, returns, mask, *, value_clip_eps)
    grpo_objective(logp, old_logp, ref_logp, advantages, mask, *, ...)
    aggregate(per_token, mask, mode=..., max_len=...)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax.losses import common, register

AGGREGATIONS = ("seq_mean", "token_mean", "dr_grpo")


def policy_forward(model, params, batch, *, temperature: float):
  """(log π(targets) [B,T], entropy [B,T], values [B,T] or None) at the sampling temperature."""
  out = model.apply({"params": params}, batch.inputs, positions=batch.positions,
                    segment_ids=batch.segment_ids, deterministic=True)
  logp = common.token_logprobs(out.logits, batch.targets, temperature=temperature)
  # Entropy is a diagnostic: no gradient, and it reuses logp's normaliser instead of a second
  # log-softmax over [B,T,V] (the largest arrays in the step).
  logits = jax.lax.stop_gradient(out.logits.astype(jnp.float32) / temperature)
  logz = jax.nn.logsumexp(logits, axis=-1)
  probs = jnp.exp(logits - logz[..., None])
  ent = logz - jnp.sum(probs * logits, axis=-1)
  return logp, ent, out.values


def ratio_stats(logp, old_logp, mask, advantages, *, low: float, high: float):
  """(ratio [B,T], diagnostics). Two clip fractions: `rl/clipfrac`, every ratio outside
  [1 − low, 1 + high]; `rl/clipfrac_binding`, only the clips that change the gradient (ratio below
  the band where A < 0, above it where A > 0; TRL reports this one). The surrogate is flat in θ at
  a binding clip, so that fraction is the share of tokens that stopped learning this step."""
  log_ratio = (logp - old_logp) * mask
  ratio = jnp.exp(log_ratio)
  below, above = ratio < 1.0 - low, ratio > 1.0 + high
  clipped = below | above
  binding = (below & (advantages < 0)) | (above & (advantages > 0))
  return ratio, {
      "rl/approx_kl": common.masked_mean(0.5 * jnp.square(log_ratio), mask),
      "rl/clipfrac": common.masked_mean(clipped.astype(jnp.float32), mask),
      "rl/clipfrac_binding": common.masked_mean(binding.astype(jnp.float32), mask),
      "rl/ratio_mean": common.masked_mean(ratio, mask),
  }


def clipped_surrogate(logp, old_logp, advantages, mask, *, clip_eps_low: float,
                      clip_eps_high: float):
  """Per-token −min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high)A) with ρ = exp(log π − log π_old), and
  the ratio diagnostics. [B,T] each -> ([B,T], metrics). Masked positions are 0."""
  ratio, metrics = ratio_stats(logp, old_logp, mask, advantages, low=clip_eps_low,
                               high=clip_eps_high)
  pg = jnp.maximum(-advantages * ratio,
                   -advantages * jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high))
  return pg, metrics


def ppo_value_loss(values, old_values, returns, mask, *, value_clip_eps: float):
  """PPO's clipped value loss ½·mean max((V − R)², (V_clipped − R)²), and its clip fraction."""
  v_clipped = old_values + jnp.clip(values - old_values, -value_clip_eps, value_clip_eps)
  vf = jnp.maximum(jnp.square(values - returns), jnp.square(v_clipped - returns))
  clipfrac = common.masked_mean(
      (jnp.abs(values - old_values) > value_clip_eps).astype(jnp.float32), mask)
  return 0.5 * common.masked_mean(vf, mask), clipfrac


def k3(logp, ref_logp):
  """k3 = exp(ref − logp) − (ref − logp) − 1: unbiased for KL(π‖π_ref), never negative."""
  d = ref_logp - logp
  return jnp.expm1(d) - d


def check_grpo(*, aggregation: str = "seq_mean", **_):
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"loss.aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")


def aggregate(per_token, mask, *, mode: str, max_len: int | None = None):
  """Reduces a per-token loss [B,T] over `mask`:
    seq_mean   mean over sequences of each sequence's token mean (GRPO as published); rows with
               no tokens (filtered groups) count for nothing
    token_mean sum over all tokens / number of tokens (DAPO): long answers weigh more
    dr_grpo    sum over all tokens / (B · max_len) (Dr. GRPO): a constant normaliser, so neither
               length nor batch composition rescales a token's gradient. `max_len` is the
               completion budget (the RL stage passes rl.max_new_tokens); without it the width T
               of the arrays is used, which includes the prompt, so say which you mean.
  """
  check_grpo(aggregation=mode)
  mask = mask.astype(jnp.float32)
  if mode == "seq_mean":
    n_tok = mask.sum(axis=1)
    per_seq = jnp.sum(per_token * mask, axis=1) / jnp.maximum(n_tok, 1.0)
    n_seq = jnp.sum((n_tok > 0).astype(jnp.float32))
    return jnp.sum(per_seq) / jnp.maximum(n_seq, 1.0)
  if mode == "token_mean":
    return jnp.sum(per_token * mask) / jnp.maximum(mask.sum(), 1.0)
  length = per_token.shape[1] if max_len is None else max_len          # dr_grpo
  return jnp.sum(per_token * mask) / (per_token.shape[0] * length)


def grpo_objective(logp, old_logp, ref_logp, advantages, mask, *, clip_eps_low: float = 0.2,
                   clip_eps_high: float = 0.2, kl_coef: float = 0.04,
                   aggregation: str = "seq_mean", max_len: int | None = None):
  """GRPO from log-probs: per token the clipped surrogate + β·k3(π, π_ref), reduced by
  `aggregation`. [B,T] each -> (loss, metrics)."""
  pg, metrics = clipped_surrogate(logp, old_logp, advantages, mask, clip_eps_low=clip_eps_low,
                                  clip_eps_high=clip_eps_high)
  kl = k3(logp, ref_logp)
  per_token = pg + kl_coef * kl
  loss = aggregate(per_token, mask, mode=aggregation, max_len=max_len)
  metrics.update({
      "rl/policy_loss": aggregate(pg, mask, mode=aggregation, max_len=max_len),
      "rl/kl_loss": common.masked_mean(kl, mask),
  })
  return loss, metrics


def critic_free_clipped(params, batch, *, model, temperature: float, clip_eps: float):
  """Token mean of the clipped surrogate over advantages computed outside the step, no value
  loss: the shared body of the REINFORCE-family objectives (RLOO, REINFORCE++), which differ only
  in how their advantages are estimated."""
  mask = batch.completion_mask.astype(jnp.float32)
  logp, ent, _ = policy_forward(model, params, batch, temperature=temperature)
  pg, metrics = clipped_surrogate(logp, batch.old_logp, batch.advantages, mask,
                                  clip_eps_low=clip_eps, clip_eps_high=clip_eps)
  loss = common.masked_mean(pg, mask)
  metrics.update({"rl/policy_loss": loss, "rl/entropy": common.masked_mean(ent, mask)})
  return loss, metrics


@register("ppo")
def ppo(params, batch, *, frozen=None, rng=None, model, temperature: float = 1.0,
        clip_eps: float = 0.2, value_clip_eps: float = 0.2, vf_coef: float = 0.1,
        entropy_coef: float = 0.0):
  """InstructGPT-style PPO: −min(ρA, clip(ρ, 1±ε)A) token mean + vf_coef · clipped value loss.

  The KL penalty is already in the rewards behind `batch.advantages`. Needs a model that returns
  values (a scalar head on the policy, or `rl.rollout.ActorCritic`).
  """
  del frozen, rng
  mask = batch.completion_mask.astype(jnp.float32)
  logp, ent, values = policy_forward(model, params, batch, temperature=temperature)
  if values is None:
    raise ValueError("loss 'ppo' needs a value model: set model.scalar_head=True or "
                     "rl.value_model='critic'")
  pg, metrics = clipped_surrogate(logp, batch.old_logp, batch.advantages, mask,
                                  clip_eps_low=clip_eps, clip_eps_high=clip_eps)
  pg_loss = common.masked_mean(pg, mask)
  vf_loss, value_clipfrac = ppo_value_loss(values, batch.values, batch.returns, mask,
                                           value_clip_eps=value_clip_eps)
  entropy = common.masked_mean(ent, mask)
  loss = pg_loss + vf_coef * vf_loss - entropy_coef * entropy
  metrics.update({"rl/policy_loss": pg_loss, "rl/value_loss": vf_loss, "rl/entropy": entropy,
                  "rl/value_clipfrac": value_clipfrac})
  return loss, metrics


@register("grpo", check=check_grpo)
def grpo(params, batch, *, frozen=None, rng=None, model, temperature: float = 1.0,
         clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, kl_coef: float = 0.04,
         aggregation: str = "seq_mean", max_len: int | None = None):
  """GRPO (Shao et al., 2024): per token −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) + β·k3(π, π_ref),
  reduced by `aggregation`. `batch.advantages` holds each sequence's group-normalised advantage
  on its completion tokens; rows of filtered groups have an all-zero completion mask. The RL stage
  binds `max_len` to rl.max_new_tokens, the completion budget (Dr. GRPO's normaliser)."""
  del frozen, rng
  mask = batch.completion_mask.astype(jnp.float32)
  logp, ent, _ = policy_forward(model, params, batch, temperature=temperature)
  loss, metrics = grpo_objective(logp, batch.old_logp, batch.ref_logp, batch.advantages, mask,
                                 clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
                                 kl_coef=kl_coef, aggregation=aggregation, max_len=max_len)
  metrics["rl/entropy"] = common.masked_mean(ent, mask)
  return loss, metrics
