"""IPO: DPO's preset with the IPO loss. `--config.loss.length_normalize=True` divides each
log-ratio by its reply's length, as TRL's IPO does.

    gptjax train --config experiments/ipo.py:tiny --workdir runs/ipo (DPO's flags)
"""

from .dpo import preference_config


def get_config(arg=None):
  return preference_config(arg or "tiny", loss=dict(name="ipo", beta=0.1))
