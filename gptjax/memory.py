"""The memory plan: what a training run will hold on each device, read before it runs.

    gptjax memory --config experiments/grpo.py:tiny [--config.field=value ...] [--memory_limit 16GiB]
    gptjax train  --config ... --workdir DIR --dry_run            (the same plan; nothing trains)

    p = memory.plan_config(cfg)          # any stage or objective; no weights are allocated
    print(memory.format_table(p))
    memory.check_limit(p, 16 * 2**30)    # ConfigError naming the fields to change

The stage's runner says what its run builds (`Parts`: the trainer `Job`, one step's batch, the
models it holds beside the train state, an RL iteration's rollouts and KV cache) through
`gptjax.stages.memory_parts`, so the shapes are the ones the runner would build, never derived a
second time here. This module then asks the trainer for its own step (`trainer.setup`: the
optimizer, the state's shapes and shardings, LoRA's split) and lowers and compiles that step on
abstract arguments (`jax.ShapeDtypeStruct` with shardings), so the plan's arguments are exactly
the compiled step's. XLA's buffer assignment (`memory_analysis()`) gives what no shape can: the
activations and temporaries of the chosen micro-batch and `model.remat`.

Rows, in bytes per device (a sharded array counts its shard only):
  parameters        the trained parameters in the train state (with LoRA: the scalar head, if any)
  adapters          LoRA's A and B matrices (trained, in the state)
  optimizer state   AdamW's moments and counts, plus the step counter and RNG key of the state
  frozen models     networks the run holds but never trains: LoRA's base; the reference policy of
                    RL and preference objectives (with LoRA it is the base itself, counted once);
                    the reward model (rl.reward='rm')
  batch             one step's batch (RL: one minibatch)
  rollout buffer    RL: the iteration's rollouts, kept while its minibatches train
  KV cache          RL: the sampler's cache for the iteration's rows x (prompt_len + max_new_tokens)
  step temporaries  the compiled step's activations and temporaries (XLA temp_size), plus any
                    output it cannot write over its donated state

The first four live for the whole run. A step and a rollout never run at once, so

    peak = parameters + adapters + optimizer + frozen + max(step, rollout)
    step = batch + rollout buffer + step temporaries          rollout = KV cache

The plan leaves out what no shape describes: the XLA runtime and compiled code, the host's copy
of the data, and the sampler's own temporaries (logits of one decode step). benchmarks/
memory_plan.py measures the difference on CPU (README, "The memory plan").
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from gptjax import config as config_lib
from gptjax import lora as lora_lib
from gptjax import sharding as shd

GiB = 2 ** 30

# The rows of the table, in order, and the config fields that shrink each (the refusal names the
# fields of the largest rows). A runner adds its own sequence fields (`Parts.seq_fields`).
ROWS = ("parameters", "adapters", "optimizer state", "frozen models", "batch", "rollout buffer",
        "KV cache", "step temporaries")
PERSISTENT = ("parameters", "adapters", "optimizer state", "frozen models")
STEP_ROWS = ("batch", "rollout buffer", "step temporaries")
ROLLOUT_ROWS = ("KV cache",)
_FIELDS = {
    "parameters": ("mesh.shape (shard over fsdp/tensor)", "model.lora.rank (train adapters)",
                   "model.param_dtype"),
    "adapters": ("model.lora.rank", "model.lora.targets"),
    "optimizer state": ("model.lora.rank (only adapters get moments)",
                        "mesh.shape (shard over fsdp/tensor)"),
    "frozen models": ("model.param_dtype", "mesh.shape (shard over fsdp/tensor)"),
    "batch": ("train.batch_size",),
    "rollout buffer": ("rl.prompts_per_iteration", "rl.group_size"),
    "KV cache": ("rl.prompts_per_iteration", "rl.group_size", "rl.max_new_tokens",
                 "rl.prompt_len"),
    "step temporaries": ("train.grad_accum (smaller micro-batches)", "model.remat",
                         "train.batch_size"),
}


@dataclasses.dataclass
class Parts:
  """What a stage runner would build for a run, as shapes (see the module docstring).

  job: the trainer Job (model, loss, mesh, init_params; with LoRA `base_params` holds the
  abstract full parameters, so the trainer's split needs no weights). batch: one step's global
  batch (ShapeDtypeStructs with the batch sharding). held: name -> abstract tree of each network
  the runner keeps beside the train state. rollout_buffer / kv_cache: RL only. seq_fields: the
  config fields that set the step's sequence length. extra_fields: row -> more fields to name."""
  job: Any
  batch: Any
  held: dict = dataclasses.field(default_factory=dict)
  rollout_buffer: Any = None
  kv_cache: Any = None
  seq_fields: tuple = ("data.seq_len",)
  extra_fields: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Plan:
  """Bytes per device of each row (ROWS), the compiled step's own figures, and the peak."""
  stage: str
  devices: int
  rows: dict
  compiled: dict
  fields: dict
  notes: list = dataclasses.field(default_factory=list)

  @property
  def persistent(self) -> int:
    return sum(self.rows[r] for r in PERSISTENT)

  @property
  def step_phase(self) -> int:
    return sum(self.rows[r] for r in STEP_ROWS)

  @property
  def rollout_phase(self) -> int:
    return sum(self.rows[r] for r in ROLLOUT_ROWS)

  @property
  def peak(self) -> int:
    return self.persistent + max(self.step_phase, self.rollout_phase)

  def as_dict(self) -> dict:
    return {"stage": self.stage, "devices": self.devices, "rows": dict(self.rows),
            "compiled": dict(self.compiled), "peak": self.peak, "notes": list(self.notes)}


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------

def device_bytes(tree) -> int:
  """Bytes one device holds of a tree of arrays or ShapeDtypeStructs: a leaf with a sharding
  counts its largest shard, one without counts whole (a replicated or single-device array)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = tuple(x.shape)
    sh = getattr(x, "sharding", None)
    if sh is not None and shape:
      shape = tuple(sh.shard_shape(shape))
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def global_batch(arrays, rows: int, mesh):
  """ShapeDtypeStructs of `rows` rows with the batch sharding, from a tree of arrays with the
  fields, trailing shapes and dtypes of a built batch (any leading row count: a loader's rows,
  or the arrays a builder makes from one record)."""
  sh = shd.batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((rows,) + tuple(x.shape)[1:], x.dtype, sharding=sh), arrays)


def with_rows(tree, rows: int, mesh):
  """ShapeDtypeStructs of `tree` (abstract, batch-major) with `rows` rows, batch-sharded."""
  sh = shd.batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((rows,) + tuple(x.shape)[1:], x.dtype,
                                                     sharding=sh), tree)


def abstract_params(cfg, model, init_params, mesh):
  """The run's initial parameters as ShapeDtypeStructs in the shardings the trainer gives them
  (`common.initial_params`, `lora.Adapters.for_run`), from eval_shape: nothing is allocated."""
  rng = jax.random.fold_in(jax.random.key(cfg.seed), 0)
  boxed = jax.eval_shape(init_params, rng)
  sh = shd.logical_to_sharding(boxed, mesh, shd.rules_from_config(cfg.mesh.rules))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.meta.unbox(boxed), sh)


def replicated(tree, mesh):
  """`tree`'s ShapeDtypeStructs placed whole on every device."""
  r = shd.replicated(mesh)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=r), tree)


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------

def _split_trainable(params):
  """(adapter leaves, other trained leaves) of the state's parameters."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  adapters = [x for path, x in flat if lora_lib.is_adapter_path(path)]
  others = [x for path, x in flat if not lora_lib.is_adapter_path(path)]
  return adapters, others


def compiled_figures(compiled) -> dict:
  """The compiled step's memory_analysis() as plain ints (per device on a mesh)."""
  ma = compiled.memory_analysis()
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
          "temp_size_in_bytes", "generated_code_size_in_bytes")
  out = {k: int(getattr(ma, k)) for k in keys}
  peak = getattr(ma, "peak_memory_in_bytes", None)
  if peak is not None:
    out["peak_memory_in_bytes"] = int(peak)
  return out


def plan(cfg, parts: Parts, *, compile: bool = True) -> Plan:
  """The plan of the run `cfg` describes, from its runner's `parts` (see the module docstring).
  compile=False skips compiling the step (seconds instead of minutes for a large model on CPU):
  the step temporaries are then unknown and counted as 0, so the peak is a lower bound."""
  from gptjax import trainer
  built = trainer.setup(cfg, parts.job)
  state = built.abstract_state
  frozen = built.frozen
  figures = {}
  if compile:
    figures = compiled_figures(built.train_step.lower(state, parts.batch, frozen).compile())

  adapters, trained = _split_trainable(state.params)
  rows = dict.fromkeys(ROWS, 0)
  rows["parameters"] = device_bytes(trained)
  rows["adapters"] = device_bytes(adapters)
  rows["optimizer state"] = device_bytes((state.opt_state, state.step, state.rng))
  rows["frozen models"] = device_bytes(frozen) + sum(device_bytes(t) for t in parts.held.values())
  rows["batch"] = device_bytes(parts.batch)
  rows["rollout buffer"] = device_bytes(parts.rollout_buffer)
  rows["KV cache"] = device_bytes(parts.kv_cache)
  # Outputs that do not alias a donated argument are new buffers (the metrics; the whole state
  # if donation failed), live at the step's end beside its arguments.
  if figures:
    rows["step temporaries"] = figures["temp_size_in_bytes"] + max(
        0, figures["output_size_in_bytes"] - figures["alias_size_in_bytes"])

  seq = tuple(parts.seq_fields)
  fields = {r: tuple(_FIELDS[r]) for r in ROWS}
  fields["batch"] = fields["batch"] + seq
  fields["step temporaries"] = fields["step temporaries"] + seq
  for r, extra in parts.extra_fields.items():
    fields[r] = fields[r] + tuple(extra)
  notes = [] if figures else [
      "step temporaries: not compiled (--no_compile); the peak is a lower bound"]
  if parts.held:
    notes.append("frozen models: " + ", ".join(
        f"{name} {fmt_bytes(device_bytes(t))}" for name, t in parts.held.items())
        + (f", LoRA base {fmt_bytes(device_bytes(frozen))}" if frozen is not None else ""))
  elif frozen is not None:
    notes.append(f"frozen models: LoRA base {fmt_bytes(device_bytes(frozen))}")
  return Plan(stage=str(cfg.stage), devices=parts.job.mesh.size, rows=rows, compiled=figures,
              fields=fields, notes=notes)


def plan_config(cfg, workdir: str | None = None, *, compile: bool = True) -> Plan:
  """The plan of `cfg`, with the parts its stage's runner describes (`stages.memory_parts`)."""
  from gptjax import stages
  return plan(cfg, stages.memory_parts(cfg, workdir), compile=compile)


# --------------------------------------------------------------------------------------------
# Output and the limit
# --------------------------------------------------------------------------------------------

def fmt_bytes(n: int) -> str:
  return f"{n / GiB:.3f} GiB" if n >= GiB // 8 else f"{n / 2**20:.2f} MiB"


def format_table(p: Plan) -> str:
  """One row per category, bytes and GiB per device, then the phases and the peak."""
  lines = [f"memory plan: stage {p.stage}, per device ({p.devices} device"
           f"{'s' if p.devices != 1 else ''})",
           f"  {'':<20}{'bytes':>16}{'GiB':>11}"]
  row = lambda name, n: f"  {name:<20}{n:>16,}{n / GiB:>11.4f}"
  for name in ROWS:
    lines.append(row(name, p.rows[name]))
  lines.append("  " + "-" * 47)
  lines.append(row("persistent", p.persistent))
  lines.append(row("step phase", p.step_phase))
  lines.append(row("rollout phase", p.rollout_phase))
  lines.append(row("peak", p.peak))
  c = p.compiled
  if c:
    lines.append(f"compiled step (XLA memory_analysis): arguments "
                 f"{c['argument_size_in_bytes']:,}, outputs {c['output_size_in_bytes']:,} "
                 f"(aliased {c['alias_size_in_bytes']:,}), temporaries {c['temp_size_in_bytes']:,}")
  lines.extend(p.notes)
  return "\n".join(lines)


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(text: str, what: str = "--memory_limit") -> int:
  """'16GiB', '1.5GB', '800MiB', '123456' -> bytes."""
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
  unit = m.group(2).lower() if m else None
  if m is None or unit not in _UNITS:
    raise config_lib.ConfigError(f"{what}: expected a size such as 16GiB, 1.5GB or 800MiB, got "
                                 f"{text!r}")
  return int(float(m.group(1)) * _UNITS[unit])


def device_limit() -> int | None:
  """The first device's `bytes_limit` where the backend reports one (GPU, TPU); None on CPU."""
  stats = jax.devices()[0].memory_stats()
  limit = (stats or {}).get("bytes_limit")
  return int(limit) if limit else None


def refusal(p: Plan, limit: int, *, largest: int = 3) -> str | None:
  """None when the peak fits `limit`; else one line naming the largest rows and their fields."""
  if p.peak <= limit:
    return None
  # The rows that count towards the peak: the persistent ones and the larger phase's.
  phase = STEP_ROWS if p.step_phase >= p.rollout_phase else ROLLOUT_ROWS
  counted = [r for r in ROWS if (r in PERSISTENT or r in phase) and p.rows[r] > 0]
  top = sorted(counted, key=lambda r: -p.rows[r])[:largest]
  parts = [f"{r} {fmt_bytes(p.rows[r])} ({', '.join(p.fields[r])})" for r in top]
  return (f"memory plan: stage {p.stage} needs {fmt_bytes(p.peak)} per device, over the limit of "
          f"{fmt_bytes(limit)}; the largest: " + "; ".join(parts))


def check_limit(p: Plan, limit: int | None) -> None:
  """Raises ConfigError (one line, exit 2 from the command) when the plan exceeds `limit`."""
  if limit is None:
    return
  msg = refusal(p, limit)
  if msg:
    raise config_lib.ConfigError(msg)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------

def add_arguments(p) -> None:
  p.add_argument("--memory_limit", default="",
                 help="refuse a plan over this many bytes per device (16GiB, 800MiB, ...); "
                 "default: the device's bytes_limit where the backend reports one (not on CPU)")
  p.add_argument("--no_compile", action="store_true",
                 help="shapes only, without compiling the step: seconds, but the step's "
                 "temporaries are left out (a lower bound)")


def report(cfg, *, workdir: str | None = None, memory_limit: str = "",
           as_json: bool = False, compile: bool = True) -> Plan:
  """Prints the plan of `cfg` and refuses it over the limit (ConfigError)."""
  import json
  p = plan_config(cfg, workdir, compile=compile)
  limit = parse_bytes(memory_limit) if memory_limit else device_limit()
  print(json.dumps(p.as_dict(), indent=2) if as_json else format_table(p), flush=True)
  if limit is not None and not as_json:
    print(f"limit: {fmt_bytes(limit)} per device"
          f"{'' if memory_limit else ' (the device reports it)'}", flush=True)
  check_limit(p, limit)
  return p


def main(argv) -> int:
  """`gptjax memory --config x.py:preset [--config.f=v ...] [--memory_limit 16GiB] [--json]`."""
  import argparse
  overrides, rest = config_lib.split_argv(argv)
  ap = argparse.ArgumentParser(prog="gptjax memory")
  ap.add_argument("--config", required=True, help="path.py:preset")
  ap.add_argument("--workdir", default="", help="read its tokenizer if it has one (read only)")
  ap.add_argument("--json", action="store_true", help="print the plan as JSON")
  ap.add_argument("--import", dest="imports", action="append", default=[],
                  help="a module name or .py file to import first, e.g. one that registers a loss")
  add_arguments(ap)
  args = ap.parse_args(rest)
  from gptjax import main as main_lib
  for item in args.imports:
    main_lib.import_user_module(item)
  cfg = config_lib.load(args.config, overrides)
  report(cfg, workdir=args.workdir or None, memory_limit=args.memory_limit, as_json=args.json,
         compile=not args.no_compile)
  return 0
