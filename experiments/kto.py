"""KTO from the SFT model on replies labelled desirable or undesirable (kto_jsonl:PATH), or on
preference pairs split into a desirable and an undesirable reply (preference_jsonl:PATH).

    gptjax train --config experiments/kto.py:tiny --workdir runs/kto \
        --config.train.init_from=runs/sft \
        --config.data.train_source=preference_jsonl:runs/rm_data/train.jsonl
"""

from .dpo import preference_config


def get_config(arg=None):
  return preference_config(arg or "tiny", stage="kto", loss=dict(
      name="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.0))
