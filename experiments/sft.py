"""Supervised fine-tuning on Shakespeare dialogue (or your chats), from a pretraining workdir.

    gptjax train --config experiments/sft.py:tiny --workdir runs/sft \
        --config.train.init_from=runs/pretrain
    gptjax train --config experiments/sft.py:gpu --workdir runs/sft_gpu \
        --config.train.init_from=runs/pretrain_gpu --config.data.source=chat_jsonl:/data/chats.jsonl

The model fields below only apply without `train.init_from`; with it, the model and tokenizer are
the previous stage's. Presets: `micro` (tests, seconds), `tiny` (2 CPU cores, about a minute and a
half; pairs with shakespeare_char.py:tiny, max_len 64, so replies are at most 24 characters),
`gpu` (pairs with shakespeare_char.py:gpu, max_len 256).
"""

import ml_collections

from .common import base_config


def sft_fields() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      max_reply_chars=24,     # dialogue: longer replies are left out (0 keeps all)
      max_prompt_chars=0,     # dialogue: the speech's last words; 0 derives it from the budgets
      persona=False,          # dialogue: a system line "You are <speaker>."
      reply_tokens=32,        # the evaluation's token budget for one reply
      eval_prompts=64,        # held-out prompts sampled by the base and the SFT model
      eval_temperature=0.8,
      eval_top_k=0,
      show_samples=12))       # how many of them samples.md shows


def get_config(arg=None):
  preset = arg or "tiny"
  c = base_config()
  c.stage = "sft"
  c.loss.name = "sft"
  c.data.source = "shakespeare:dialogue"      # or chat_jsonl:PATH
  c.data.packing = "first_fit"                 # first_fit | best_fit | pad
  c.data.overlong = "truncate"                 # truncate | drop
  c.sft = sft_fields()
  c.train.sample_every = 0                     # samples come from the final side-by-side eval
  if preset == "tiny":
    c.model.update(num_layers=4, num_heads=4, d_model=128, max_len=64)
    c.data.seq_len = 64
    c.train.update(steps=150, batch_size=16, log_every=10, eval_every=75, eval_batches=8,
                   checkpoint_every=75)
    c.optim.update(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.0)
  elif preset == "micro":   # tests: seconds
    c.model.update(num_layers=2, num_heads=2, d_model=32, max_len=32)
    c.data.seq_len = 32
    c.sft.update(max_reply_chars=10, reply_tokens=12, eval_prompts=8, show_samples=4)
    c.train.update(steps=6, batch_size=8, log_every=2, eval_every=3, eval_batches=2,
                   checkpoint_every=3)
    c.optim.update(lr=3e-3, warmup_steps=2)
  elif preset == "gpu":
    c.model.update(num_layers=6, num_heads=6, d_model=384, max_len=256, dtype="bfloat16")
    c.data.seq_len = 256
    c.sft.update(max_reply_chars=160, reply_tokens=168, eval_prompts=256, persona=True)
    c.train.update(steps=1500, batch_size=64, log_every=50, eval_every=250, eval_batches=20,
                   checkpoint_every=500)
    c.optim.update(lr=3e-4, warmup_steps=50, weight_decay=0.0)
  else:
    raise ValueError(f"unknown preset {preset!r}; expected tiny, micro or gpu")
  return c
