"""REINFORCE++ from the SFT model: one sample per prompt, token-level KL in the reward, returns
normalised over the whole batch, PPO's clip, no critic.

    gptjax train --config experiments/reinforce_pp.py:tiny --workdir runs/reinforce_pp \
        --config.train.init_from=runs/sft --config.rl.reward_workdir=runs/reward
"""

from .ppo import get_config as ppo_config


def get_config(arg=None):
  size = arg or "tiny"
  c = ppo_config(size)
  c.stage = "reinforce_pp"
  c.loss = type(c.loss)(dict(name="reinforce_pp", clip_eps=0.2))
  c.rl.update(value_model="none", kl_estimator="k1", kl_adaptive=False,
              kl_coef=0.01 if size == "micro" else 0.05)
  return c
