"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al., 2024, "Back to Basics").

Each prompt gets k samples. A sample's reward is its score minus the KL penalty (the KL goes into
the reward, summed over the sample's tokens), and its baseline is the mean reward of the other
k − 1 samples of the same prompt:

    r_i = score_i − β Σ_t KL_t(i)          A_i = r_i − 1/(k−1) Σ_{j≠i} r_j

A_i applies to every token of sample i. No critic: the other samples are the baseline, which is
unbiased because they do not depend on sample i. The loss is the clipped surrogate averaged over
tokens, so several epochs over one rollout batch stay close to π_old.
"""

import jax.numpy as jnp

from gptjax import batches
from gptjax.losses import policy
from gptjax.objectives import Objective, register
from gptjax.rl import kl as kl_lib
from gptjax.rl import rollout


def leave_one_out_advantages(rewards, *, group_size: int):
  """A_i = r_i − mean of the other samples' rewards of its group. rewards [B] with the k samples
  of a prompt in consecutive rows -> [B]."""
  b = rewards.shape[0]
  r = rewards.reshape(b // group_size, group_size)
  others = (r.sum(axis=1, keepdims=True) - r) / (group_size - 1)
  return (r - others).reshape(b)


def advantages(s: rollout.Scored) -> rollout.Advantages:
  c = s.cfg
  kl = kl_lib.kl_estimate(s.old_logp, s.ref_logp, estimator=c.kl_estimator) * s.mask
  rewards = s.scores - s.beta * jnp.sum(kl, axis=1)
  seq_adv = leave_one_out_advantages(rewards, group_size=c.group_size)
  adv = seq_adv[:, None] * s.mask
  return rollout.Advantages(adv, jnp.zeros_like(adv), s.mask, kl, {})


def rloo(params, batch, *, frozen=None, rng=None, model, temperature: float = 1.0,
         clip_eps: float = 0.2):
  """Token mean of the clipped surrogate over the leave-one-out advantages in the batch."""
  del frozen, rng
  return policy.critic_free_clipped(params, batch, model=model, temperature=temperature,
                                    clip_eps=clip_eps)


register(Objective(
    name="rloo", loss=rloo, runner="rl", batch=batches.RolloutBatch,
    needs=frozenset({"reference", "group", "reward"}), kl="reward", advantages=advantages,
    shared=("temperature",), sampler_old_logp=True, compared=True,
    description="REINFORCE, leave-one-out baseline over k samples, KL in the reward"))
