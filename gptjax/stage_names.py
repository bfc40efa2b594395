"""The names of the pipeline's stages and the layout of a run directory, in one small module that
the pipeline, the comparison and the report card all read (so none of them imports another)."""

import os

ALL_STAGES = ("tokenizer", "pretrain", "sft", "rm_data", "reward", "ppo", "grpo", "dpo",
              "ppo_beta0", "compare", "report")
# The online RL stages (they read the RM and log rl/* per iteration), and the policies the
# comparison evaluates beside base, SFT and best-of-16 when they ran.
RL_STAGES = ("ppo", "grpo", "ppo_beta0")
COMPARED = ("ppo", "grpo", "dpo", "ppo_beta0")

# A run's extra seeds (`gptjax pipeline --seeds`) live in <run>/seeds/<seed>/, each laid out as a run.
SEEDS_DIR = "seeds"


def seed_dirs(run_dir: str) -> dict:
  """{seed: run directory} of a run's extra seeds (<run>/seeds/<seed>), those that exist."""
  root = os.path.join(run_dir, SEEDS_DIR)
  if not os.path.isdir(root):
    return {}
  return {int(d): os.path.join(root, d) for d in sorted(os.listdir(root), key=int)
          if d.isdigit()}
