"""Rollout throughput: the continuous-batching engine against the static sampler, side by side.

    python benchmarks/rollout_engine.py [--batch 64] [--max_new_tokens 256] [--mean_len 64]
                                        [--slots 64] [--chunk 16] [--repeats 3]

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
including every slot count the compaction reaches for this seed).
"""

from __future__ import annotations

import argparse
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
  ap.add_argument("--chunk", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--d_model", type=int, default=256)
  ap.add_argument("--num_layers", type=int, default=4)
  args = ap.parse_args()

  cfg = ModelConfig(vocab_size=args.mean_len, num_layers=args.num_layers, num_heads=4,
                    d_model=args.d_model, max_len=args.prompt_len + args.max_new_tokens + 64,
                    variant="llama")
  model = GPT(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  params["lm_head"]["kernel"] = jnp.zeros_like(params["lm_head"]["kernel"])   # uniform next token
  eos, pad = 1, 0
  rng = np.random.default_rng(args.seed)
  lengths = rng.integers(args.prompt_len // 2, args.prompt_len + 1, size=args.batch)
  prompts = np.full((args.batch, args.prompt_len), pad, np.int32)
  for i, l in enumerate(lengths):
    prompts[i, :l] = rng.integers(2, cfg.vocab_size, size=l)
  kw = dict(rng=args.seed, max_new_tokens=args.max_new_tokens, temperature=1.0, eos_ids=(eos,),
            pad_id=pad)

  def static():
    out = sampling.generate(model, params, prompts, lengths, **kw)
    return jax.block_until_ready(out)

  def continuous():
    out = engine.generate(model, params, prompts, lengths, slots=args.slots, chunk=args.chunk,
                          **kw)
    return jax.block_until_ready(out)

  results = {}
  for name, fn in (("static sampler", static), ("continuous engine", continuous)):
    out = fn()                                          # warm-up
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      out = fn()
      times.append(time.perf_counter() - t0)
    lens = np.asarray(out.lengths)
    t = statistics.median(times)
    results[name] = (t, int(lens.sum()), lens)
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); model "
        f"{args.num_layers}x{args.d_model}, V={cfg.vocab_size}; batch {args.batch}, prompts "
        f"{args.prompt_len}, max_new_tokens {args.max_new_tokens}, geometric lengths mean "
        f"{args.mean_len}; engine slots {args.slots}, chunk {args.chunk}; median of "
        f"{args.repeats}")
  for name, (t, tokens, lens) in results.items():
    print(f"  {name:18s} {t:7.3f} s  {tokens:6d} tokens  {tokens / t:9.1f} tok/s  "
          f"(lengths mean {lens.mean():.1f}, max {lens.max()}, capped {int((lens == args.max_new_tokens).sum())})")
  (ts, ns, _), (tc, nc, _) = results["static sampler"], results["continuous engine"]
  print(f"  speed-up (tokens/s): {(nc / tc) / (ns / ts):.2f}x")


if __name__ == "__main__":
  main()
