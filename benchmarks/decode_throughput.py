"""Decode throughput of `gptjax.sampling.generate`: prefill and decode tokens/s at batch 1 and 64,
against a no-cache baseline that recomputes the full sequence for every new token.

    python benchmarks/decode_throughput.py                      # CPU: GPT-2 style, 4 x 128, V=2048
    python benchmarks/decode_throughput.py --model gpt2_124m --dtype bfloat16 --batch_sizes 1,64

Decode tokens/s counts every row's new tokens (batch x new tokens) over the decode loop's time,
which is the full `generate` time minus a separately timed prefill. No row stops early (no EOS), so
every run does exactly `--new_tokens` steps. Each figure is the median of `--repeats` runs after a
warm-up run (compile and first touch of every buffer).
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

from gptjax import perf, sampling
from gptjax.model import GPT, ModelConfig, count_params

MODELS = {
    "tiny": dict(variant="gpt2", num_layers=4, d_model=128, num_heads=4, vocab_size=2048),
    "gpt2_124m": dict(variant="gpt2", num_layers=12, d_model=768, num_heads=12, vocab_size=50257,
                      max_len=1024),
}
HBM_BYTES_PER_S = {"H100": 3.35e12}


def _median_time(fn, repeats):
  fn()  # warm-up: compile and first touch
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


@functools.partial(jax.jit, static_argnames=("model", "new_tokens"))
def _no_cache_generate(model, params, prompts, rng, new_tokens):
  """The baseline: every step runs the whole (fixed-size) sequence again, without a cache."""
  b, p = prompts.shape
  tokens = jnp.concatenate([prompts, jnp.zeros((b, new_tokens), jnp.int32)], axis=1)

  def step(i, tokens):
    logits = model.apply({"params": params}, tokens).logits                   # [B,P+M,V]
    next_logits = jax.lax.dynamic_index_in_dim(logits, p + i - 1, axis=1, keepdims=False)
    token = jax.random.categorical(jax.random.fold_in(rng, i), next_logits).astype(jnp.int32)
    return jax.lax.dynamic_update_index_in_dim(tokens, token, p + i, axis=1)

  return jax.lax.fori_loop(0, new_tokens, step, tokens)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", default="tiny", choices=sorted(MODELS))
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--batch_sizes", default="1,64")
  ap.add_argument("--prompt_len", type=int, default=16)
  ap.add_argument("--new_tokens", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--baseline_repeats", type=int, default=1)
  ap.add_argument("--baseline", default="auto", choices=["auto", "yes", "no"],
                  help="run the no-cache baseline (auto: only for the tiny model)")
  ap.add_argument("--chip", default="H100", choices=sorted(HBM_BYTES_PER_S),
                  help="HBM bandwidth used for the bandwidth-bound fraction on GPU")
  args = ap.parse_args(argv)
  retained = perf.retain_host_memory()     # before the first computation starts the backend
  print(f"host memory retained: {retained} ({perf.RETAIN_ENV}=0 turns it off)")

  kw = dict(MODELS[args.model])
  kw.setdefault("max_len", args.prompt_len + args.new_tokens)
  cfg = ModelConfig(**kw, dtype=args.dtype, param_dtype=args.dtype)
  model = GPT(cfg)
  params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]))(
      jax.random.key(0))
  n_params = count_params(params)
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  platform = jax.devices()[0].platform
  run_baseline = args.baseline == "yes" or (args.baseline == "auto" and args.model == "tiny")
  print(f"model={args.model} params={n_params / 1e6:.2f}M dtype={args.dtype} device="
        f"{jax.devices()[0].device_kind} prompt={args.prompt_len} new={args.new_tokens}")

  rows = []
  for b in [int(x) for x in args.batch_sizes.split(",")]:
    rng = jax.random.key(1)
    prompts = jax.random.randint(jax.random.key(2), (b, args.prompt_len), 10, cfg.vocab_size,
                                 jnp.int32)
    lengths = jnp.full((b,), args.prompt_len, jnp.int32)
    controls = dict(max_new_tokens=args.new_tokens, temperature=1.0, pad_id=0)

    def run_generate():
      jax.block_until_ready(sampling.generate(model, params, prompts, lengths, rng=rng, **controls))

    # Prefill alone: the same program with one new token (the first is sampled from prefill).
    def run_prefill():
      jax.block_until_ready(sampling.generate(model, params, prompts, lengths, rng=rng,
                                              **{**controls, "max_new_tokens": 1}))

    t_total = _median_time(run_generate, args.repeats)
    t_prefill = _median_time(run_prefill, args.repeats)
    t_decode = max(t_total - t_prefill, 1e-9)
    decode_tps = b * args.new_tokens / t_decode
    prefill_tps = b * args.prompt_len / t_prefill
    row = dict(batch=b, prefill_tps=prefill_tps, decode_tps=decode_tps,
               ms_per_step=1e3 * t_decode / args.new_tokens, total_s=t_total)
    if run_baseline:
      # The baseline is slow (a full forward per token), so it is compiled ahead of time instead
      # of warmed up by a full run, and timed over --baseline_repeats runs.
      baseline = _no_cache_generate.lower(model, params, prompts, rng, args.new_tokens).compile()
      times = []
      for _ in range(args.baseline_repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(baseline(params, prompts, rng))
        times.append(time.perf_counter() - t0)
      t_base = statistics.median(times)
      row["baseline_tps"] = b * args.new_tokens / t_base
      row["speedup"] = t_base / t_total
    if platform == "gpu":
      per_token_s = t_decode / args.new_tokens
      row["bw_fraction"] = (param_bytes / HBM_BYTES_PER_S[args.chip]) / per_token_s
    rows.append(row)
    line = (f"batch={b:3d}  prefill {prefill_tps:10.0f} tok/s  decode {decode_tps:10.0f} tok/s  "
            f"({row['ms_per_step']:.2f} ms/step)")
    if run_baseline:
      line += f"  no-cache {row['baseline_tps']:8.0f} tok/s  speedup x{row['speedup']:.1f}"
    if "bw_fraction" in row:
      line += f"  bandwidth-bound fraction {row['bw_fraction']:.2f}"
    print(line, flush=True)
  return rows


if __name__ == "__main__":
  main()
