"""LoRA and QLoRA adapters through qwix: a model option (`model.lora.*`) every objective accepts.

    spec = lora.spec_from_config(cfg)            # None when model.lora.rank == 0
    model = lora.wrap(GPT(mcfg), spec)           # qwix adds `<kernel>_lora_a/_lora_b` params
    trainable, base = lora.split(params)         # adapters (+ scalar heads) | frozen base
    full = lora.combine(base, trainable)         # a view: no copy of either tree

What lives here: the spec and its checks, wrapping a model (qwix intercepts the matmuls of the
targeted modules and adds `x·A·B·alpha/rank`), the trainable/frozen split the trainer uses so
that only adapters get gradients and optimizer state, merging adapters into the kernels for
export, and loading a LoRA run's workdir (its checkpoint holds adapters only; the base comes from
that run's own `train.init_from`), and the PEFT export (`export_peft`).

QLoRA (`model.lora.base_quant = "int8" | "nf4"`): the targeted kernels of the frozen base are
stored quantized (`quantize_base`, formats in gptjax/qlora.py), once, when the base is built;
each is dequantized inside the layer scan when its Dense reads it, and the adapters are added on
top of that matmul. qwix's own `quantize_params` is not used: it takes its scale axes from the
per-layer compute shape, and our layers are one scanned [L, ...] kernel.

The reference policy of PPO, GRPO and DPO is the base with the adapters off: `base_model(model)`
applied to `base` (the same buffers the policy reads, quantized ones included), so one copy of
the base weights serves both. qwix initialises B at zero, so a fresh adapter leaves the logits
equal to the base's.
"""

from __future__ import annotations

import dataclasses
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax import qlora

# Logical target names -> module path regexes inside a GPT (relative, so they match the scanned
# stack `blocks/attn/query` and the per-layer modules of cached decoding `attn/query` alike).
TARGETS = {
    "q": r"attn/query", "k": r"attn/key", "v": r"attn/value", "o": r"attn/out",
    "mlp": r"mlp/(fc|proj|gate|up)", "up": r"mlp/(fc|up)", "gate": r"mlp/gate", "down": r"mlp/proj",
}
BASE_QUANTS = (None, "int8", "nf4")
ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
# Parameters that are trained beside the adapters: the scalar head (reward model, value head).
TRAINABLE_MODULES = ("scalar_head",)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple = ("q", "k", "v", "o", "mlp")
  base_quant: str | None = None

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def module_regex(self) -> str:
    return r"(.*/)?(" + "|".join(TARGETS[t] for t in self.targets) + r")"

  def validate(self):
    def bad(field, msg):
      from gptjax.config import ConfigError
      raise ConfigError(f"model.lora.{field}: {msg}")
    if self.rank < 0:
      bad("rank", f"must be >= 0 (0 turns LoRA off), got {self.rank}")
    if self.alpha <= 0:
      bad("alpha", f"must be > 0, got {self.alpha}")
    if not 0.0 <= self.dropout < 1.0:
      bad("dropout", f"must be in [0, 1), got {self.dropout}")
    if not self.targets:
      bad("targets", "is empty; name at least one of " + ", ".join(TARGETS))
    for t in self.targets:
      if t not in TARGETS:
        bad("targets", f"unknown target {t!r}; expected some of {', '.join(TARGETS)}")
    if self.base_quant not in BASE_QUANTS:
      bad("base_quant", f"expected None, 'int8' or 'nf4', got {self.base_quant!r}")


def default_config() -> dict:
  """The `model.lora` fields of a config (rank 0: LoRA off)."""
  return dict(rank=0, alpha=16.0, dropout=0.0, targets=("q", "k", "v", "o", "mlp"),
              base_quant=None)


def spec_from_dict(d) -> LoraSpec | None:
  if not d or not int(d.get("rank", 0)):
    return None
  unknown = sorted(set(d) - set(default_config()))
  if unknown:
    from gptjax.config import ConfigError
    raise ConfigError(f"unknown config field 'model.lora.{unknown[0]}'")
  q = d.get("base_quant")
  spec = LoraSpec(rank=int(d["rank"]), alpha=float(d.get("alpha", 16.0)),
                  dropout=float(d.get("dropout", 0.0)),
                  targets=tuple(d.get("targets", default_config()["targets"])),
                  base_quant=None if q in (None, "", "none", "None") else str(q))
  spec.validate()
  return spec


def spec_from_config(cfg) -> LoraSpec | None:
  """The run's LoRA spec from `cfg.model.lora`, or None (no field, or rank 0)."""
  d = cfg.model.get("lora", None) if hasattr(cfg.model, "get") else None
  if d is None:
    return None
  return spec_from_dict(d.to_dict() if hasattr(d, "to_dict") else dict(d))


# --------------------------------------------------------------------------------------------
# Wrapping a model
# --------------------------------------------------------------------------------------------

class KeepComputeDtype:
  """qwix provider mixin: a LoRA matmul returns the dtype the plain matmul would.

  qwix adds `x·A·B·alpha/rank` with A and B in their float32 storage, so under bfloat16
  compute the sum comes back float32; inside the scanned layer stack that changes the carry's
  dtype and the model cannot even be initialised. The adapter term is computed in float32 and
  rounded once, where it joins the base output (flax's Dense has already cast the input and the
  kernel to the compute dtype, so the input's dtype is the plain matmul's)."""

  def dot_general(self, lhs, rhs, dimension_numbers, precision=None,
                  preferred_element_type=None, **kwargs):
    out = super().dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                              **kwargs)
    return out.astype(preferred_element_type or lhs.dtype)


def _LoraProvider(rules):
  import qwix

  class LoraProvider(KeepComputeDtype, qwix.LoraProvider):
    pass

  return LoraProvider(rules)


def wrap(model: nn.Module, spec: LoraSpec | None, *, training: bool = False) -> nn.Module:
  """`model` with qwix LoRA on the spec's targets (the model itself when spec is None).

  Dropout on the adapter input draws a `dropout` rng on every call, so only the training step's
  model has it (`training=True`); sampling and evaluation run the adapters deterministically.
  """
  if spec is None:
    return model
  import qwix
  rule = qwix.LoraRule(module_path=spec.module_regex(), rank=spec.rank, alpha=spec.alpha,
                       dropout=spec.dropout if training else 0.0)
  provider = (qlora.lora_provider([rule], mixins=(KeepComputeDtype,))
              if spec.base_quant is not None else _LoraProvider([rule]))
  out = qwix.apply_lora_to_model(_plain(model), provider)
  type(out)._gptjax_lora = (spec, training)
  return out


def spec_of(model) -> LoraSpec | None:
  return getattr(type(model), "_gptjax_lora", (None, False))[0]


def _plain(model: nn.Module) -> nn.Module:
  """The network with every qwix wrapper removed."""
  cls = getattr(type(model), "_unquantized_type", None)
  if cls is None:
    return model
  m = model.copy()
  m.__class__ = cls
  return m


def base_model(model: nn.Module) -> nn.Module:
  """The same network with the adapters off: the plain network, or for QLoRA the network that
  reads the quantized base (dequantizing its kernels, no adapters)."""
  if getattr(type(model), "_gptjax_quantized_base", None) is not None:
    return model
  spec = spec_of(model)
  plain = _plain(model)
  if spec is None or spec.base_quant is None:
    return plain
  import qwix
  out = qwix.quantize_model(plain, qlora.base_provider(spec.module_regex()))
  type(out)._gptjax_quantized_base = spec
  return out


def quantize_base(params, spec: LoraSpec | None):
  """For QLoRA, `params` with the targeted kernels stored quantized (adapters and every other
  leaf untouched; already quantized kernels kept). The tree itself otherwise."""
  return qlora.quantize_base(params, spec)


def training_model(model: nn.Module) -> nn.Module:
  """The model the train step differentiates: with adapter dropout when the spec has it."""
  spec = spec_of(model)
  if spec is None or not spec.dropout:
    return model
  return wrap(model, spec, training=True)


def like(reference_model, model: nn.Module) -> nn.Module:
  """Wraps `model` the way `reference_model` is wrapped (e.g. the policy of an actor-critic)."""
  spec, training = getattr(type(reference_model), "_gptjax_lora", (None, False))
  return wrap(model, spec, training=training) if spec is not None else model


# --------------------------------------------------------------------------------------------
# Parameter trees
# --------------------------------------------------------------------------------------------

def _key(path_entry) -> str:
  return str(getattr(path_entry, "key", getattr(path_entry, "name", path_entry)))


def is_adapter_path(path) -> bool:
  return _key(path[-1]).endswith(ADAPTER_SUFFIXES)


def is_trainable_path(path) -> bool:
  names = [_key(p) for p in path]
  return is_adapter_path(path) or any(n in TRAINABLE_MODULES for n in names)


def _flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or (hasattr(v, "items") and not hasattr(v, "shape")
                               and not isinstance(v, nn.meta.AxisMetadata)):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat):
  out = {}
  for path, v in flat.items():
    d = out
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = v
  return out


def split(params):
  """(trainable, base): adapters and scalar heads | everything else. Plain nested dicts that share
  the leaves of `params` (nothing is copied); boxed (logically partitioned) leaves stay boxed."""
  flat = _flatten(dict(params))
  train, base = {}, {}
  for path, v in flat.items():
    is_train = path[-1].endswith(ADAPTER_SUFFIXES) or any(p in TRAINABLE_MODULES for p in path)
    (train if is_train else base)[path] = v
  return _unflatten(train), _unflatten(base)


def combine(base, trainable):
  """The full parameter tree the LoRA model applies: base and trainable leaves side by side."""
  flat = _flatten(dict(base))
  flat.update(_flatten(dict(trainable)))
  return _unflatten(flat)


def strip_adapters(params):
  """`params` without adapter leaves: what the base model (adapters off) applies."""
  flat = _flatten(dict(params))
  return _unflatten({p: v for p, v in flat.items() if not p[-1].endswith(ADAPTER_SUFFIXES)})


def has_adapters(tree) -> bool:
  return any(p[-1].endswith(ADAPTER_SUFFIXES) for p in _flatten(dict(tree)))


def count(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def merge(params, spec: LoraSpec):
  """Adapters folded into their kernels (W + A·B·alpha/rank) and removed: a plain GPT tree.

  qwix's A is [..., in, r] and B [..., r, out] with `in` and `out` the kernel's contracting and
  output dims flattened in order; every GPT kernel lists its contracting dims first, so the product
  reshapes straight onto the kernel (scanned layers add a leading [L] to all three).
  """
  # A QLoRA base is merged as the adapters saw it: dequantized.
  flat = _flatten(dict(qlora.dequantize_base(params)))
  out = {}
  for path, v in flat.items():
    name = path[-1]
    if name.endswith(ADAPTER_SUFFIXES):
      continue
    a = flat.get(path[:-1] + (name + "_lora_a",))
    b = flat.get(path[:-1] + (name + "_lora_b",))
    if a is not None and b is not None:
      delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
      v = (v.astype(jnp.float32) + spec.scale * delta.reshape(v.shape)).astype(v.dtype)
    out[path] = v
  return _unflatten(out)


# --------------------------------------------------------------------------------------------
# Loading a LoRA run's workdir
# --------------------------------------------------------------------------------------------

def workdir_spec(workdir: str) -> LoraSpec | None:
  from gptjax import config as config_lib
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  return spec_from_config(config_lib.from_json(path))


def load_merged(workdir: str, abstract_plain, *, step: int | None = None, sharding=None):
  """The parameters of a LoRA run as a plain tree (adapters merged into the base).

  The checkpoint holds the trainable leaves only. The base is rebuilt the way that run's trainer
  built it: its `train.init_from` loaded into a fresh init with the run's seed (or that fresh init
  alone). `abstract_plain` gives the plain tree's shapes (and shardings, when present)."""
  from gptjax import checkpoint as ckpt_lib
  from gptjax import config as config_lib
  cfg = config_lib.from_json(os.path.join(workdir, "config.json"))
  spec = spec_from_config(cfg)
  actor_critic = ckpt_lib.policy_layout(cfg) == "policy"
  if actor_critic:
    # PPO with `rl.value_model=critic`: {'policy', 'critic'}, both with adapters.
    from gptjax.rl import rollout
    model = rollout.build_model(cfg)
  else:
    model = wrap_for_config(cfg)
  init = jax.eval_shape(lambda: nn.meta.unbox(
      model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
  trainable_abs, _ = split(init)
  trainable = ckpt_lib.restore_params(workdir, trainable_abs, step)
  fresh_full = _fresh_init(cfg, model, abstract_plain)
  base = split(fresh_full)[1]
  if actor_critic:
    # The trainer's rule: the policy from the SFT run, the critic from the reward model's.
    init_from = rollout.make_init_from(cfg, model)
    if init_from is not None:
      base = init_from(base)
  elif cfg.train.init_from:
    base = ckpt_lib.init_from_workdir(cfg.train.init_from, base)
  # QLoRA: the adapters were trained on the quantized base, so they are merged into that.
  return merge(combine(quantize_base(base, spec), trainable), spec)


def wrap_for_config(cfg):
  from gptjax import config as config_lib
  from gptjax.model import GPT
  return wrap(GPT(config_lib.model_config(cfg)), spec_from_config(cfg))


def _fresh_init(cfg, model, abstract_plain):
  """The run's fresh init (trainer: key fold_in(seed, 0)), placed like `abstract_plain`."""
  rng = jax.random.fold_in(jax.random.key(cfg.seed), 0)
  params = jax.jit(lambda r: nn.meta.unbox(model.init(r, jnp.zeros((1, 8), jnp.int32))["params"]))(
      rng)
  plain = _flatten(dict(abstract_plain))
  flat = _flatten(params)
  repl = None
  for path, v in flat.items():
    target = plain.get(path)
    sh = getattr(target, "sharding", None) if target is not None else None
    if sh is None:
      if repl is None:
        repl = jax.sharding.NamedSharding(
            jax.make_mesh((jax.device_count(),), ("all",),
                          axis_types=(jax.sharding.AxisType.Auto,)), jax.sharding.PartitionSpec())
      sh = repl
    flat[path] = jax.device_put(v, sh)
  return _unflatten(flat)


# --------------------------------------------------------------------------------------------
# The trainer's view of a LoRA run
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Adapters:
  """What `trainer.train` swaps in for a LoRA run: init and init_from of the trainable tree only,
  a loss that reads the frozen base from `frozen`, and `view(state)` for the hooks."""
  spec: LoraSpec
  model: nn.Module
  loss_fn: object
  init_params: object
  init_from: object
  frozen: dict
  base: object

  @classmethod
  def for_run(cls, cfg, *, model, loss_fn, init_params, init_from, frozen, mesh, rules,
              init_rng, base_params=None):
    spec = spec_from_config(cfg)
    if spec is None:
      return None
    if spec_of(model) is None:
      raise ValueError("model.lora.rank is set but the stage passed a model without adapters; "
                       "build it with gptjax.lora.wrap")
    from gptjax import sharding as shd
    if base_params is None:
      # The run's initial parameters exactly as a full fine-tune would start (same key, same
      # init_from), built into their shardings; rebuilt on resume since checkpoints hold no base.
      boxed = jax.eval_shape(init_params, init_rng)
      sh = shd.logical_to_sharding(boxed, mesh, rules)
      base_params = jax.jit(lambda r: nn.meta.unbox(init_params(r)), out_shardings=sh)(init_rng)
      if init_from is not None:
        base_params = init_from(base_params)
    # QLoRA: the base is stored quantized from here on (the stages that built base_params have
    # done it already, and it is not done twice).
    start, base = split(quantize_base(base_params, spec))

    def lora_init_params(rng):
      return split(init_params(rng))[0]

    def lora_init_from(fresh):
      return start

    def lora_loss(params, batch, *, frozen, rng, model):
      return loss_fn(combine(frozen["lora_base"], params), batch, frozen=frozen["stage"], rng=rng,
                     model=model)

    return cls(spec=spec, model=training_model(model), loss_fn=lora_loss,
               init_params=lora_init_params, init_from=lora_init_from,
               frozen={"lora_base": base, "stage": frozen}, base=base)

  def view(self, state):
    return state.replace(params=combine(self.base, state.params))


def reference(model, params):
  """(model, params) of the reference policy: the base with the adapters off. For a model without
  adapters, the pair itself."""
  if spec_of(model) is None:
    return model, params
  return base_model(model), strip_adapters(params)


# --------------------------------------------------------------------------------------------
# PEFT export: the adapters alone, loadable by `peft` onto the matching transformers model
# --------------------------------------------------------------------------------------------

# Our module name -> the Llama-family module name in transformers (q_proj, ..., down_proj).
LLAMA_MODULES = {"query": "self_attn.q_proj", "key": "self_attn.k_proj",
                 "value": "self_attn.v_proj", "out": "self_attn.o_proj",
                 "gate": "mlp.gate_proj", "up": "mlp.up_proj", "proj": "mlp.down_proj"}


def export_peft(params, spec: LoraSpec, out_dir: str, *, base_model_name_or_path: str = "",
        prefix: str = "base_model.model.model.layers") -> list[str]:
  """Writes `adapter_config.json` and `adapter_model.safetensors` for a Llama-style model.

  PEFT's LoRA on a Linear computes x·Aᵀ·Bᵀ·(alpha/r) with A [r, in] and B [out, r]; ours is
  x·A·B·(alpha/rank) with A [in, r] and B [r, out], so each layer's slice is transposed and the
  same alpha and r are written (no rescaling). GPT-2's fused `c_attn` has no per-projection
  module to hang q/k/v adapters on, so only the Llama layout is written. Returns the file paths.
  """
  import json
  import numpy as np
  from safetensors.numpy import save_file
  blocks = _flatten(dict(params))
  tensors, targets = {}, set()
  for path, a in blocks.items():
    if path[-1] != "kernel_lora_a":
      continue
    if path[0] != "blocks" or path[-2] not in LLAMA_MODULES:
      raise ValueError(f"export_peft: adapter at {'/'.join(path)} has no Llama counterpart")
    b = np.asarray(blocks[path[:-1] + ("kernel_lora_b",)], np.float32)
    a = np.asarray(a, np.float32)
    hf = LLAMA_MODULES[path[-2]]
    targets.add(hf.split(".")[-1])
    for i in range(a.shape[0]):                      # the scanned [L, ...] stack, per layer
      tensors[f"{prefix}.{i}.{hf}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
      tensors[f"{prefix}.{i}.{hf}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
  if not tensors:
    raise ValueError("export_peft: the parameters hold no adapters")
  os.makedirs(out_dir, exist_ok=True)
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank,
       "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
       "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False,
       "use_rslora": False, "use_dora": False, "inference_mode": True,
       "base_model_name_or_path": base_model_name_or_path}
  cfg_path = os.path.join(out_dir, "adapter_config.json")
  with open(cfg_path, "w") as f:
    json.dump(config, f, indent=2)
  st_path = os.path.join(out_dir, "adapter_model.safetensors")
  save_file(tensors, st_path, metadata={"format": "pt"})
  return [cfg_path, st_path]
