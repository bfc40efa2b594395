"""KL estimators and the KL-coefficient controllers used by PPO and GRPO.

Estimators of KL(π ‖ π_ref) from one sample x ~ π, with log-ratio r = log π(x) − log π_ref(x)
(Schulman, "Approximating KL divergence", 2020):

    k1 = r                       unbiased, can be negative per token, high variance
    k2 = r² / 2                  biased, low variance (PPO's usual `approx_kl` diagnostic)
    k3 = exp(−r) − 1 + r         unbiased and ≥ 0 per token; GRPO's penalty

Controllers own β. `FixedKL` never moves it; `AdaptiveKL` is Ziegler et al. (2019), eq. 2:
    e = clip(KL / target − 1, −0.2, 0.2);   β ← β · (1 + e · n / horizon)
where KL is the mean per-sequence KL of an iteration and n its number of sequences. Both keep
their state as a JSON-able dict, so the trainer saves it inside each checkpoint and a resumed run
continues with the same β.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp, ref_logp, *, estimator: str = "k1"):
  """Per-token KL estimate from log π and log π_ref at the sampled tokens (any shape, elementwise)."""
  r = logp - ref_logp
  if estimator == "k1":
    return r
  if estimator == "k2":
    return 0.5 * jnp.square(r)
  if estimator == "k3":
    # exp(-r) - 1 + r loses all precision for tiny |r| as written; expm1 keeps it.
    return jnp.expm1(-r) + r
  raise ValueError(f"rl.kl_estimator: expected one of {ESTIMATORS}, got {estimator!r}")


@dataclasses.dataclass
class FixedKL:
  beta: float

  def update(self, kl: float, n: int) -> None:
    del kl, n

  def get_state(self) -> dict:
    return {"beta": float(self.beta)}

  def set_state(self, s: dict) -> None:
    self.beta = float(s["beta"])


@dataclasses.dataclass
class AdaptiveKL:
  beta: float
  target: float
  horizon: float

  def update(self, kl: float, n: int) -> None:
    error = min(max(kl / self.target - 1.0, -0.2), 0.2)
    self.beta *= 1.0 + error * n / self.horizon

  def get_state(self) -> dict:
    return {"beta": float(self.beta)}

  def set_state(self, s: dict) -> None:
    self.beta = float(s["beta"])


def make_controller(*, beta: float, adaptive: bool = False, target: float = 6.0,
                    horizon: float = 10_000.0):
  if beta < 0:
    raise ValueError(f"rl.kl_coef: must be >= 0, got {beta}")
  if adaptive:
    if target <= 0 or horizon <= 0:
      raise ValueError(f"rl.kl_target and rl.kl_horizon must be positive, got {target}, {horizon}")
    return AdaptiveKL(beta=float(beta), target=float(target), horizon=float(horizon))
  return FixedKL(beta=float(beta))
