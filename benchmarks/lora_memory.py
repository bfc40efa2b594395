"""GRPO step memory: full fine-tuning against LoRA, on a random model of Qwen2.5-0.5B's shape.

    python benchmarks/lora_memory.py [--dtype float32|bfloat16] [--rank 16] [--batch 4] [--seq 128]

Each mode runs in its own child process (so each peak RSS is its own): build the model, the
optimizer state and one GRPO minibatch, compile the shared `step.make_train_step` with the
registered GRPO loss, run `--steps` steps and report
  - params / optimizer bytes: what the train state holds (LoRA: adapters; the frozen base is
    counted apart, it is passed to the step and never donated or updated);
  - the compiled step's own figures (`memory_analysis()`: arguments, outputs, temporaries);
  - the process's peak RSS (ru_maxrss), which includes the jax runtime (~0.3-0.5 GB on CPU).
The model: 24 layers, d_model 896, 14 heads with 2 KV heads, MLP 4864 (SwiGLU), vocabulary
151936, tied embeddings, RoPE; ~494M parameters (Qwen2.5-0.5B without its q/k/v biases).
LoRA: rank `--rank`, alpha 2·rank, on q, k, v, o and the MLP, as `model.lora` configures it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

QWEN05 = dict(vocab_size=151936, num_layers=24, num_heads=14, num_kv_heads=2, d_model=896,
              mlp_dim=4864, max_len=1024, variant="llama", tie_embeddings=True,
              rope_theta=1_000_000.0, norm_eps=1e-6)


def child(mode: str, args) -> dict:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from gptjax import batches, lora
  from gptjax import step as step_lib
  from gptjax.losses import policy
  from gptjax.model import GPT, ModelConfig

  shape = {**QWEN05, **({"num_layers": args.num_layers} if args.num_layers else {}),
           **({"vocab_size": args.vocab_size} if args.vocab_size else {})}
  cfg = ModelConfig(**shape, dtype=args.dtype, param_dtype=args.dtype, remat=args.remat,
                    scan_unroll=args.scan_unroll)
  spec = lora.LoraSpec(rank=args.rank, alpha=2.0 * args.rank) if mode == "lora" else None
  model = lora.wrap(GPT(cfg), spec)
  params = jax.jit(lambda r: nn.meta.unbox(model.init(r, jnp.zeros((1, 8), jnp.int32))["params"]))(
      jax.random.key(0))
  loss = lambda p, b, **kw: policy.grpo(p, b, temperature=1.0, kl_coef=0.04, max_len=args.seq,
                                        **kw)
  frozen = None
  if spec is not None:
    trainable, base = lora.split(params)
    params, frozen = trainable, {"lora_base": base, "stage": None}
    inner = loss
    loss = lambda p, b, *, frozen, **kw: inner(lora.combine(frozen["lora_base"], p), b,
                                               frozen=frozen["stage"], **kw)
  opt_cfg = type("O", (), dict(lr=1e-5, warmup_steps=0, decay_steps=1000, min_lr_ratio=1.0,
                               b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0))
  optimizer = step_lib.make_optimizer(opt_cfg)
  state = jax.jit(lambda p: step_lib.init_state(p, optimizer, 0))(params)
  b, t = args.batch, args.seq
  rng = np.random.default_rng(0)
  tok = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(b, t + 1)), jnp.int32)
  mask = jnp.asarray(np.arange(t)[None, :] >= t // 4, jnp.float32) * jnp.ones((b, 1))
  batch = batches.RolloutBatch(
      inputs=tok[:, :-1], targets=tok[:, 1:], positions=jnp.broadcast_to(jnp.arange(t), (b, t)),
      segment_ids=jnp.ones((b, t), jnp.int32), completion_mask=mask,
      old_logp=jnp.full((b, t), -11.0), ref_logp=jnp.full((b, t), -11.0),
      advantages=jnp.asarray(rng.normal(size=(b, 1)), jnp.float32) * mask,
      returns=jnp.zeros((b, t)), values=jnp.zeros((b, t)))
  train_step = step_lib.make_train_step(loss, optimizer, model=model)
  t0 = time.perf_counter()
  compiled = train_step.lower(state, batch, frozen).compile()
  compile_s = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch, frozen)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  nbytes = lambda tree: sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))
  return {
      "mode": mode, "params_bytes": nbytes(state.params), "opt_bytes": nbytes(state.opt_state),
      "frozen_bytes": nbytes(frozen) if frozen is not None else 0,
      "arg_bytes": int(ma.argument_size_in_bytes), "out_bytes": int(ma.output_size_in_bytes),
      "temp_bytes": int(ma.temp_size_in_bytes), "alias_bytes": int(ma.alias_size_in_bytes),
      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "compile_s": compile_s, "step_s": float(np.median(times)), "loss": float(m["train/loss"]),
      # On an accelerator the device's own peak (the RSS there is the host side only).
      "device_peak_bytes": int((jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0))
      if jax.default_backend() != "cpu" else 0,
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--remat", default="full")
  ap.add_argument("--steps", type=int, default=2)
  # 0 unrolls every layer (the CPU default: faster), 1 keeps a rolled loop over layers.
  ap.add_argument("--scan_unroll", type=int, default=0)
  ap.add_argument("--num_layers", type=int, default=0)   # 0: Qwen2.5-0.5B's (smoke tests: fewer)
  ap.add_argument("--vocab_size", type=int, default=0)
  ap.add_argument("--child", default="")
  args = ap.parse_args()
  if args.child:
    print(json.dumps(child(args.child, args)))
    return
  rows = {}
  for mode in ("full", "lora"):
    cmd = [sys.executable, __file__, "--child", mode] + [
        f"--{k}={v}" for k, v in vars(args).items() if k != "child"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
      print(out.stderr[-3000:])
      raise SystemExit(f"{mode} failed")
    rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
  gb = lambda x: f"{x / 2**30:7.2f}"
  print(f"GRPO step, Qwen2.5-0.5B shape, {args.dtype}, batch {args.batch} x {args.seq} tokens, "
        f"remat {args.remat}; LoRA rank {args.rank} on q,k,v,o,mlp")
  print(f"  {'mode':5s} {'params':>8s} {'opt':>8s} {'frozen':>8s} {'args':>8s} {'temp':>8s} "
        f"{'peakRSS':>8s}  GiB   step s  compile s")
  for mode, r in rows.items():
    print(f"  {mode:5s} {gb(r['params_bytes'])} {gb(r['opt_bytes'])} {gb(r['frozen_bytes'])} "
          f"{gb(r['arg_bytes'])} {gb(r['temp_bytes'])} {gb(r['peak_rss_bytes'])}        "
          f"{r['step_s']:7.2f}  {r['compile_s']:7.1f}")
  f, l = rows["full"], rows["lora"]
  if f["device_peak_bytes"]:
    print(f"  device peak: full {gb(f['device_peak_bytes'])} GiB, LoRA {gb(l['device_peak_bytes'])}"
          f" GiB ({l['device_peak_bytes'] / f['device_peak_bytes']:.1%})")
  print(f"  LoRA/full: peak RSS {l['peak_rss_bytes'] / f['peak_rss_bytes']:.1%}, params+opt "
        f"{(l['params_bytes'] + l['opt_bytes']) / (f['params_bytes'] + f['opt_bytes']):.2%}, "
        f"compiled args+temp {(l['arg_bytes'] + l['temp_bytes']) / (f['arg_bytes'] + f['temp_bytes']):.1%}")


if __name__ == "__main__":
  main()
