"""The names of the pipeline's stages and the layout of a run directory, in one small module that
the pipeline, the comparison and the report card all read (so none of them imports another).

The policy stages come from the objective registry: every objective marked `compared` is a stage
of its own name (`pipeline.stages=(..., 'rloo', 'kto')`), trained from SFT, compared beside base,
SFT and best-of-16, and drawn in the report card; a new objective needs no edit here. Two names
are not objectives: `ppo_beta0`, the PPO stage run with β = 0 (the over-optimisation ablation), and
the ordering of the first policies, kept as the committed report card shows them.
"""

import os

from gptjax import objectives

BEFORE = ("tokenizer", "pretrain", "sft", "rm_data", "reward")
AFTER = ("compare", "report")
# Stages that train a registered objective under another name: stage -> objective.
ABLATIONS = {"ppo_beta0": "ppo"}
_FIRST = ("ppo", "grpo", "dpo", "ppo_beta0")


def objective_of(stage: str) -> str:
  """The objective a policy stage trains."""
  return ABLATIONS.get(stage, stage)


def policy_stages() -> tuple[str, ...]:
  """The aligned-policy stages: the compared objectives and the ablations, in report order."""
  names = [o.name for o in objectives.registered() if o.compared]
  rest = [n for n in names if n not in _FIRST]
  return tuple(n for n in _FIRST if n in names or n in ABLATIONS) + tuple(rest)


def rl_stages() -> tuple[str, ...]:
  """The online policy stages (they read the RM and log rl/* per iteration)."""
  return tuple(s for s in policy_stages() if objectives.get(objective_of(s)).online)


def all_stages() -> tuple[str, ...]:
  return BEFORE + policy_stages() + AFTER


# A run's extra seeds (`gptjax pipeline --seeds`) live in <run>/seeds/<seed>/, each laid out as a run.
SEEDS_DIR = "seeds"


def seed_dirs(run_dir: str) -> dict:
  """{seed: run directory} of a run's extra seeds (<run>/seeds/<seed>), those that exist."""
  root = os.path.join(run_dir, SEEDS_DIR)
  if not os.path.isdir(root):
    return {}
  return {int(d): os.path.join(root, d) for d in sorted(os.listdir(root), key=int)
          if d.isdigit()}
