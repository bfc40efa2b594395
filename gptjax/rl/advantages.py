"""Advantage estimators: GAE for PPO, group-normalised advantages for GRPO, and whitening.

All work on per-token arrays [B, T] laid out over a rollout's `targets`, where `mask` marks the
completion tokens (1 up to and including the first end-of-turn). The completion is one contiguous
run per row; the episode ends at the last masked token, so the value after it is 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(rewards, values, mask, *, gamma: float, lam: float):
  """Generalised advantage estimation (Schulman et al., 2016) over masked rows. [B,T] -> ([B,T],)*2.

      δ_t = r_t + γ V_{t+1} − V_t,   A_t = δ_t + γ λ A_{t+1}
  with V and A taken as 0 past the last completion token. Returns (advantages, returns), both
  zero off the mask; returns = advantages + values (the value target).
  """
  mask = mask.astype(jnp.float32)
  rewards = rewards.astype(jnp.float32) * mask
  values = values.astype(jnp.float32) * mask
  # Shifting in a zero column makes "the next token" of the last position the terminal state.
  next_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
  next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1))) * next_mask
  deltas = rewards + gamma * next_values - values

  def back(carry, xs):
    delta, nm, m = xs
    adv = (delta + gamma * lam * nm * carry) * m
    return adv, adv

  _, adv = jax.lax.scan(back, jnp.zeros(rewards.shape[0], jnp.float32),
                        (deltas.T, next_mask.T, mask.T), reverse=True)
  adv = adv.T
  return adv, (adv + values) * mask


def whiten(x, mask, *, shift_mean: bool = True, eps: float = 1e-8):
  """(x − mean) / std over the masked entries; the mean is put back when shift_mean is False
  (rewards are whitened that way, so their sign still means something)."""
  mask = mask.astype(jnp.float32)
  n = jnp.maximum(mask.sum(), 1.0)
  mean = jnp.sum(x * mask) / n
  var = jnp.sum(jnp.square(x - mean) * mask) / n
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * mask


def group_advantages(scores, *, group_size: int, scale_by_std: bool = True, eps: float = 1e-4):
  """GRPO's per-sequence advantages: each score minus its group's mean, over the group's std.

  scores [B] with the G = group_size samples of a prompt in consecutive rows. Returns
  (advantages [B], spread [B] bool: the group's scores are not all equal). The std is the
  unbiased one, as in DeepSeekMath and TRL; Dr. GRPO sets scale_by_std=False.
  """
  b = scores.shape[0]
  if b % group_size:
    raise ValueError(f"group_advantages: {b} scores do not split into groups of {group_size}")
  s = scores.astype(jnp.float32).reshape(b // group_size, group_size)
  mean = s.mean(axis=1, keepdims=True)
  centred = s - mean
  std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / max(group_size - 1, 1))
  adv = centred / (std + eps) if scale_by_std else centred
  spread = jnp.broadcast_to(jnp.max(s, 1, keepdims=True) > jnp.min(s, 1, keepdims=True), s.shape)
  return adv.reshape(b), spread.reshape(b)


def explained_variance(values, returns, mask):
  """1 − Var(returns − values) / Var(returns) over the masked tokens: 1 is a perfect critic,
  0 no better than a constant, negative worse."""
  mask = mask.astype(jnp.float32)
  n = jnp.maximum(mask.sum(), 1.0)

  def var(x):
    m = jnp.sum(x * mask) / n
    return jnp.sum(jnp.square(x - m) * mask) / n

  return 1.0 - var(returns - values) / jnp.maximum(var(returns), 1e-8)
