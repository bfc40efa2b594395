"""Hugging Face models in and out: load a model directory as a gptjax model, write one back.

    model, params, tok = load_pretrained("Qwen2.5-0.5B-Instruct", dtype=jnp.bfloat16, mesh=mesh)
    out = model.apply({"params": params}, tokens)          # logits, as for any gptjax model
    save_pretrained(model, params, tok, "exported/")       # transformers loads it

Families: GPT-2, Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, Gemma 3 (text), as ...ForCausalLM
or ...ForSequenceClassification (a reward model: our scalar head). configs.py maps config.json,
weights.py the tensors, tokenizer.py the tokenizer and chat template.

`import_to_workdir` turns a model directory into a gptjax workdir (config.json, an orbax
checkpoint at step 0, the tokenizer), which every stage can start from; `train.init_from=hf:DIR`
does that once inside the run's workdir (`resolve_init`), so SFT, RM, DPO, PPO and GRPO need no
code of their own for it. Not here: training, sampling (those take the returned model as it is).
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from gptjax import sharding as shd
from gptjax.hf import configs, weights
from gptjax.hf.configs import HFError
from gptjax.hf.tokenizer import HFTokenizer
from gptjax.model import GPT, ModelConfig

HF_PREFIX = "hf:"
MAX_SHARD_BYTES = 5 * 1024 ** 3
_DTYPE_NAMES = {jnp.dtype(jnp.float32): "float32", jnp.dtype(jnp.bfloat16): "bfloat16",
                jnp.dtype(jnp.float16): "float16"}


def _dtype_name(dtype) -> str:
  try:
    return _DTYPE_NAMES[jnp.dtype(dtype)]
  except (KeyError, TypeError):
    raise HFError(f"dtype: expected float32, bfloat16 or float16, got {dtype!r}") from None


def _prefix(ckpt, info) -> str:
  """Base-model checkpoints (GPT2Model, LlamaModel) store names without the task prefix."""
  first = "wte.weight" if info.model_type == "gpt2" else "embed_tokens.weight"
  if info.weights_prefix + first in ckpt.where:
    return info.weights_prefix
  return "" if first in ckpt.where else info.weights_prefix


def load_pretrained(directory: str, *, dtype=None, mesh=None, rules=None):
  """(model, params, tokenizer or None) from a Hugging Face model directory.

  Parameters go straight into their NamedShardings on `mesh` (default: the first device) under
  the logical-axis `rules` (default: sharding.DEFAULT_RULES); each process reads only the slices
  its devices hold. `dtype` sets the parameter and compute dtype (default float32), converting
  while reading."""
  fields, info = configs.read_config(directory)
  if dtype is not None:
    fields.update(param_dtype=_dtype_name(dtype), dtype=_dtype_name(dtype))
  model = GPT(ModelConfig(**fields))
  cfg = model.cfg.resolved()
  if mesh is None:
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
                                               )["params"])
  shardings = traverse_util.flatten_dict(
      shd.logical_to_sharding(abstract, mesh, rules or shd.DEFAULT_RULES))
  shapes = traverse_util.flatten_dict(nn.meta.unbox(abstract))
  targets = {p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings[p])
             for p, x in shapes.items()}

  ckpt = weights.Checkpoint(directory)
  sources = weights.param_sources(cfg, info.model_type, info.head, _prefix(ckpt, info))
  # The reward head's bias has no HF tensor (`score` has none); it starts, and exports, at 0.
  zero = {p for p in targets if p == ("scalar_head", "bias")}
  read = {p: t for p, t in targets.items() if p not in zero}
  missing = [p for p in read if p not in sources]
  if missing:
    raise HFError(f"config.json: gptjax has no Hugging Face tensor for parameter "
                  f"{'/'.join(missing[0])} of a {info.model_type} model")
  needed = {p: sources[p] for p in read}
  weights.check_shapes(ckpt, needed, cfg.num_layers)
  flat = weights.load_params(ckpt, needed, read)
  for p in zero:
    flat[p] = jax.device_put(jnp.zeros(targets[p].shape, targets[p].dtype), targets[p].sharding)
  params = traverse_util.unflatten_dict(flat)

  tok = None
  if os.path.exists(os.path.join(directory, "tokenizer.json")):
    tok = HFTokenizer(directory, model_vocab_size=cfg.vocab_size)
    if tok.vocab_size > cfg.vocab_size:
      raise HFError(f"tokenizer.json: {tok.vocab_size} tokens, but config.json field "
                    f"'vocab_size' = {cfg.vocab_size} has no embedding row for the rest")
  return model, params, tok


def _fold_score_bias(cfg, flat: dict) -> dict:
  """HF's `score` head has no bias. Ours is exported exactly: a zero bias is dropped; a nonzero
  one moves into the final LayerNorm's bias (shifting it by b·w/|w|² adds b to w·h, and a
  sequence-classification model uses that norm for nothing else); with RMSNorm (no bias to
  absorb it) the export is refused rather than changing every reward by a constant."""
  if ("scalar_head", "bias") not in flat:
    return flat
  flat = dict(flat)
  b = np.asarray(flat.pop(("scalar_head", "bias")), np.float64).reshape(())
  if b == 0:
    return flat
  if cfg.norm != "layernorm":
    raise HFError(f"scalar_head/bias = {float(b)!r}: a Hugging Face score head has no bias and "
                  f"a {cfg.norm} final norm cannot absorb it; export the RM before normalising it")
  w = np.asarray(flat[("scalar_head", "kernel")], np.float64)[:, 0]
  ln_bias = np.asarray(flat[("ln_final", "bias")])
  flat[("ln_final", "bias")] = (ln_bias + b * w / np.dot(w, w)).astype(ln_bias.dtype)
  return flat


def save_pretrained(model, params, tokenizer, out_dir: str, *, dtype=None,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
  """Writes config.json, safetensors (sharded above `max_shard_bytes`), generation_config.json
  and, for a Hugging Face tokenizer, its files. Returns the files written. A tokenizer that has
  no Hugging Face form (gptjax's char or SentencePiece ones) is left out, with a message."""
  cfg = model.cfg.resolved()
  family = configs.export_family(cfg)
  head = "score" if cfg.scalar_head else "lm"
  prefix = "transformer." if family == "gpt2" else "model."
  flat = {p: shd.to_host(x) for p, x in traverse_util.flatten_dict(nn.meta.unbox(params)).items()}
  if cfg.scalar_head:
    flat = _fold_score_bias(cfg, flat)
    flat = {p: x for p, x in flat.items() if p[0] != "lm_head"}
  out_dtype = _dtype_name(dtype) if dtype is not None else _dtype_name(
      next(iter(flat.values())).dtype)
  hf_tok = tokenizer if isinstance(tokenizer, HFTokenizer) else None
  ids = dict(bos_token_id=getattr(hf_tok, "bos_id", None),
             eos_token_ids=getattr(hf_tok, "stop_ids", ()),
             pad_token_id=getattr(hf_tok, "pad_id", None))
  config = configs.write_config(cfg, dtype=out_dtype, **ids)
  sources = weights.param_sources(cfg, family, head, prefix)
  unknown = [p for p in flat if p not in sources]
  if unknown:
    raise HFError(f"parameter {'/'.join(unknown[0])} has no place in a Hugging Face {family} "
                  "model")
  if jax.process_index() != 0:
    return []
  os.makedirs(out_dir, exist_ok=True)
  cast = jnp.dtype(out_dtype)
  tensors = ((n, x.astype(cast)) for n, x in weights.to_hf_tensors(flat, sources, cfg.num_layers))
  files = weights.write_safetensors(tensors, out_dir, max_shard_bytes=max_shard_bytes)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  generation = {"bos_token_id": ids["bos_token_id"], "eos_token_id": list(ids["eos_token_ids"]),
                "pad_token_id": ids["pad_token_id"]}
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump({k: v for k, v in generation.items() if v not in (None, [])}, f, indent=2)
  files += ["config.json", "generation_config.json"]
  if hf_tok is not None:
    hf_tok.save_hf(out_dir)
    files += [n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                          "chat_template.jinja") if os.path.exists(os.path.join(out_dir, n))]
  elif tokenizer is not None:
    print(f"export: a {getattr(tokenizer, 'kind', type(tokenizer).__name__)} tokenizer has no "
          "Hugging Face form; exported the model without tokenizer files", flush=True)
  return files


# ------------------------------------------------------------------------------------------------
# Workdirs: import-hf, export-hf, and train.init_from=hf:DIR
# ------------------------------------------------------------------------------------------------

def import_to_workdir(model_dir: str, workdir: str, *, dtype=None) -> str:
  """Writes `model_dir` as a gptjax workdir: config.json (the `model` section), an orbax
  checkpoint at step 0 and the tokenizer, so any stage's `train.init_from` can name it."""
  from gptjax import checkpoint as ckpt_lib
  model, params, tok = load_pretrained(model_dir, dtype=dtype)
  fields = dataclasses.asdict(model.cfg)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump({"model": fields, "hf": {"source": os.path.abspath(model_dir)}}, f, indent=2)
    if tok is not None:
      tok.save(workdir)
  saver = ckpt_lib.Checkpointer(workdir, keep=1)
  saver.save(0, {"params": params}, {"hf_source": os.path.abspath(model_dir)})
  saver.close()
  return workdir


def export_workdir(workdir: str, out_dir: str, *, step: int | None = None, dtype=None,
                   max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
  """The newest checkpoint of a gptjax workdir (any stage) as a Hugging Face model directory."""
  from gptjax import checkpoint as ckpt_lib
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise HFError(f"{workdir}: no config.json; is it a gptjax workdir?")
  model, params, tok, _ = ckpt_lib.load_for_inference(workdir, step)
  return save_pretrained(model, params, tok, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)


def resolve_init(spec: str, workdir: str, name: str) -> str:
  """`hf:DIR` -> a gptjax workdir holding DIR's import (made once, inside `workdir`); any other
  spec is returned unchanged. The one place stages learn about Hugging Face directories."""
  if not (isinstance(spec, str) and spec.startswith(HF_PREFIX)):
    return spec
  model_dir = spec[len(HF_PREFIX):]
  target = os.path.join(workdir, "hf_init", name)
  done = os.path.join(target, "checkpoints")
  if not os.path.isdir(done) or not os.listdir(done):
    print(f"{name}: importing the Hugging Face model {model_dir} into {target}", flush=True)
    import_to_workdir(model_dir, target)
  return target


def resolve_stage_config(cfg, workdir: str) -> None:
  """Rewrites `train.init_from` and `rl.reward_workdir` given as `hf:DIR` into imported workdirs."""
  with cfg.unlocked():
    if cfg.get("train") is not None and cfg.train.get("init_from"):
      cfg.train.init_from = resolve_init(cfg.train.init_from, workdir, "init_from")
    if cfg.get("rl") is not None and cfg.rl.get("reward_workdir"):
      cfg.rl.reward_workdir = resolve_init(cfg.rl.reward_workdir, workdir, "reward")


# ------------------------------------------------------------------------------------------------
# The commands
# ------------------------------------------------------------------------------------------------

def import_main(argv) -> int:
  import argparse
  p = argparse.ArgumentParser(prog="gptjax import-hf",
                              description="A Hugging Face model directory -> a gptjax workdir")
  p.add_argument("--model", required=True, help="directory with config.json and safetensors")
  p.add_argument("--workdir", required=True)
  p.add_argument("--dtype", default=None, choices=sorted(set(_DTYPE_NAMES.values())))
  args = p.parse_args(argv)
  import_to_workdir(args.model, args.workdir, dtype=args.dtype)
  print(f"imported {args.model} into {args.workdir}")
  return 0


def export_main(argv) -> int:
  import argparse
  p = argparse.ArgumentParser(prog="gptjax export-hf",
                              description="A gptjax workdir -> a Hugging Face model directory")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--dtype", default=None, choices=sorted(set(_DTYPE_NAMES.values())))
  p.add_argument("--max_shard_gb", type=float, default=MAX_SHARD_BYTES / 1024 ** 3)
  args = p.parse_args(argv)
  files = export_workdir(args.workdir, args.out, step=args.step, dtype=args.dtype,
                         max_shard_bytes=int(args.max_shard_gb * 1024 ** 3))
  print(f"exported {args.workdir} to {args.out}: {', '.join(files)}")
  return 0
