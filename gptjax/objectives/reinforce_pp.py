"""REINFORCE++ (Hu, 2025): PPO's tricks without a critic.

The KL to the reference is a per-token penalty in the reward, the score is added at the last
token, and each token's return is the sum of the rewards from it to the end (γ = 1 by default,
`rl.gamma`):

    r_t = −β KL_t + [t = last] score          G_t = Σ_{s ≥ t} γ^{s−t} r_s

The advantage is G_t normalised over every completion token of the whole rollout batch (global
batch normalisation, not per prompt as GRPO's): A_t = (G_t − mean) / std. The loss is PPO's
clipped surrogate, averaged over tokens.
"""

import jax.numpy as jnp

from gptjax import batches
from gptjax.losses import common
from gptjax.losses import policy
from gptjax.objectives import Objective, register
from gptjax.rl import advantages as adv_lib
from gptjax.rl import kl as kl_lib
from gptjax.rl import rollout


def token_returns(scores, kl, mask, *, beta: float, gamma: float = 1.0):
  """G_t of the per-token rewards −β·KL_t (+ the score at each row's last masked token).
  scores [B], kl/mask [B,T] -> [B,T], zero off the mask."""
  mask = mask.astype(jnp.float32)
  last = common.last_token_index(mask)
  at_last = (jnp.arange(mask.shape[1])[None, :] == last[:, None]) * (mask.sum(1) > 0)[:, None]
  rewards = -beta * kl * mask + scores[:, None] * at_last
  # With zero values and λ = 1, GAE's advantage is exactly the discounted return-to-go.
  returns, _ = adv_lib.gae(rewards, jnp.zeros_like(rewards), mask, gamma=gamma, lam=1.0)
  return returns


def advantages(s: rollout.Scored) -> rollout.Advantages:
  c = s.cfg
  kl = kl_lib.kl_estimate(s.old_logp, s.ref_logp, estimator=c.kl_estimator) * s.mask
  returns = token_returns(s.scores, kl, s.mask, beta=s.beta, gamma=c.gamma)
  adv = adv_lib.whiten(returns, s.mask, unbiased=c.whiten_unbiased)
  return rollout.Advantages(adv, jnp.zeros_like(adv), s.mask, kl, {})


def reinforce_pp(params, batch, *, frozen=None, rng=None, model, temperature: float = 1.0,
                 clip_eps: float = 0.2):
  """Token mean of the clipped surrogate over the batch-normalised returns."""
  del frozen, rng
  return policy.critic_free_clipped(params, batch, model=model, temperature=temperature,
                                    clip_eps=clip_eps)


register(Objective(
    name="reinforce_pp", loss=reinforce_pp, runner="rl", batch=batches.RolloutBatch,
    needs=frozenset({"reference", "reward"}), kl="reward", advantages=advantages,
    shared=("temperature",), sampler_old_logp=True, compared=True,
    description="token-level KL in the reward, returns normalised over the whole batch"))
