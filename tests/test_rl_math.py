"""RL math against straightforward NumPy references: GAE with masking after end-of-turn, whitening,
GRPO group advantages and each aggregation mode, KL estimators and the adaptive controller."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.losses import policy
from gptjax.rl import advantages, kl


def _gae_reference(rewards, values, mask, gamma, lam):
  """The textbook loop over each row's completion, which ends at its last masked token."""
  adv = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    idx = np.nonzero(mask[b])[0]
    last = 0.0
    for k in reversed(range(len(idx))):
      t = idx[k]
      v_next = values[b, idx[k + 1]] if k + 1 < len(idx) else 0.0
      delta = rewards[b, t] + gamma * v_next - values[b, t]
      last = delta + gamma * lam * last
      adv[b, t] = last
  return adv, (adv + values) * mask


def _rollout_mask(rng, b, t):
  """Contiguous completions starting after a prompt, ending early (EOS) in some rows."""
  mask = np.zeros((b, t), np.float32)
  for i in range(b):
    start = rng.integers(0, t // 3)
    end = rng.integers(start + 1, t + 1)
    mask[i, start:end] = 1
  return mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_numpy(gamma, lam):
  rng = np.random.default_rng(0)
  b, t = 6, 17
  mask = _rollout_mask(rng, b, t)
  rewards = rng.normal(size=(b, t)).astype(np.float32)
  values = rng.normal(size=(b, t)).astype(np.float32)
  # Garbage outside the mask must not leak in (pad after EOS, prompt tokens).
  want_adv, want_ret = _gae_reference(rewards * mask, values * mask, mask, gamma, lam)
  adv, ret = advantages.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask),
                            gamma=gamma, lam=lam)
  np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(adv)[mask == 0] == 0)


def test_gae_terminal_reward_only_lambda1_is_monte_carlo():
  # γ = λ = 1: A_t = (sum of future rewards) − V_t.
  mask = np.array([[0, 1, 1, 1, 0]], np.float32)
  rewards = np.array([[9, 0, 0, 2.0, 9]], np.float32)
  values = np.array([[5, 0.5, 1.0, 1.5, 5]], np.float32)
  adv, ret = advantages.gae(rewards, values, mask, gamma=1.0, lam=1.0)
  np.testing.assert_allclose(np.asarray(adv), [[0, 1.5, 1.0, 0.5, 0]], atol=1e-6)
  np.testing.assert_allclose(np.asarray(ret), [[0, 2, 2, 2, 0]], atol=1e-6)


def test_whiten():
  rng = np.random.default_rng(1)
  x = rng.normal(3.0, 2.0, size=(4, 9)).astype(np.float32)
  mask = _rollout_mask(rng, 4, 9)
  sel = x[mask > 0]
  want = (x - sel.mean()) / np.sqrt(sel.var() + 1e-8) * mask
  np.testing.assert_allclose(np.asarray(advantages.whiten(x, mask)), want, rtol=1e-5, atol=1e-5)
  kept = np.asarray(advantages.whiten(x, mask, shift_mean=False))
  np.testing.assert_allclose(kept, (want + sel.mean()) * mask, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages(scale):
  scores = np.array([1.0, 0.0, 0.0, 1.0,   0.5, 0.5, 0.5, 0.5,   3.0, 1.0, 2.0, 6.0], np.float32)
  adv, spread = advantages.group_advantages(jnp.asarray(scores), group_size=4,
                                            scale_by_std=scale, eps=1e-4)
  want = []
  for g in scores.reshape(3, 4):
    c = g - g.mean()
    want.append(c / (g.std(ddof=1) + 1e-4) if scale else c)
  np.testing.assert_allclose(np.asarray(adv), np.concatenate(want), rtol=1e-5, atol=1e-6)
  assert np.asarray(spread).tolist() == [True] * 4 + [False] * 4 + [True] * 4


def test_aggregation_modes_by_hand():
  per_token = np.array([[1.0, 2.0, 3.0, 0.0],
                        [4.0, 0.0, 0.0, 0.0],
                        [7.0, 7.0, 7.0, 7.0]], np.float32)
  mask = np.array([[1, 1, 1, 0],
                   [1, 0, 0, 0],
                   [0, 0, 0, 0]], np.float32)      # the third row is a filtered group
  seq = policy.aggregate(per_token, mask, mode="seq_mean")
  tok = policy.aggregate(per_token, mask, mode="token_mean")
  dr = policy.aggregate(per_token, mask, mode="dr_grpo", max_len=8)
  assert float(seq) == pytest.approx(((1 + 2 + 3) / 3 + 4 / 1) / 2)
  assert float(tok) == pytest.approx((1 + 2 + 3 + 4) / 4)
  assert float(dr) == pytest.approx((1 + 2 + 3 + 4) / (3 * 8))
  with pytest.raises(ValueError, match="aggregation"):
    policy.aggregate(per_token, mask, mode="mean")


def test_kl_estimators():
  logp = np.array([-1.0, -2.0, -0.5], np.float32)
  ref = np.array([-1.5, -1.0, -0.5], np.float32)
  r = logp - ref
  np.testing.assert_allclose(np.asarray(kl.kl_estimate(logp, ref, estimator="k1")), r, atol=1e-7)
  np.testing.assert_allclose(np.asarray(kl.kl_estimate(logp, ref, estimator="k2")), r * r / 2,
                             atol=1e-7)
  k3 = np.exp(-r) - 1 + r
  np.testing.assert_allclose(np.asarray(kl.kl_estimate(logp, ref, estimator="k3")), k3,
                             rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(kl.kl_estimate(logp, ref, estimator="k3")) >= 0)
  with pytest.raises(ValueError, match="kl_estimator"):
    kl.kl_estimate(logp, ref, estimator="k4")


def test_adaptive_controller_follows_ziegler():
  c = kl.make_controller(beta=0.1, adaptive=True, target=6.0, horizon=10_000)
  c.update(kl=9.0, n=256)                                # error 0.5 clipped to 0.2
  assert c.beta == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
  c.update(kl=5.4, n=256)                                # error -0.1
  assert c.beta == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000) * (1 - 0.1 * 256 / 10_000))
  state = c.get_state()
  d = kl.make_controller(beta=0.1, adaptive=True, target=6.0, horizon=10_000)
  d.set_state(state)
  assert d.beta == c.beta
  f = kl.make_controller(beta=0.05)
  f.update(kl=100.0, n=256)
  assert f.beta == 0.05


def test_explained_variance():
  mask = np.ones((1, 4), np.float32)
  ret = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
  assert float(advantages.explained_variance(ret, ret, mask)) == pytest.approx(1.0)
  const = np.full_like(ret, ret.mean())
  assert float(advantages.explained_variance(const, ret, mask)) == pytest.approx(0.0, abs=1e-6)
  assert math.isfinite(float(advantages.explained_variance(ret, const, mask)))
