"""Helpers every loss shares, so that masks, log-probs and "the last real token" mean the same
thing in every stage (and in the sampler)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits, targets, *, temperature: float = 1.0):
  """log p(targets) under softmax(logits / temperature), in float32. [B,T,V],[B,T] -> [B,T].

  The sampler, the reference model and the trainer all call this, at the same temperature, so the
  KL between identical parameters is exactly zero.
  """
  logits = logits.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - logz


def entropy(logits, *, temperature: float = 1.0):
  """Entropy of softmax(logits / temperature) per position. [B,T,V] -> [B,T]."""
  logits = logits.astype(jnp.float32) / temperature
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def masked_mean(x, mask, axis=None):
  mask = mask.astype(x.dtype)
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def last_token_index(mask):
  """Index of the last 1 in each row of mask [..., T] -> [...] (0 for an all-zero row).

  Computed from the mask, never from the pad id, so it is right whatever the padding side.
  """
  t = mask.shape[-1]
  idx = jnp.arange(t)
  return jnp.max(jnp.where(mask > 0, idx, 0), axis=-1)


def gather_last(x, mask):
  """x [..., T] read at the last real token of mask [..., T] -> [...]."""
  i = last_token_index(mask)
  return jnp.take_along_axis(x, i[..., None], axis=-1)[..., 0]
