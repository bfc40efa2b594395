"""The memory plan against the measured peak RSS of the real run, on CPU.

    python benchmarks/memory_plan.py [--configs sft,sft_lora,grpo,grpo_lora] [--d_model 256]
    python benchmarks/memory_plan.py --configs sft,grpo --step_alone 24

For each config two child processes, so neither figure includes the other's:
  plan      `gptjax.memory.plan_config`: the plan's peak per device (one CPU device);
  run       the stage itself (`run_stage`, a few steps; RL: one iteration). Its peak RSS
            (ru_maxrss) is read twice: when the runner builds its model (`common.make_env`:
            imports, data and tokenizer loaded, no parameter allocated yet: the baseline) and when
            the final checkpoint starts (every step and rollout so far, not the save's host copy
            or the evaluation after training).
It prints plan / (at save - baseline) per config. On CPU device memory is host memory, so the
difference also holds what the plan leaves out: compiled code, XLA's own buffers of the
sampler and of the forward-only scoring programs, and allocator slack.

The run is made twice, in two processes sharing a fresh persistent compilation cache: the first
(cold) compiles every program, the second (warm) loads them from the cache, so its RSS holds no
LLVM compilation. Compilation is host memory on an accelerator too, but not device memory, so
the warm figure is the one that compares with what the plan describes.

`--step_alone N`: the plan's own compiled step run N times on zero-filled arrays (from a warm
cache), with `retain_host_memory` on and off, printing the RSS after each step: the step's
buffers without the rest of a run, and what the allocator setting adds to them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, "experiments")


def configs(args) -> dict:
  model = [f"model.d_model={args.d_model}", f"model.num_layers={args.num_layers}",
           "model.num_heads=4", f"model.vocab_size={args.vocab_size}", "model.max_len=256"]
  sft = ["data.seq_len=128", "train.batch_size=8", "train.steps=3", "train.eval_every=0",
         "train.eval_batches=1", "train.checkpoint_every=0", "sft.eval_prompts=0"]
  grpo = ["rl.prompt_len=32", "rl.max_new_tokens=64", "rl.prompts_per_iteration=8",
          "rl.group_size=4", "train.batch_size=8", "rl.iterations=1", "rl.epochs=1",
          "rl.eval_prompts=0", "rl.reward=char_fraction:e", "train.sample_every=0",
          "train.checkpoint_every=0"]
  lora = ["model.lora.rank=8"]
  # The policy samples from its whole vocabulary and the rollouts decode every sample, so GRPO
  # keeps the tokenizer's own vocabulary (0: the prompts' characters).
  rl_model = [o for o in model if not o.startswith("model.vocab_size=")] + ["model.vocab_size=0"]
  return {"sft": ("sft.py:tiny", model + sft), "sft_lora": ("sft.py:tiny", model + sft + lora),
          "grpo": ("grpo.py:tiny", rl_model + grpo),
          "grpo_lora": ("grpo.py:tiny", rl_model + grpo + lora)}


def _maxrss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
  """The current RSS (not the peak), in bytes."""
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))


def step_alone(cfg, steps: int) -> dict:
  """The plan's own compiled step run on zero-filled arrays of its shapes: the current RSS once
  it is compiled, once the state, batch and frozen trees are allocated, and after each step."""
  import jax
  import jax.numpy as jnp
  from gptjax import memory, stages, trainer
  parts = stages.memory_parts(cfg, None)
  built = trainer.setup(cfg, parts.job)
  compiled = built.train_step.lower(built.abstract_state, parts.batch, built.frozen).compile()
  out = {"compiled": _rss(), "temp": memory.compiled_figures(compiled)["temp_size_in_bytes"]}
  zeros = lambda t: jax.tree.map(
      lambda x: jax.device_put(jnp.zeros(x.shape, x.dtype), getattr(x, "sharding", None)), t)
  state, batch, frozen = zeros(built.abstract_state), zeros(parts.batch), zeros(built.frozen)
  jax.block_until_ready((state, batch, frozen))
  out["allocated"], out["steps"] = _rss(), []
  for _ in range(steps):
    state, _ = compiled(state, batch, frozen)
    jax.block_until_ready(state)
    out["steps"].append(_rss())
  return out


def child(kind: str, spec: str, overrides: list[str]) -> dict:
  from gptjax import config as config_lib
  from gptjax import perf
  perf.retain_host_memory()                 # as the gptjax command sets it
  cfg = config_lib.load(os.path.join(EXPERIMENTS, spec), overrides)
  if kind.startswith("step"):
    return step_alone(cfg, int(kind[len("step"):]))
  if kind == "plan":
    from gptjax import memory
    t0 = time.perf_counter()
    p = memory.plan_config(cfg)
    # This process allocates no parameter or batch: its peak is imports, data and compiling the
    # step, the part of a CPU run's RSS that is not device memory on an accelerator.
    return {"plan": p.as_dict(), "plan_s": time.perf_counter() - t0, "rss": _maxrss()}
  from gptjax import checkpoint as ckpt_lib
  from gptjax.stages import common, run_stage
  seen = {}
  save, make_env = ckpt_lib.Checkpointer.save, common.make_env

  def make_env_after_measuring(*a, **kw):
    seen.setdefault("baseline", _maxrss())
    return make_env(*a, **kw)

  def save_after_measuring(self, *a, **kw):
    seen.setdefault("rss", _maxrss())
    return save(self, *a, **kw)

  ckpt_lib.Checkpointer.save = save_after_measuring
  common.make_env = make_env_after_measuring
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    run_stage(cfg, os.path.join(d, "run"), progress=False)
  return {"rss": seen.get("rss", _maxrss()), "baseline": seen["baseline"],
          "run_s": time.perf_counter() - t0}


def spawn(kind, spec, overrides, cache_dir: str = "") -> dict:
  cmd = [sys.executable, __file__, "--child", kind, "--spec", spec, "--"] + overrides
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  if cache_dir:
    # Every program, however quick to compile or small, so the warm run compiles nothing.
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  out = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if out.returncode:
    raise RuntimeError(f"{kind} {spec} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--configs", default="sft,sft_lora,grpo,grpo_lora")
  ap.add_argument("--d_model", type=int, default=256)
  ap.add_argument("--num_layers", type=int, default=4)
  ap.add_argument("--vocab_size", type=int, default=8192)
  ap.add_argument("--step_alone", type=int, default=0,
                  help="instead: run the plan's compiled step N times on zero-filled arrays, "
                       "with and without retain_host_memory, and print the RSS after each")
  ap.add_argument("--child", default="")
  ap.add_argument("--spec", default="")
  args, rest = ap.parse_known_args()
  if args.child:
    overrides = rest[1:] if rest[:1] == ["--"] else rest
    print(json.dumps(child(args.child, args.spec, overrides)))
    return
  table = configs(args)
  mib = lambda n: n / 2 ** 20
  if args.step_alone:
    from gptjax.perf import RETAIN_ENV
    for name in args.configs.split(","):
      spec, overrides = table[name]
      with tempfile.TemporaryDirectory() as cache:
        spawn("plan", spec, overrides, cache)               # fills the cache: no LLVM below
        for retain in ("1", "0"):
          os.environ[RETAIN_ENV] = retain
          r = spawn(f"step{args.step_alone}", spec, overrides, cache)
          print(f"{name} retain_host_memory={retain}: step temporaries {mib(r['temp']):.1f} MiB;"
                f" RSS compiled {mib(r['compiled']):.0f}, allocated {mib(r['allocated']):.0f}, "
                f"after each step " + " ".join(f"{mib(x):.0f}" for x in r["steps"]), flush=True)
    return
  cols = lambda run: f" | {run + ' RSS':>9}{'base':>7}{'RSS-base':>9}{'ratio':>6}"
  print(f"{'config':<10}{'plan MiB':>10}{cols('cold')}{cols('warm')} | rows (MiB)")
  for name in args.configs.split(","):
    spec, overrides = table[name]
    plan = spawn("plan", spec, overrides)["plan"]
    line = f"{name:<10}{mib(plan['peak']):>10.1f}"
    with tempfile.TemporaryDirectory() as cache:
      for run in (spawn("run", spec, overrides, cache), spawn("run", spec, overrides, cache)):
        measured = run["rss"] - run["baseline"]
        line += (f" | {mib(run['rss']):>9.0f}{mib(run['baseline']):>7.0f}"
                 f"{mib(measured):>9.1f}{plan['peak'] / measured:>6.2f}")
    rows = ", ".join(f"{k} {mib(v):.1f}" for k, v in plan["rows"].items() if v)
    print(f"{line} | {rows}", flush=True)


if __name__ == "__main__":
  main()
