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


def whiten(x, mask, *, shift_mean: bool = True, eps: float = 1e-8, unbiased: bool = False):
  """(x − mean) / std over the masked entries; the mean is put back when shift_mean is False
  (rewards are whitened that way, so their sign still means something).

  The variance is the biased one, Σ(x − mean)² / n, unless `unbiased` (divide by n − 1, as TRL's
  `masked_whiten` does by default); over a rollout batch's hundreds of tokens they differ by well
  under 1%."""
  mask = mask.astype(jnp.float32)
  n = jnp.maximum(mask.sum(), 1.0)
  mean = jnp.sum(x * mask) / n
  var = jnp.sum(jnp.square(x - mean) * mask) / (jnp.maximum(n - 1.0, 1.0) if unbiased else n)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * mask


STD_SCOPES = ("group", "batch")


def group_advantages(scores, *, group_size: int, scale_by_std: bool = True, eps: float = 1e-4,
                     std_scope: str = "group"):
  """GRPO's per-sequence advantages: each score minus its group's mean, over a std.

  scores [B] with the G = group_size samples of a prompt in consecutive rows. Returns
  (advantages [B], spread [B] bool: the group's scores are not all equal). The std is the
  unbiased one, as in DeepSeekMath and TRL: of the group (`std_scope='group'`, as published), or
  of all B scores (`'batch'`, TRL's scale_rewards='batch', which keeps a group whose scores barely
  differ from being blown up to unit scale). Dr. GRPO sets scale_by_std=False.
  """
  if std_scope not in STD_SCOPES:
    raise ValueError(f"rl.scale_rewards: expected one of {STD_SCOPES}, got {std_scope!r}")
  b = scores.shape[0]
  if b % group_size:
    raise ValueError(f"group_advantages: {b} scores do not split into groups of {group_size}")
  s = scores.astype(jnp.float32).reshape(b // group_size, group_size)
  mean = s.mean(axis=1, keepdims=True)
  centred = s - mean
  if std_scope == "group":
    std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / max(group_size - 1, 1))
  else:
    std = jnp.std(s, ddof=1) if b > 1 else jnp.zeros((), jnp.float32)
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
