"""Character-level GPT on Shakespeare's plays (the embedded default corpus).

    gptjax train --config experiments/shakespeare_char.py:tiny --workdir runs/char
    gptjax train --config experiments/shakespeare_char.py:gpu --workdir runs/char_gpu

Presets: `tiny` trains in a few minutes on 2 CPU cores; `gpu` is nanoGPT's shakespeare_char size
(6 layers, 6 heads, 384 wide, block 256, dropout 0.2), bfloat16 compute.
"""

from .common import base_config


def get_config(arg=None):
  preset = arg or "tiny"
  c = base_config()
  if preset == "tiny":
    c.model.update(num_layers=4, num_heads=4, d_model=128, max_len=64, activation="gelu_tanh")
    c.data.seq_len = 64
    c.train.update(steps=600, batch_size=12, log_every=20, eval_every=200, sample_every=300,
                   checkpoint_every=200)
    c.optim.update(lr=1e-3, warmup_steps=50)
  elif preset == "micro":   # for tests: seconds, not minutes
    c.model.update(num_layers=2, num_heads=2, d_model=32, max_len=32)
    c.data.seq_len = 32
    c.train.update(steps=20, batch_size=8, log_every=5, eval_every=10, eval_batches=2,
                   sample_every=0, checkpoint_every=10)
    c.optim.update(lr=3e-3, warmup_steps=2)
  elif preset == "gpu":
    c.model.update(num_layers=6, num_heads=6, d_model=384, max_len=256, dropout_rate=0.2,
                   dtype="bfloat16")
    c.data.seq_len = 256
    c.train.update(steps=5000, batch_size=64, log_every=50, eval_every=250, eval_batches=20,
                   sample_every=1000, sample_tokens=256, checkpoint_every=1000)
    c.optim.update(lr=1e-3, warmup_steps=100, min_lr_ratio=0.1, b2=0.99)
  else:
    raise ValueError(f"unknown preset {preset!r}; expected tiny, micro or gpu")
  return c
