"""Pieces every stage runner shares: the mesh, the model, the tokenizer, starting from the previous
stage, binding the loss and batch sources. Library code: stage runners import it, it imports no
runner."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from gptjax import batches as batches_lib
from gptjax import checkpoint as ckpt_lib
from gptjax import config as config_lib
from gptjax import lora
from gptjax import losses
from gptjax import sharding as shd
from gptjax.data import tokenizers
from gptjax.model import GPT


@dataclasses.dataclass
class Env:
  mesh: jax.sharding.Mesh
  model: GPT
  model_cfg: object


def make_env(cfg, *, scalar_head: bool | None = None) -> Env:
  config_lib.validate(cfg, num_processes=jax.process_count())
  mesh = shd.make_mesh(cfg.mesh.shape)
  mcfg = config_lib.model_config(cfg)
  if scalar_head is not None:
    mcfg = dataclasses.replace(mcfg, scalar_head=scalar_head)
  # LoRA (model.lora.rank > 0) wraps the model here, so every objective built on it trains
  # adapters; the trainer keeps the base frozen (gptjax/lora.py).
  model = lora.wrap(GPT(mcfg), lora.spec_from_config(cfg))
  return Env(mesh=mesh, model=model, model_cfg=mcfg.resolved())


# Model fields that say how the network is run, not what it is. A stage that starts from a
# previous workdir takes that run's architecture, but these stay the current config's: dropout,
# rematerialisation and the compute dtype are choices of this run's training, and taking them from
# the checkpoint silently ignored a `--config.model.dropout_rate` given to a later stage.
RUN_FIELDS = ("dtype", "remat", "dropout_rate", "attention_impl", "scan_unroll", "scalar_head",
              "lora")


def adopt_architecture(cfg, prev_workdir: str) -> None:
  """Sets `cfg.model` to the architecture of the run in `prev_workdir`, keeping RUN_FIELDS.

  Architecture fields the config set to something else (a preset sized for another run) are
  named in a message, so the change is visible."""
  path = os.path.join(prev_workdir, "config.json")
  if not os.path.exists(path):
    raise config_lib.ConfigError(f"train.init_from: {prev_workdir} has no config.json; is it a "
                                 "gptjax workdir?")
  prev = config_lib.from_json(path).model.to_dict()
  mine = cfg.model.to_dict()
  changed = [f"{k} {mine[k]!r} -> {v!r}" for k, v in prev.items()
             if k in mine and k not in RUN_FIELDS and k != "vocab_size" and mine[k] != v]
  merged = {**mine, **prev, **{k: mine[k] for k in RUN_FIELDS if k in mine}}
  with cfg.unlocked():
    cfg.model = ml_collections.ConfigDict(merged)
  if changed:
    print(f"model: the architecture of {prev_workdir} replaces this config's "
          f"({', '.join(changed)})", flush=True)


def init_params_fn(model, seq_len: int = 8):
  def init(rng):
    return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
  return init


def bind_loss(cfg):
  """The registered loss with the config's `loss.*` hyperparameters bound, checked by name."""
  import inspect
  fn = losses.get(cfg.loss.name)
  kw = config_lib.loss_kwargs(cfg)
  params = inspect.signature(fn).parameters
  takes = [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY
           and n not in ("frozen", "rng", "model")]
  if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
    for k in kw:
      if k not in takes:
        raise config_lib.ConfigError(
            f"loss.{k}: loss {cfg.loss.name!r} takes no hyperparameter {k!r}; it takes "
            f"{', '.join(takes) or 'none'}")
  try:
    losses.check(cfg.loss.name, kw)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  return functools.partial(fn, **kw)


class LoaderSource:
  """Adapts a host-local numpy iterator (with get_state/set_state) into a trainer batch source."""

  def __init__(self, iterator, mesh, wrap=batches_lib.LMBatch.from_dict):
    self.iterator, self.mesh, self.wrap = iterator, mesh, wrap

  def next(self, state=None):
    return self.wrap(shd.to_global(next(self.iterator), self.mesh))

  def get_state(self) -> dict:
    return self.iterator.get_state()

  def set_state(self, s: dict) -> None:
    self.iterator.set_state(s)


def local_batch_size(global_batch: int) -> int:
  return global_batch // jax.process_count()


def resolve_tokenizer(cfg, workdir: str, *, build_char_from: str | None = None):
  """The run's tokenizer: the one already in its workdir (so a resumed run can never switch), else
  `data.tokenizer` (a tokenizer dir or .model file, or 'char' built from the training text)."""
  if os.path.exists(os.path.join(workdir, tokenizers.TOKENIZER_FILE)):
    return tokenizers.load_tokenizer(workdir)
  spec = cfg.data.tokenizer
  if spec == "char":
    if build_char_from is None:
      raise ValueError("data.tokenizer='char' needs training text to build its vocabulary")
    tok = tokenizers.CharTokenizer.from_text(build_char_from)
  else:
    tok = tokenizers.load_tokenizer(spec)
  if jax.process_index() == 0:
    tok.save(workdir)
  return tok


def fill_vocab_size(cfg, tok) -> None:
  """model.vocab_size = 0 means "the tokenizer's"; a smaller explicit value is an error."""
  with cfg.unlocked():
    if cfg.model.vocab_size == 0:
      cfg.model.vocab_size = tok.vocab_size
  if cfg.model.vocab_size < tok.vocab_size:
    raise config_lib.ConfigError(
        f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
        f"{tok.vocab_size} ids")


def start_from_previous(cfg, workdir: str, *, scalar_head: bool | None = None):
  """The one way a stage starts from `train.init_from`: takes that run's architecture into
  `cfg.model` (keeping RUN_FIELDS and, if given, setting `scalar_head`), shortens lengths that no
  longer fit its max_len (with a message), and returns the run's tokenizer.

  The tokenizer is the one already in `workdir` (a resumed run never switches); else, with
  `train.init_from`, that run's (so ids match the network), copied into `workdir`; else None,
  and the stage calls `resolve_tokenizer` with what a 'char' vocabulary is built from. With
  `workdir` None (the memory plan) nothing is read from or written to a workdir.
  """
  prev = cfg.train.init_from
  if scalar_head is not None:
    with cfg.unlocked():
      cfg.model.scalar_head = scalar_head
  if prev:
    adopt_architecture(cfg, prev)
    max_len = int(cfg.model.max_len)
    with cfg.unlocked():
      rl = cfg.get("rl")
      if rl is not None and rl.prompt_len + rl.max_new_tokens > max_len:
        new = max(max_len - rl.max_new_tokens, 8)
        print(f"rl.prompt_len: {rl.prompt_len} + rl.max_new_tokens {rl.max_new_tokens} exceeds "
              f"the max_len {max_len} of {prev}; using prompt_len={new}", flush=True)
        rl.prompt_len = new
        rl.max_new_tokens = min(rl.max_new_tokens, max_len - new)
      if cfg.data.seq_len > max_len:
        print(f"data.seq_len: {cfg.data.seq_len} exceeds the max_len {max_len} of {prev}; using "
              f"{max_len}", flush=True)
        cfg.data.seq_len = max_len
  if workdir and os.path.exists(os.path.join(workdir, tokenizers.TOKENIZER_FILE)):
    return tokenizers.load_tokenizer(workdir)
  if prev:
    tok = tokenizers.load_tokenizer(prev)
    if jax.process_index() == 0 and workdir:
      tok.save(workdir)
    return tok
  return None


def plan_tokenizer(cfg, workdir: str | None, *, scalar_head: bool | None = None,
                   char_text=lambda: None):
  """The tokenizer a run of `cfg` would use, for the memory plan: as `start_from_previous` and
  `resolve_tokenizer` choose it, but nothing is written (workdir is only read). `char_text()`
  gives the text a 'char' vocabulary is built from (the runner's own training text). Fills
  model.vocab_size like the run."""
  tok = start_from_previous(cfg, None, scalar_head=scalar_head)
  if tok is None and workdir and os.path.exists(os.path.join(workdir, tokenizers.TOKENIZER_FILE)):
    tok = tokenizers.load_tokenizer(workdir)
  if tok is None:
    spec = cfg.data.tokenizer
    tok = (tokenizers.CharTokenizer.from_text(char_text()) if spec == "char"
           else tokenizers.load_tokenizer(spec))
  fill_vocab_size(cfg, tok)
  return tok


def lm_memory_parts(cfg, env, *, loss_fn, steps=None):
  """The memory plan's parts of a run over packed LMBatch rows (pretrain, SFT): the loaders'
  rows (`packing.empty_batch`, the layout every LM loader fills) at train.batch_size."""
  from gptjax import memory
  from gptjax.data import packing
  model = env.model
  init_params = init_params_fn(model)
  base = (memory.abstract_params(cfg, model, init_params, env.mesh)
          if lora.spec_of(model) is not None else None)
  rows = packing.empty_batch(1, cfg.data.seq_len, pad_id=0)
  batch = batches_lib.LMBatch.from_dict(memory.global_batch(rows, cfg.train.batch_size, env.mesh))
  from gptjax import trainer
  job = trainer.Job(model=model, loss_fn=loss_fn, source=None, mesh=env.mesh,
                    init_params=init_params, base_params=base, steps=steps)
  return memory.Parts(job=job, batch=batch)


def previous_params(cfg):
  """fresh params -> the parameters of `train.init_from` loaded into them; None without one."""
  if not cfg.train.init_from:
    return None
  return lambda fresh: ckpt_lib.init_from_workdir(cfg.train.init_from, fresh)


def write_json(path: str, obj) -> None:
  """Writes atomically, so a crash never leaves half a file that a later run would trust."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def read_json(path: str):
  """The object in `path`, or None when it is missing or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def initial_params(cfg, model, mesh, init_params, init_from):
  """Recomputes the run's initial parameters exactly as the trainer builds them (same key, same
  init_from), so the reference is the starting policy whether or not the run is resuming. With
  QLoRA the targeted base kernels come back quantized (gptjax/qlora.py)."""
  rng = jax.random.fold_in(jax.random.key(cfg.seed), 0)
  boxed = jax.eval_shape(init_params, rng)
  sh = shd.logical_to_sharding(boxed, mesh, shd.rules_from_config(cfg.mesh.rules))
  params = jax.jit(lambda r: nn.meta.unbox(init_params(r)), out_shardings=sh)(rng)
  params = init_from(params) if init_from is not None else params
  # QLoRA: the base is quantized here, once; the reference and the trainer share this copy.
  return lora.quantize_base(params, lora.spec_of(model))


def check_no_dropout(cfg) -> None:
  """The policy losses (PPO, GRPO, DPO) run the network deterministically: a dropout mask would
  make the ratio to the old and reference log-probs differ from 1 with no change of parameters.
  So a dropout rate here would be silently unused; say so instead."""
  if cfg.model.dropout_rate:
    raise config_lib.ConfigError(
        f"model.dropout_rate: {cfg.model.dropout_rate} given, but the {cfg.loss.name} loss runs "
        "without dropout (its log-prob ratios must be 1 at unchanged parameters); set it to 0")
