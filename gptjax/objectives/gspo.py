"""GSPO: group sequence policy optimisation (Zheng et al., 2025).

Advantages are GRPO's (each score against its group). The importance ratio is the sequence's,
length-normalised: the geometric mean of its token ratios,

    s_i = exp( 1/|y_i| Σ_t [log π(y_i,t) − log π_old(y_i,t)] )

and the clipped objective is applied once per sequence, then averaged over sequences:

    L = −1/G Σ_i min(s_i A_i, clip(s_i, 1 − ε_low, 1 + ε_high) A_i)

The length normalisation keeps s_i near 1 for long sequences, so the clip range is narrow (the
paper uses ε of a few 1e-4). No KL term (the paper drops it).
"""

import jax
import jax.numpy as jnp

from gptjax import batches
from gptjax.losses import common
from gptjax.losses import policy
from gptjax.objectives import Objective, register
from gptjax.rl import rollout


def gspo_objective(logp, old_logp, advantages, mask, *, clip_eps_low: float = 3e-4,
                   clip_eps_high: float = 4e-4):
  """GSPO from log-probs [B,T] and per-token advantages [B,T] (one value per row on its
  tokens) -> (loss, metrics). Rows with no tokens count for nothing."""
  mask = mask.astype(jnp.float32)
  n_tok = mask.sum(axis=1)
  has = (n_tok > 0).astype(jnp.float32)
  log_s = jnp.sum((logp - old_logp) * mask, axis=1) / jnp.maximum(n_tok, 1.0)
  s = jnp.exp(log_s)
  adv = jnp.sum(advantages * mask, axis=1) / jnp.maximum(n_tok, 1.0)
  per_seq = jnp.maximum(-adv * s, -adv * jnp.clip(s, 1.0 - clip_eps_low, 1.0 + clip_eps_high))
  n_seq = jnp.maximum(has.sum(), 1.0)
  loss = jnp.sum(per_seq * has) / n_seq
  clipped = ((s < 1.0 - clip_eps_low) & (adv < 0)) | ((s > 1.0 + clip_eps_high) & (adv > 0))
  return loss, {"rl/policy_loss": loss,
                "rl/seq_ratio_mean": jnp.sum(s * has) / n_seq,
                "rl/clipfrac_binding": jnp.sum(clipped * has) / n_seq,
                "rl/approx_kl": jnp.sum(jax.lax.stop_gradient(0.5 * jnp.square(log_s)) * has)
                / n_seq}


def gspo(params, batch, *, frozen=None, rng=None, model, temperature: float = 1.0,
         clip_eps_low: float = 3e-4, clip_eps_high: float = 4e-4):
  del frozen, rng
  mask = batch.completion_mask.astype(jnp.float32)
  logp, ent, _ = policy.policy_forward(model, params, batch, temperature=temperature)
  loss, metrics = gspo_objective(logp, batch.old_logp, batch.advantages, mask,
                                 clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high)
  metrics["rl/entropy"] = common.masked_mean(ent, mask)
  return loss, metrics


register(Objective(
    name="gspo", loss=gspo, runner="rl", batch=batches.RolloutBatch,
    needs=frozenset({"reference", "group", "reward"}), kl="none",
    advantages=rollout.group_normalised, shared=("temperature",), sampler_old_logp=True,
    compared=True, description="GRPO's advantages, a length-normalised sequence-level ratio"))
