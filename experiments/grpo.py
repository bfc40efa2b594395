"""GRPO from the SFT model: groups of samples per prompt, no critic, k3 KL in the loss.

    gptjax train --config experiments/grpo.py:tiny --workdir runs/grpo \
        --config.train.init_from=runs/sft --config.rl.reward_workdir=runs/reward
"""

from .common import policy_config


def group_config(size: str, *, stage: str, loss: dict):
  """The shape every group-sampling preset shares (GRPO's; RLOO and GSPO start from it)."""
  c = policy_config(size, stage=stage, online=True, loss=loss)
  c.rl.update(group_size=8, prompts_per_iteration=4, value_model="none", kl_coef=0.04,
              kl_estimator="k3")
  if size == "micro":
    c.rl.update(prompts_per_iteration=4, group_size=4, kl_coef=0.01)
    c.train.batch_size = 8
  elif size == "tiny":
    c.rl.update(prompts_per_iteration=8, group_size=8, iterations=30, epochs=1)
    c.train.batch_size = 32
    c.optim.lr = 1e-4
  else:
    c.rl.update(prompts_per_iteration=32, group_size=16, iterations=100, epochs=1)
    c.train.batch_size = 128
  return c


def get_config(arg=None):
  return group_config(arg or "tiny", stage="grpo", loss=dict(
      name="grpo", clip_eps_low=0.2, clip_eps_high=0.28, aggregation="seq_mean"))
