"""PPO from the SFT model against the reward model (InstructGPT style: a critic, KL in the reward).

    gptjax train --config experiments/ppo.py:tiny --workdir runs/ppo \
        --config.train.init_from=runs/sft --config.rl.reward_workdir=runs/reward

Presets: micro (tests), tiny (the CPU pipeline), gpu, and overopt: tiny with β = 0 and 40
iterations, which logs the proxy (rl/score) against the gold (rl/gold_score) and their rank
agreement every iteration, to show reward over-optimisation.
"""

from .common import policy_config


def without_kl(c, iterations: int | None = None):
  """The over-optimisation ablation of a PPO config: β = 0, no controller, gold logged."""
  c.rl.update(kl_coef=0.0, kl_adaptive=False, log_gold=True)
  if iterations:
    c.rl.iterations = iterations
  return c


def get_config(arg=None):
  size = arg or "tiny"
  if size == "overopt":
    # The tiny PPO run with nothing changed but β, so the two runs read as an ablation; 10 more
    # iterations give the drift room to show.
    return without_kl(get_config("tiny"), iterations=40)
  c = policy_config(size, stage="ppo", online=True, loss=dict(
      name="ppo", clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.1, entropy_coef=0.0))
  if size == "micro":
    c.rl.update(prompts_per_iteration=16, kl_coef=0.01)
    c.train.batch_size = 8
  elif size == "tiny":
    # A critic initialised from the RM, as in InstructGPT: a fresh value head on the policy
    # trunk stayed at explained variance ~0 for all 30 iterations (advantages were then just
    # reward minus mean); the critic reaches 0.4–0.6 and PPO's gold score rises by 40%.
    # A 1M-parameter policy needs a far larger step than the 1e-5 usual for billion-parameter
    # models: at 1e-5 the tiny PPO moved the KL by 0.06 nats in 12 iterations and the gold score
    # not at all. 1e-4 for 30 iterations raised it clearly (see README, Results).
    c.rl.update(prompts_per_iteration=32, iterations=30, epochs=2, kl_coef=0.15,
                kl_adaptive=False, value_model="critic")
    c.train.batch_size = 16
    c.optim.lr = 1e-4
  else:
    c.rl.update(prompts_per_iteration=256, iterations=100, epochs=4, kl_adaptive=True,
                kl_coef=0.1, kl_target=6.0)
    c.train.batch_size = 64
  return c
