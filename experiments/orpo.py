"""ORPO from the SFT model on preference pairs: SFT on the chosen reply plus an odds-ratio term,
no reference model.

    gptjax train --config experiments/orpo.py:tiny --workdir runs/orpo \
        --config.train.init_from=runs/sft \
        --config.data.train_source=preference_jsonl:runs/rm_data/train.jsonl
"""

from .dpo import preference_config


def get_config(arg=None):
  return preference_config(arg or "tiny", stage="orpo", loss=dict(name="orpo", beta=0.1))
