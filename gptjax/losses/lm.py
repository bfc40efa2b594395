"""Next-token cross-entropy: the pretraining loss, and SFT's (the same loss over another mask)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax.losses import register


def lm_loss(params, batch, *, frozen=None, rng=None, model, z_loss: float = 0.0,
            metric_prefix: str = "train"):
  """Mean cross-entropy over `loss_mask`, plus `z_loss · mean(logsumexp²)` (PaLM's z-loss keeps the
  softmax normaliser near 1, which stabilises low-precision training)."""
  del frozen
  out = model.apply({"params": params}, batch.inputs, positions=batch.positions,
                    segment_ids=batch.segment_ids, deterministic=rng is None,
                    rngs=None if rng is None else {"dropout": rng})
  logits = out.logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, batch.targets[..., None], axis=-1)[..., 0]
  nll = logz - target_logit
  mask = batch.loss_mask.astype(jnp.float32)
  n = jnp.maximum(mask.sum(), 1.0)
  ce = jnp.sum(nll * mask) / n
  loss = ce
  metrics = {f"{metric_prefix}/ce": ce, f"{metric_prefix}/tokens": mask.sum()}
  if z_loss:
    zl = jnp.sum(jnp.square(logz) * mask) / n
    loss = loss + z_loss * zl
    metrics[f"{metric_prefix}/z_loss"] = zl
  acc = jnp.sum((jnp.argmax(logits, -1) == batch.targets) * mask) / n
  metrics[f"{metric_prefix}/accuracy"] = acc
  return loss, metrics


@register("lm")
def lm(params, batch, *, frozen=None, rng=None, model, z_loss: float = 0.0):
  return lm_loss(params, batch, frozen=frozen, rng=rng, model=model, z_loss=z_loss)


@register("sft")
def sft(params, batch, *, frozen=None, rng=None, model, z_loss: float = 0.0):
  """SFT is the LM loss; the batch's mask already covers only the assistant's tokens."""
  return lm_loss(params, batch, frozen=frozen, rng=rng, model=model, z_loss=z_loss,
                 metric_prefix="sft")
