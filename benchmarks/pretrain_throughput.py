"""Pretraining throughput of the real train step (`step.make_train_step` with the `lm` loss and
AdamW): tokens/s, ms/step, MFU, and how the step splits into forward, backward and optimizer.

    python benchmarks/pretrain_throughput.py                          # CPU: nanoGPT's "baby" model
    python benchmarks/pretrain_throughput.py --variants "activation=gelu_tanh;activation=relu"
    python benchmarks/pretrain_throughput.py --preset gpt2_124m --dtype bfloat16 --batch 16
    python benchmarks/pretrain_throughput.py --preset gpt2_350m --remat dots --attention_impl cudnn

ms/step is the median of every timed step (each step blocked on, `--steps` per repeat, after
`--warmup` untimed steps, which cover compilation and the slow first touch of every buffer).
The forward figure times the loss alone and the backward figure is value_and_grad minus it; the
optimizer figure is the full step minus value_and_grad. `--variants` builds one model per
';'-separated list of `field=value` overrides and times them round-robin, step by step, so
every variant sees the same machine state. MFU = flops_per_token · tokens/s / peak, as in
`gptjax.metrics`; on CPU the peak is a measured float32 matmul (cached in ~/.cache/gptjax).

XLA:CPU flags from `gptjax.perf.cpu_flags()` are set before JAX starts unless `--no_cpu_flags`,
and so are the malloc settings of `gptjax.perf.retain_host_memory()` unless
GPTJAX_RETAIN_HOST_MEMORY=0 (compare the two across runs);
`--xla_flags` adds more (they only take effect at process start, so compare flags across runs).
"""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESETS = {
    # nanoGPT's CPU "baby" config: 4 layers, 4 heads, 128 wide, block 64, batch 12. The vocabulary
    # is the character tokenizer that experiments/shakespeare_char.py builds from its corpus.
    "cpu_baby": dict(model=dict(variant="gpt2", num_layers=4, num_heads=4, d_model=128,
                                vocab_size=81, max_len=64),
                     batch=12, seq=64, dtype="float32"),
    "gpt2_124m": dict(model=dict(variant="gpt2", num_layers=12, num_heads=12, d_model=768,
                                 vocab_size=50257, max_len=1024),
                      batch=16, seq=1024, dtype="bfloat16"),
    "gpt2_350m": dict(model=dict(variant="gpt2", num_layers=24, num_heads=16, d_model=1024,
                                 vocab_size=50257, max_len=1024),
                      batch=16, seq=1024, dtype="bfloat16"),
}


def parse_overrides(text: str) -> dict:
  out = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    k, _, v = item.partition("=")
    try:
      out[k.strip()] = ast.literal_eval(v.strip())
    except (ValueError, SyntaxError):
      out[k.strip()] = v.strip()           # a bare word is a string
  return out


def parse_args(argv):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--preset", default="cpu_baby", choices=sorted(PRESETS))
  ap.add_argument("--dtype", default=None, help="compute dtype (default: the preset's)")
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--seq", type=int, default=None)
  ap.add_argument("--grad_accum", type=int, default=1)
  ap.add_argument("--remat", default=None, choices=["none", "full", "dots"])
  ap.add_argument("--attention_impl", default=None, help="e.g. cudnn or xla")
  ap.add_argument("--model", default="", help="more ModelConfig overrides: 'field=value,...'")
  ap.add_argument("--variants", default="",
                  help="';'-separated override lists, each timed as its own model")
  ap.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--warmup", type=int, default=5)
  ap.add_argument("--no_split", action="store_true", help="skip the forward/backward split")
  ap.add_argument("--no_cpu_flags", action="store_true", help="leave XLA:CPU flags at defaults")
  ap.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS before JAX starts")
  ap.add_argument("--profile", default="", help="write a jax.profiler trace of one repeat here")
  return ap.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  # Both must happen before the first JAX import initialises a backend.
  from gptjax import perf
  retained = perf.retain_host_memory()
  if not args.no_cpu_flags:
    perf.apply_cpu_flags()
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()

  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  import numpy as np

  from gptjax import metrics as metrics_lib
  from gptjax import step as step_lib
  from gptjax.batches import LMBatch
  from gptjax.losses.lm import lm_loss
  from gptjax.model import GPT, ModelConfig, count_params, flops_per_token

  preset = PRESETS[args.preset]
  dtype = args.dtype or preset["dtype"]
  b, t = args.batch or preset["batch"], args.seq or preset["seq"]
  base = dict(preset["model"], dtype=dtype, max_len=max(t, preset["model"]["max_len"]))
  if args.remat:
    base["remat"] = args.remat
  if args.attention_impl:
    base["attention_impl"] = args.attention_impl
  base.update(parse_overrides(args.model))
  variant_specs = [s for s in args.variants.split(";") if s.strip()] or [""]

  device = jax.devices()[0]
  peak = metrics_lib.peak_flops(device, dtype)
  print(f"device: {device.device_kind} ({device.platform}) x{jax.device_count()}, "
        f"peak {peak / 1e9:.1f} GFLOP/s ({dtype})")
  print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '')!r}; host memory retained: {retained} "
        f"({perf.RETAIN_ENV}=0 turns it off)")
  print(f"preset {args.preset}: batch {b}, seq {t}, {dtype}, grad_accum {args.grad_accum}")

  rng = np.random.default_rng(0)
  vocab = base["vocab_size"]
  tokens = rng.integers(0, vocab, size=(b, t + 1)).astype(np.int32)
  batch = LMBatch(inputs=jnp.asarray(tokens[:, :-1]), targets=jnp.asarray(tokens[:, 1:]),
                  positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
                  segment_ids=jnp.ones((b, t), jnp.int32), loss_mask=jnp.ones((b, t), jnp.int32))
  optim = type("O", (), dict(lr=1e-3, warmup_steps=10, decay_steps=10_000, min_lr_ratio=0.1,
                             b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, clip_norm=1.0))
  optimizer = step_lib.make_optimizer(optim)

  runs = []
  for spec in variant_specs:
    cfg = ModelConfig(**{**base, **parse_overrides(spec)})
    model = GPT(cfg)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, batch.inputs[:1])["params"]))(
        jax.random.key(0))
    # The step donates its state, so the forward/backward timings get their own copy.
    state = step_lib.init_state(jax.tree.map(jnp.copy, params), optimizer, seed=0)

    def loss(p, model=model):
      return lm_loss(p, batch, model=model)[0]

    t0 = time.perf_counter()
    train_step = step_lib.make_train_step(
        lambda p, bt, *, frozen, rng, model: lm_loss(p, bt, model=model), optimizer,
        model=model, grad_accum=args.grad_accum)
    state, _ = train_step(state, batch, None)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    run = dict(name=spec.strip() or "default", cfg=cfg, state=state, step=train_step,
               fwd=jax.jit(loss), grad=jax.jit(jax.value_and_grad(loss)), params=params,
               times={"step": [], "fwd": [], "grad": []}, compile_s=compile_s,
               n_params=count_params(params), fpt=flops_per_token(cfg, t))
    for _ in range(args.warmup):
      run["state"], _ = train_step(run["state"], batch, None)
      if not args.no_split:
        run["fwd"](params)
        run["grad"](params)
    jax.block_until_ready((run["state"], run["fwd"](params), run["grad"](params)))
    runs.append(run)

  def timed(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0

  def one_step(run):
    run["state"], m = run["step"](run["state"], batch, None)
    return run["state"].params, m

  # Variants alternate step by step, so a burst of load from elsewhere on the host lands on all
  # of them alike instead of on whichever variant happened to be running.
  for r in range(args.repeats):
    if args.profile and r == args.repeats - 1:
      jax.profiler.start_trace(args.profile)
    for _ in range(args.steps):
      for run in runs:
        run["times"]["step"].append(timed(lambda: one_step(run)))
    if not args.no_split:
      for _ in range(args.steps):
        for run in runs:
          run["times"]["fwd"].append(timed(lambda: run["fwd"](run["params"])))
          run["times"]["grad"].append(timed(lambda: run["grad"](run["params"])))
    if args.profile and r == args.repeats - 1:
      jax.profiler.stop_trace()

  ms = lambda xs: 1e3 * statistics.median(xs) if xs else float("nan")
  print(f"\n{'variant':<40} {'params':>10} {'ms/step':>8} {'tok/s':>9} {'MFU':>6} "
        f"{'fwd':>7} {'bwd':>7} {'opt':>7} {'compile':>8}")
  for run in runs:
    step_ms = ms(run["times"]["step"])
    tps = b * t / (step_ms / 1e3)
    mfu = metrics_lib.mfu(run["fpt"], tps, num_devices=1, peak=peak)
    fwd, grad = ms(run["times"]["fwd"]), ms(run["times"]["grad"])
    print(f"{run['name']:<40} {run['n_params'] / 1e6:>9.2f}M {step_ms:>8.2f} {tps:>9.0f} "
          f"{100 * mfu:>5.1f}% {fwd:>7.2f} {grad - fwd:>7.2f} {step_ms - grad:>7.2f} "
          f"{run['compile_s']:>7.1f}s")
  # The spread across repeats says how far to trust a difference between two rows.
  for run in runs:
    per_rep = [ms(run["times"]["step"][i * args.steps:(i + 1) * args.steps])
               for i in range(args.repeats)]
    print(f"  {run['name']}: per-repeat median ms/step " + ", ".join(f"{x:.2f}" for x in per_rep))


if __name__ == "__main__":
  main()
