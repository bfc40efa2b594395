"""The Bradley–Terry reward-model loss over K ranked replies per prompt (InstructGPT, eq. 1).

    loss = −1/C(K,2) · Σ_{pairs} log σ(r_chosen − r_rejected − margin)     averaged over prompts
           + center_coef · mean_{pairs} (r_chosen + r_rejected)²       (+ ties, with tie_nu > 0)

A reply's reward r is the scalar head's value at its last real token, read from the mask (never
from the pad id), so left, right or no padding give the same score. Every pair (i, j) of the K
replies with rank[i] ≠ rank[j] is trained, the higher rank as chosen, each weighted 1/C(K,2) as in
InstructGPT (Ouyang et al. 2022, §3.5), so a prompt counts once however many replies it has; equal
ranks give no pair. K = 2 with rank (1, 0) is the usual chosen/rejected pair.

With `tie_nu` > 0, pairs of equal rank are trained too, under Davidson's extension of
Bradley–Terry to ties (R. R. Davidson, "On Extending the Bradley-Terry Model to Accommodate Ties
in Paired Comparison Experiments", JASA 65, 1970). For d = r_i − r_j:

    P(i ≻ j) = e^{d/2} / (e^{d/2} + e^{−d/2} + ν)      P(tie) = ν / (e^{d/2} + e^{−d/2} + ν)

so a tie pulls the two rewards together and a strict pair pushes them apart; ν = 0 is plain
Bradley–Terry, where a tie carries no information. Why: a labeler that calls two replies equally
good says something the plain loss throws away. With the VADER labeler most replies are neutral
(score exactly 0), and an RM that never learns they are equal ranks them at random among
themselves.

The centring term is the auxiliary loss of Eisenstein et al. 2023 ("Helping or Herding? Reward
Model Ensembles Mitigate but do not Eliminate Reward Hacking", §3, arXiv:2312.09244), the same as
TRL's `RewardTrainer(center_rewards_coefficient=…)`: the Bradley–Terry loss sees only differences,
so it leaves the mean reward free to drift; (r_c + r_r)² pins the pair's midpoint near zero.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from gptjax.losses import common, register


def pair_indices(k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """All K-choose-2 index pairs (i < j), as two static tuples."""
  pairs = list(itertools.combinations(range(k), 2))
  return tuple(i for i, _ in pairs), tuple(j for _, j in pairs)


def sequence_rewards(params, batch, *, model, rng=None):
  """r [B,K]: the scalar head at the last real token of each of the K sequences of each prompt."""
  b, k, t = batch.tokens.shape
  mask = batch.mask.reshape(b * k, t)
  out = model.apply({"params": params}, batch.tokens.reshape(b * k, t),
                    positions=batch.positions.reshape(b * k, t),
                    segment_ids=(mask > 0).astype(jnp.int32), deterministic=rng is None,
                    rngs=None if rng is None else {"dropout": rng}, compute_logits=False)
  if out.values is None:
    raise ValueError("the reward loss needs a model with model.scalar_head=True")
  return common.gather_last(out.values, mask).reshape(b, k)


def pairwise_terms(rewards, rank, present):
  """Per pair: chosen-minus-rejected reward, chosen-plus-rejected, and whether it is a pair.

  rewards, rank [B,K]; present [B,K] bool (a prompt with fewer than K replies leaves the rest
  empty) -> three [B, C(K,2)] arrays. A pair needs two present replies of different rank.
  """
  i, j = pair_indices(rewards.shape[-1])
  ri, rj = rewards[:, i], rewards[:, j]
  sign = jnp.sign(rank[:, i] - rank[:, j]).astype(jnp.float32)   # +1: i chosen, −1: j, 0: tie
  valid = (sign != 0) & present[:, i] & present[:, j]
  return sign * (ri - rj), ri + rj, valid.astype(jnp.float32)


def check_hyperparameters(*, tie_nu: float = 0.0, **_):
  if tie_nu < 0:
    raise ValueError(f"loss.tie_nu must be >= 0 (0 = plain Bradley-Terry), got {tie_nu}")


@register("reward", check=check_hyperparameters)
def reward_loss(params, batch, *, frozen=None, rng=None, model, margin: float = 0.0,
                center_coef: float = 0.0, tie_nu: float = 0.0):
  del frozen
  check_hyperparameters(tie_nu=tie_nu)       # a direct call gets the same error as a config
  rewards = sequence_rewards(params, batch, model=model, rng=rng)           # [B,K]
  present = jnp.sum(batch.mask, axis=-1) > 0                                # [B,K]
  diff, total, valid = pairwise_terms(rewards, batch.rank, present)          # [B,P]
  num_pairs = diff.shape[-1]
  # A row whose sequences are all padding (filler at the end of an evaluation pass) has no real
  # prompt; it must not dilute the mean.
  row_real = jnp.any(present, axis=-1).astype(jnp.float32)                   # [B]
  rows = jnp.maximum(jnp.sum(row_real), 1.0)
  n_valid = jnp.maximum(jnp.sum(valid), 1.0)
  metrics = {}
  if tie_nu:
    i, j = pair_indices(rewards.shape[-1])
    tie = ((batch.rank[:, i] == batch.rank[:, j]) & present[:, i] & present[:, j]
           ).astype(jnp.float32)
    d = rewards[:, i] - rewards[:, j]
    # log(e^{d/2} + e^{−d/2} + ν), the shared normaliser; `diff` is already oriented chosen-first.
    log_z = lambda x: jnp.logaddexp(jnp.logaddexp(x / 2, -x / 2), jnp.log(tie_nu))
    nll = log_z(diff - margin) - (diff - margin) / 2
    tie_nll = log_z(d) - jnp.log(tie_nu)
    tie_loss = jnp.sum(tie_nll * tie) / num_pairs / rows
    metrics.update({"rm/tie_loss": tie_loss, "rm/tie_pairs": jnp.sum(tie)})
  else:
    nll = -jax.nn.log_sigmoid(diff - margin)
    tie_loss = 0.0
  bt = jnp.sum(nll * valid) / num_pairs / rows
  loss = bt + tie_loss
  metrics.update({
      "rm/bt_loss": bt,
      "rm/accuracy": jnp.sum((diff > 0) * valid) / n_valid,
      "rm/margin": jnp.sum(diff * valid) / n_valid,
      "rm/pairs": jnp.sum(valid),
      "rm/reward_mean": common.masked_mean(rewards, present),
  })
  if center_coef:
    centre = jnp.sum(jnp.square(total) * valid) / n_valid
    loss = loss + center_coef * centre
    metrics["rm/center_loss"] = centre
  return loss, metrics
