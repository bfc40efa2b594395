"""ORPO: monolithic preference optimisation without a reference model (Hong et al., 2024).

SFT on the chosen reply plus an odds-ratio term that pushes the chosen reply's odds above the
rejected one's. With P(y|x) = exp(mean_t log π(y_t)) (the length-normalised likelihood) and
odds(y) = P / (1 − P):

    L = NLL(y_w) + λ · −log σ( log odds(y_w) − log odds(y_l) )

where NLL is the mean token cross-entropy of the chosen replies and log odds(y) =
log P − log(1 − P). λ is `loss.beta` (TRL's name; 0.1 there and here). One training stage does
what SFT then DPO would, so ORPO needs no reference log-probs (the batch's are zeros, unused).
"""

import jax
import jax.numpy as jnp

from gptjax import batches
from gptjax.losses import dpo as dpo_losses
from gptjax.objectives import Objective, register


def orpo_loss(logp_w, mask_w, logp_l, mask_l, *, beta: float = 0.1):
  """ORPO from per-token reply log-probs and masks [B,T] each -> (loss, metrics)."""
  mask_w, mask_l = mask_w.astype(jnp.float32), mask_l.astype(jnp.float32)
  avg_w = jnp.sum(logp_w * mask_w, 1) / jnp.maximum(mask_w.sum(1), 1.0)
  avg_l = jnp.sum(logp_l * mask_l, 1) / jnp.maximum(mask_l.sum(1), 1.0)
  nll = -jnp.sum(logp_w * mask_w) / jnp.maximum(mask_w.sum(), 1.0)
  # log(1 − P) with P = exp(avg) < 1: log1p(−exp(avg)) stays accurate near P = 0.
  log_odds = (avg_w - avg_l) - (jnp.log1p(-jnp.exp(avg_w)) - jnp.log1p(-jnp.exp(avg_l)))
  ratio = jax.nn.log_sigmoid(log_odds)
  loss = nll - beta * ratio.mean()
  return loss, {"orpo/nll": nll, "orpo/log_odds_ratio": log_odds.mean(),
                "orpo/accuracy": (log_odds > 0).astype(jnp.float32).mean(),
                "orpo/chosen_logp": avg_w.mean(), "orpo/rejected_logp": avg_l.mean()}


def orpo(params, batch, *, frozen=None, rng=None, model, beta: float = 0.1):
  del frozen, rng
  lp, mask = dpo_losses.reply_logps(model, params, batch.chosen, batch.rejected)
  n = batch.chosen.inputs.shape[0]
  return orpo_loss(lp[:n], mask[:n], lp[n:], mask[n:], beta=beta)


register(Objective(
    name="orpo", loss=orpo, runner="preference", batch=batches.DPOBatch, compared=True,
    description="SFT on the chosen reply + an odds-ratio term; no reference model"))
