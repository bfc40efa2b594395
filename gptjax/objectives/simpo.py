"""SimPO: simple preference optimisation with a reference-free reward (Meng et al., 2024).

The implicit reward is the length-normalised log-likelihood, β/|y| log π(y|x), and the chosen
reply must beat the rejected one by a target margin γ:

    L = −log σ( β/|y_w| log π(y_w|x) − β/|y_l| log π(y_l|x) − γ )

(with label smoothing ε: −(1−ε) log σ(z) − ε log σ(−z), as DPO's). No reference model: the batch's
reference log-probs are zeros, unused. Defaults β = 2, γ = 1 (the paper's ranges are 2–2.5 and
0.3–1.6; its γ/β ratio is what TRL's CPO trainer calls simpo_gamma).
"""

import jax
import jax.numpy as jnp

from gptjax import batches
from gptjax.losses import dpo as dpo_losses
from gptjax.objectives import Objective, register


def simpo_loss(logp_w, mask_w, logp_l, mask_l, *, beta: float = 2.0, gamma: float = 1.0,
               label_smoothing: float = 0.0):
  """SimPO from per-token reply log-probs and masks [B,T] each -> (mean loss, metrics)."""
  mask_w, mask_l = mask_w.astype(jnp.float32), mask_l.astype(jnp.float32)
  reward_w = beta * jnp.sum(logp_w * mask_w, 1) / jnp.maximum(mask_w.sum(1), 1.0)
  reward_l = beta * jnp.sum(logp_l * mask_l, 1) / jnp.maximum(mask_l.sum(1), 1.0)
  z = reward_w - reward_l - gamma
  losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z)
            - label_smoothing * jax.nn.log_sigmoid(-z))
  return losses.mean(), {"simpo/chosen_reward": reward_w.mean(),
                         "simpo/rejected_reward": reward_l.mean(),
                         "simpo/accuracy": (reward_w > reward_l).astype(jnp.float32).mean(),
                         "simpo/margin": (reward_w - reward_l).mean()}


def simpo(params, batch, *, frozen=None, rng=None, model, beta: float = 2.0,
          gamma: float = 1.0, label_smoothing: float = 0.0):
  del frozen, rng
  lp, mask = dpo_losses.reply_logps(model, params, batch.chosen, batch.rejected)
  n = batch.chosen.inputs.shape[0]
  return simpo_loss(lp[:n], mask[:n], lp[n:], mask[n:], beta=beta, gamma=gamma,
                    label_smoothing=label_smoothing)


register(Objective(
    name="simpo", loss=simpo, runner="preference", batch=batches.DPOBatch, compared=True,
    description="length-normalised likelihood as the reward, a target margin; no reference"))
