"""IsoFLOP sweep on the embedded Shakespeare corpus: at a fixed compute budget, which model size wins?

    gptjax scaling --config experiments/scaling.py:tiny --workdir runs/scaling
    gptjax scaling --config experiments/scaling.py:gpu --workdir runs/scaling_gpu    # unmeasured

Every budget in `scaling.budgets` (training FLOPs, counted with `model.flops_per_token`, the
project's 6·N + 12·L·T·D) trains every size in `scaling.sizes` ("LAYERSxWIDTH", heads of
`scaling.head_dim`) for budget / FLOPs-per-token tokens, once per seed in `scaling.seeds`, and
reads the held-out validation loss at the end. The other fields are the pretraining config every
run starts from; each run's length, warm-up and cosine decay follow its own token count.

Presets:
  tiny   3 budgets (5e10, 1.5e11, 5e11 FLOPs) x 7 sizes (4k-237k parameters) x 2 seeds, character
         level, 1,024 tokens a step: 32 minutes on the 2-core host while it shared the cores
         with two other runs (24 minutes of CPU; 2026-12-02, benchmarks/RESULTS.md); not timed
         on an idle host.
  micro  2 budgets x 3 sizes x 1 seed, for the tests (seconds per run).
  gpu    GPT-2-style sizes from 4 layers x 256 to 12 x 768 (the 124M shape), budgets 3e15-3e16, a
         16k-token batch in bfloat16; written for one GPU and NOT YET MEASURED. The corpus is about
         4.5M characters, so these budgets repeat it many times (the report counts the epochs);
         point `data.source` at a larger corpus for a sweep outside the repetition regime.
"""

import ml_collections

from .common import base_config


def get_config(arg=None):
  preset = arg or "tiny"
  c = base_config()
  c.scaling = ml_collections.ConfigDict(dict(
      budgets=(5e10, 1.5e11, 5e11),
      # From 4k to 237k parameters: the two smallest are there to bracket the optimum, which
      # lies below 15k at these budgets (docs/report_scaling).
      sizes=("1x16", "2x16", "1x32", "2x32", "2x48", "2x64", "3x80"), seeds=(0, 1),
      head_dim=16, warmup_fraction=0.1, max_warmup=100))
  c.model.update(activation="gelu_tanh")
  c.optim.update(lr=3e-3, min_lr_ratio=0.1)
  # Only the final evaluation counts; no samples, and a checkpoint only at the end (or on SIGTERM).
  c.train.update(sample_every=0, checkpoint_every=0, keep_checkpoints=1)
  if preset == "tiny":
    c.data.seq_len = 64
    c.model.max_len = 64
    c.train.update(batch_size=16, eval_batches=32)
  elif preset == "micro":   # for tests
    c.scaling.update(budgets=(2e8, 6e8), sizes=("1x16", "1x32", "1x48"), seeds=(0,))
    c.data.seq_len = 32
    c.model.max_len = 32
    c.train.update(batch_size=8, eval_batches=2)
  elif preset == "gpu":
    c.scaling.update(budgets=(3e15, 1e16, 3e16), sizes=("4x256", "6x384", "8x512", "12x768"),
                     head_dim=64, max_warmup=200)
    c.data.seq_len = 256
    c.model.update(max_len=256, dtype="bfloat16")
    c.train.update(batch_size=64, eval_batches=50)
    c.optim.update(lr=6e-4)
  else:
    raise ValueError(f"unknown preset {preset!r}; expected tiny, micro or gpu")
  return c
