"""The policy-optimisation presets by one name, `<objective>_<size>`: rl.py:ppo_tiny is
ppo.py:tiny, rl.py:dpo_micro is dpo.py:micro, and so on for every objective with a preset file
here (ppo, grpo, dpo, ipo, rloo, reinforce_pp, gspo, kto, orpo, simpo); rl.py:ppo_overopt is
ppo.py:overopt. Each objective's settings live in its own file.

    gptjax train --config experiments/rl.py:ppo_tiny --workdir runs/ppo \
        --config.train.init_from=runs/sft --config.data.tokenizer=runs/sft \
        --config.rl.reward_workdir=runs/reward
    gptjax train --config experiments/rl.py:dpo_tiny --workdir runs/dpo \
        --config.train.init_from=runs/sft --config.data.tokenizer=runs/sft \
        --config.data.train_source=preference_jsonl:runs/rm_data/train.jsonl \
        --config.data.eval_source=preference_jsonl:runs/rm_data/validation.jsonl
"""

import importlib
import os


def get_config(arg=None):
  preset = arg or "ppo_tiny"
  objective, _, size = preset.rpartition("_")
  here = os.path.dirname(os.path.abspath(__file__))
  if not objective or not os.path.exists(os.path.join(here, objective + ".py")) or \
      objective in ("common", "rl"):
    raise ValueError(f"unknown preset {preset!r}; expected <objective>_<micro|tiny|gpu> for an "
                     "objective with a preset file in experiments/, or ppo_overopt")
  return importlib.import_module(f"{__package__}.{objective}").get_config(size)
