"""The batch type of each stage. All are pytrees of fixed-shape arrays, so one jitted step can
take any of them; the loss registered for a stage knows how to read its batch.

Token conventions (shared by every stage):
  * `targets[b, t]` is the token predicted from `inputs[b, :t+1]`.
  * `loss_mask[b, t]` weights the prediction of `targets[b, t]` (1 = trained).
  * `segment_ids` number the documents in a packed row from 1; 0 marks padding.
  * `positions` restart at 0 at each document.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import struct


@struct.dataclass
class LMBatch:
  """Pretraining and SFT: packed documents; SFT's mask covers assistant tokens only. [B, T]."""
  inputs: jax.Array
  targets: jax.Array
  positions: jax.Array
  segment_ids: jax.Array
  loss_mask: jax.Array

  @classmethod
  def from_dict(cls, d) -> "LMBatch":
    return cls(inputs=d["inputs"], targets=d["targets"], positions=d["positions"],
               segment_ids=d["segment_ids"], loss_mask=d["loss_mask"])


@struct.dataclass
class RewardBatch:
  """K replies per prompt, each a full sequence. tokens/mask [B, K, T]; rank [B, K].

  `mask` is 1 on real tokens (prompt and reply) so the score is read at the last real token.
  `rank` orders the replies: a pair (i, j) is trained when rank[i] > rank[j]; equal ranks give no
  pair. With K = 2 and rank = (1, 0) this is the usual chosen/rejected pair.
  """
  tokens: jax.Array
  positions: jax.Array
  mask: jax.Array
  rank: jax.Array


@struct.dataclass
class DPOBatch:
  """Chosen and rejected sequences with reference log-probs computed once, up front. [B, T]/[B]."""
  chosen: LMBatch
  rejected: LMBatch
  ref_chosen_logp: jax.Array
  ref_rejected_logp: jax.Array


@struct.dataclass
class RolloutBatch:
  """A minibatch of rollouts for PPO / GRPO. Per-token fields are [B, T] over `targets`.

  `completion_mask` is 1 on sampled completion tokens up to and including the first end-of-turn.
  `values` are the old value predictions (PPO's clipped value loss needs them); GRPO leaves
  values/returns at zero.
  """
  inputs: jax.Array
  targets: jax.Array
  positions: jax.Array
  segment_ids: jax.Array
  completion_mask: jax.Array
  old_logp: jax.Array
  ref_logp: jax.Array
  advantages: jax.Array
  returns: jax.Array
  values: jax.Array


def as_numpy(batch):
  return jax.tree.map(np.asarray, batch)


def num_rows(batch) -> int:
  return int(jax.tree.leaves(batch)[0].shape[0])
