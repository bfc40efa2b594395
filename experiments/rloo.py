"""RLOO from the SFT model: k samples per prompt, each baselined by the other k − 1; KL in the
reward.

    gptjax train --config experiments/rloo.py:tiny --workdir runs/rloo \
        --config.train.init_from=runs/sft --config.rl.reward_workdir=runs/reward
"""

from .grpo import group_config


def get_config(arg=None):
  c = group_config(arg or "tiny", stage="rloo", loss=dict(name="rloo", clip_eps=0.2))
  # The KL is a per-sequence penalty in the reward (k1 summed, as the paper's), not a loss term.
  c.rl.update(kl_coef=0.05, kl_estimator="k1")
  return c
