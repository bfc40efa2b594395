"""SimPO from the SFT model on preference pairs: a length-normalised reward, a target margin γ, no
reference model.

    gptjax train --config experiments/simpo.py:tiny --workdir runs/simpo \
        --config.train.init_from=runs/sft \
        --config.data.train_source=preference_jsonl:runs/rm_data/train.jsonl
"""

from .dpo import preference_config


def get_config(arg=None):
  return preference_config(arg or "tiny", stage="simpo", loss=dict(
      name="simpo", beta=2.0, gamma=1.0, label_smoothing=0.0))
