"""GPT-2 124M (and 350M) for real hardware: a GPU box or a TPU slice.

    gptjax train --config experiments/gpt2_124m.py --workdir runs/gpt2 \
        --config.data.source=tfds:openwebtext:text --config.data.tokenizer=/path/to/gpt2.model

Presets: `124m` (default) and `350m`. FSDP over all devices by default; raise mesh.shape[2] for
tensor parallelism on large slices.
"""

from .common import base_config


def get_config(arg=None):
  preset = arg or "124m"
  c = base_config()
  c.data.seq_len = 1024
  c.model.update(vocab_size=50304, max_len=1024, dtype="bfloat16", variant="gpt2")
  if preset == "124m":
    c.model.update(num_layers=12, num_heads=12, d_model=768)
  elif preset == "350m":
    c.model.update(num_layers=24, num_heads=16, d_model=1024)
  else:
    raise ValueError(f"unknown preset {preset!r}; expected 124m or 350m")
  c.mesh.shape = (1, -1, 1)
  c.train.update(steps=600_000, batch_size=480, grad_accum=1, log_every=100, eval_every=2000,
                 eval_batches=50, sample_every=5000, sample_tokens=128, checkpoint_every=5000,
                 sample_prompts=("The meaning of life is",))
  c.optim.update(lr=6e-4, warmup_steps=2000, min_lr_ratio=0.1, b2=0.95, weight_decay=0.1)
  return c
