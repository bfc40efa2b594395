"""GSPO from the SFT model: GRPO's groups with a length-normalised sequence-level ratio, no KL.

    gptjax train --config experiments/gspo.py:tiny --workdir runs/gspo \
        --config.train.init_from=runs/sft --config.rl.reward_workdir=runs/reward
"""

from .grpo import group_config


def get_config(arg=None):
  c = group_config(arg or "tiny", stage="gspo", loss=dict(
      name="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4))
  c.rl.kl_coef = 0.0              # GSPO has no KL term; rl/kl is still measured
  return c
