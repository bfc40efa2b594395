"""Direct preference optimisation over a `DPOBatch`: DPO (Rafailov et al., 2023) and IPO
(Azar et al., 2023).

With h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)], each a sum over the
reply's tokens (`loss_mask`):
    dpo   −log σ(β h)   (with label smoothing ε: −(1−ε) log σ(βh) − ε log σ(−βh), cDPO)
    ipo   (h − 1/(2β))²

IPO and length. Azar et al. write h with sequence log-probs (sums), and so does `ipo` by default.
TRL's IPO divides each log-ratio by the reply's token count (its `loss_type="ipo"` averages the
log-probs), which makes 1/(2β) a per-token margin. `ipo(length_normalize=True)` does the same.
The reference log-probs are batch fields, computed once before training, so the reference model
is never run inside the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax.losses import common, register


def reply_logps(model, params, chosen, rejected):
  """Per-token reply log-probs [2B,T] (zero off `loss_mask`) of the chosen rows then the rejected
  rows, in one forward over both, and the mask [2B,T]."""
  both = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), chosen, rejected)
  out = model.apply({"params": params}, both.inputs, positions=both.positions,
                    segment_ids=both.segment_ids, deterministic=True)
  lp = common.token_logprobs(out.logits, both.targets)
  mask = both.loss_mask.astype(jnp.float32)
  return lp * mask, mask


def sequence_logps(model, params, chosen, rejected):
  """Summed reply log-probs of the chosen and rejected rows, in one forward over both. [B], [B]."""
  lp, _ = reply_logps(model, params, chosen, rejected)
  seq = jnp.sum(lp, axis=1)
  b = chosen.inputs.shape[0]
  return seq[:b], seq[b:]


def preference_metrics(chosen_reward, rejected_reward, logp_w, logp_l, prefix: str = "dpo"):
  """The usual pair diagnostics: implicit rewards, their accuracy and margin, the log-probs."""
  return {
      f"{prefix}/chosen_reward": chosen_reward.mean(),
      f"{prefix}/rejected_reward": rejected_reward.mean(),
      f"{prefix}/accuracy": (chosen_reward > rejected_reward).astype(jnp.float32).mean(),
      f"{prefix}/margin": (chosen_reward - rejected_reward).mean(),
      f"{prefix}/chosen_logp": logp_w.mean(),
      f"{prefix}/rejected_logp": logp_l.mean(),
  }


def dpo_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, *, beta: float = 0.1,
             label_smoothing: float = 0.0):
  """DPO from sequence log-probs [B] each -> (mean loss, metrics)."""
  chosen_ratio, rejected_ratio = logp_w - ref_logp_w, logp_l - ref_logp_l
  h = chosen_ratio - rejected_ratio
  losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
            - label_smoothing * jax.nn.log_sigmoid(-beta * h))
  return losses.mean(), preference_metrics(beta * chosen_ratio, beta * rejected_ratio, logp_w,
                                           logp_l)


def ipo_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, *, beta: float = 0.1,
             len_w=None, len_l=None):
  """IPO from sequence log-probs [B] each: (h − 1/(2β))². With reply lengths `len_w`, `len_l`
  [B], each log-ratio is divided by its length first (TRL's convention)."""
  chosen_ratio, rejected_ratio = logp_w - ref_logp_w, logp_l - ref_logp_l
  if len_w is not None:
    chosen_ratio = chosen_ratio / jnp.maximum(len_w, 1.0)
    rejected_ratio = rejected_ratio / jnp.maximum(len_l, 1.0)
  h = chosen_ratio - rejected_ratio
  losses = jnp.square(h - 1.0 / (2.0 * beta))
  return losses.mean(), preference_metrics(beta * chosen_ratio, beta * rejected_ratio, logp_w,
                                           logp_l)


@register("dpo")
def dpo(params, batch, *, frozen=None, rng=None, model, beta: float = 0.1,
        label_smoothing: float = 0.0):
  del frozen, rng
  logp_w, logp_l = sequence_logps(model, params, batch.chosen, batch.rejected)
  return dpo_loss(logp_w, logp_l, batch.ref_chosen_logp, batch.ref_rejected_logp, beta=beta,
                  label_smoothing=label_smoothing)


@register("ipo")
def ipo(params, batch, *, frozen=None, rng=None, model, beta: float = 0.1,
        length_normalize: bool = False):
  del frozen, rng
  logp_w, logp_l = sequence_logps(model, params, batch.chosen, batch.rejected)
  lengths = {}
  if length_normalize:
    lengths = dict(len_w=batch.chosen.loss_mask.astype(jnp.float32).sum(1),
                   len_l=batch.rejected.loss_mask.astype(jnp.float32).sum(1))
  return ipo_loss(logp_w, logp_l, batch.ref_chosen_logp, batch.ref_rejected_logp, beta=beta,
                  **lengths)
