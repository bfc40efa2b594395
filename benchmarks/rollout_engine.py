"""Rollout throughput: the continuous-batching engine against the static sampler, side by side.

    python benchmarks/rollout_engine.py [--batch 64] [--max_new_tokens 256] [--mean_len 64]
                                        [--slots 64] [--chunks 16] [--repeats 3] [--seeds 0]

A batch of RL-like rollouts whose completion lengths follow a geometric distribution with mean
`--mean_len`, capped at `--max_new_tokens`: the model's LM head is zero, so every next-token
distribution is uniform over a vocabulary of `--mean_len` tokens, one of which is EOS (stop
probability 1/mean_len per token). The rest of the network is a random 4-layer, 256-wide
Llama-style decoder, so each step costs what a real one of that size costs.

`sampling.generate` decodes the static batch until its longest row stops (with 64 rows of mean
64, nearly always the 256 cap); `engine.generate` refills and compacts slots as rows finish. Both
see the same prompts and seed. Their tokens differ: the engine draws request i's token t from
fold_in(fold_in(seed, i), t), the sampler from one batch-wide key per step (with temperature 0
they agree, which tests/test_engine.py checks; uniform logits make greedy meaningless here). The
printed lengths show both follow the same distribution. Generated tokens/s = completion tokens
(EOS included) / wall time, median of `--repeats` after one warm-up run of each (compilation,
including every slot count the compaction reaches for this seed). With several `--seeds` each
seed is a new draw of prompts and lengths (the static batch's cost is set by its longest row, so
one draw says little), measured side by side, and the speed-up is quoted per seed and as the
median; `--chunks 8,16` compares engine chunk sizes in the same run.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptjax import engine, sampling
from gptjax.model import GPT, ModelConfig


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--max_new_tokens", type=int, default=256)
  ap.add_argument("--mean_len", type=int, default=64)
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--slots", type=int, default=64)
  ap.add_argument("--chunks", default="16",
                  help="comma-separated engine chunk sizes, each measured beside the sampler")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--seeds", default="0",
                  help="comma-separated seeds: each one new prompts and draws (lengths)")
  ap.add_argument("--d_model", type=int, default=256)
  ap.add_argument("--num_layers", type=int, default=4)
  args = ap.parse_args()
  chunks = [int(x) for x in args.chunks.split(",")]
  seeds = [int(x) for x in args.seeds.split(",")]

  cfg = ModelConfig(vocab_size=args.mean_len, num_layers=args.num_layers, num_heads=4,
                    d_model=args.d_model, max_len=args.prompt_len + args.max_new_tokens + 64,
                    variant="llama")
  model = GPT(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  params["lm_head"]["kernel"] = jnp.zeros_like(params["lm_head"]["kernel"])   # uniform next token
  eos, pad = 1, 0
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); model "
        f"{args.num_layers}x{args.d_model}, V={cfg.vocab_size}; batch {args.batch}, prompts "
        f"{args.prompt_len}, max_new_tokens {args.max_new_tokens}, geometric lengths mean "
        f"{args.mean_len}; engine slots {args.slots}; seeds {seeds}; median of {args.repeats} "
        f"per seed after a warm-up", flush=True)

  names = ["static sampler"] + [f"engine, chunk {c}" for c in chunks]
  rates = {n: [] for n in names}
  for seed in seeds:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(args.prompt_len // 2, args.prompt_len + 1, size=args.batch)
    prompts = np.full((args.batch, args.prompt_len), pad, np.int32)
    for i, l in enumerate(lengths):
      prompts[i, :l] = rng.integers(2, cfg.vocab_size, size=l)
    kw = dict(rng=seed, max_new_tokens=args.max_new_tokens, temperature=1.0, eos_ids=(eos,),
              pad_id=pad)
    fns = {"static sampler": lambda: sampling.generate(model, params, prompts, lengths, **kw)}
    for c in chunks:
      fns[f"engine, chunk {c}"] = functools.partial(
          engine.generate, model, params, prompts, lengths, slots=args.slots, chunk=c, **kw)
    for name, fn in fns.items():
      # Warm-up: compiles every slot count this draw reaches.
      out = jax.block_until_ready(fn())
      times = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
      lens = np.asarray(out.lengths)
      t = statistics.median(times)
      rates[name].append(lens.sum() / t)
      print(f"  seed {seed}  {name:16s} {t:7.3f} s  {int(lens.sum()):6d} tokens  "
            f"{lens.sum() / t:9.1f} tok/s  (lengths mean {lens.mean():.1f}, max {lens.max()}, "
            f"capped {int((lens == args.max_new_tokens).sum())})", flush=True)
  base = np.asarray(rates["static sampler"])
  print("summary (tokens/s, median over seeds; speed-up = engine / sampler per seed):")
  for name in names:
    r = np.asarray(rates[name])
    line = f"  {name:16s} {np.median(r):9.1f} tok/s"
    if name != "static sampler":
      ratio = r / base
      line += (f"  speed-up median {np.median(ratio):.2f}x (per seed "
               f"{', '.join(f'{x:.2f}' for x in ratio)})")
    print(line)


if __name__ == "__main__":
  main()
