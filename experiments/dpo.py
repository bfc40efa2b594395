"""DPO from the SFT model on preference pairs (the rm_data files).

    gptjax train --config experiments/dpo.py:tiny --workdir runs/dpo \
        --config.train.init_from=runs/sft --config.data.tokenizer=runs/sft \
        --config.data.train_source=preference_jsonl:runs/rm_data/train.jsonl \
        --config.data.eval_source=preference_jsonl:runs/rm_data/validation.jsonl

Every offline objective's preset is this one with its own loss (ipo.py, orpo.py, simpo.py, kto.py).
"""

from .common import policy_config


def preference_config(size: str, *, loss: dict, stage: str = "dpo"):
  return policy_config(size, stage=stage, online=False, loss=loss)


def get_config(arg=None):
  return preference_config(arg or "tiny", loss=dict(name="dpo", beta=0.1, label_smoothing=0.0))
