"""Direct preference optimisation over a `DPOBatch`: DPO (Rafailov et al., 2023) and IPO
(Azar et al., 2023).

With h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)], each a sum over the
reply's tokens (`loss_mask`):
    dpo   −log σ(β h)   (with label smoothing ε: −(1−ε) log σ(βh) − ε log σ(−βh), cDPO)
    ipo   (h − 1/(2β))²
The reference log-probs are batch fields, computed once before training, so the reference model
is never run inside the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax.losses import common, register


def sequence_logps(model, params, chosen, rejected):
  """Summed reply log-probs of the chosen and rejected rows, in one forward over both. [B], [B]."""
  both = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), chosen, rejected)
  out = model.apply({"params": params}, both.inputs, positions=both.positions,
                    segment_ids=both.segment_ids, deterministic=True)
  lp = common.token_logprobs(out.logits, both.targets)
  seq = jnp.sum(lp * both.loss_mask.astype(jnp.float32), axis=1)
  b = chosen.inputs.shape[0]
  return seq[:b], seq[b:]


def _preference(params, batch, *, model, beta: float, kind: str, label_smoothing: float = 0.0):
  logp_w, logp_l = sequence_logps(model, params, batch.chosen, batch.rejected)
  chosen_ratio = logp_w - batch.ref_chosen_logp
  rejected_ratio = logp_l - batch.ref_rejected_logp
  h = chosen_ratio - rejected_ratio
  if kind == "dpo":
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
              - label_smoothing * jax.nn.log_sigmoid(-beta * h))
  else:
    losses = jnp.square(h - 1.0 / (2.0 * beta))
  chosen_reward = beta * chosen_ratio
  rejected_reward = beta * rejected_ratio
  metrics = {
      "dpo/chosen_reward": chosen_reward.mean(),
      "dpo/rejected_reward": rejected_reward.mean(),
      "dpo/accuracy": (chosen_reward > rejected_reward).astype(jnp.float32).mean(),
      "dpo/margin": (chosen_reward - rejected_reward).mean(),
      "dpo/chosen_logp": logp_w.mean(),
      "dpo/rejected_logp": logp_l.mean(),
  }
  return losses.mean(), metrics


@register("dpo")
def dpo(params, batch, *, frozen=None, rng=None, model, beta: float = 0.1,
        label_smoothing: float = 0.0):
  del frozen, rng
  return _preference(params, batch, model=model, beta=beta, kind="dpo",
                     label_smoothing=label_smoothing)


@register("ipo")
def ipo(params, batch, *, frozen=None, rng=None, model, beta: float = 0.1):
  del frozen, rng
  return _preference(params, batch, model=model, beta=beta, kind="ipo")
