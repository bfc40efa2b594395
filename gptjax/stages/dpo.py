"""Stage 4 (offline): the preference runner. Any objective with runner 'preference' trains here on
a fixed data set: DPO, IPO, ORPO and SimPO on pairs, KTO on labelled single replies, or yours
(cfg.stage = 'dpo' or the objective's name; loss.name picks the objective).

    gptjax train --config experiments/rl.py:dpo_tiny --workdir runs/dpo \
        --config.train.init_from=runs/sft --config.data.tokenizer=runs/sft \
        --config.data.train_source=preference_jsonl:runs/rm_data/train.jsonl

Records come from `data.train_source`: `Objective.read(spec, cfg)` if the objective has its own
format, else preference_jsonl ({"prompt", "chosen", "rejected"}). `Objective.build(records, tok,
seq_len)` encodes them into arrays (default: `encode_pairs`, each reply rendered with the chat
template after its prompt, the loss mask on the reply and its `<|end|>`): a dict whose dict-valued
entries are token rows (LMBatch fields). When the objective needs a reference, the summed reply
log-probs of every such entry `x` under the initial policy (`train.init_from`, else the fresh init)
are computed once, before training, by a forward-only jitted function and carried in the batch as
`ref_<x>_logp`; reference-free objectives get zeros there. The objective's `batch` type is built
from these fields. Evaluation reports the same loss and metrics on `data.eval_source`; at the end
the policy is evaluated on held-out prompts like the RL policies (`eval.json`).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import batches as batches_lib
from gptjax import config as config_lib
from gptjax import lora
from gptjax import sharding as shd
from gptjax import trainer
from gptjax import evaluation
from gptjax import objectives
from gptjax.data import dialogue, in_memory, sources
from gptjax.losses import common as common_losses
from gptjax.stages import common


def encode_pairs(records, tok, seq_len: int) -> dict:
  """{'chosen': LMBatch-like dict, 'rejected': ...} numpy [N, seq_len] from preference records."""
  prompts = [r["prompt"] for r in records]
  return {side: dialogue.encode_replies(prompts, [r[side] for r in records], tok, seq_len)
          for side in ("chosen", "rejected")}


def _strings(obj):
  """Every text inside records (messages' contents, replies): a 'char' vocabulary's text. Role
  names are template markers, not text, so they add no characters."""
  if isinstance(obj, str):
    yield obj
  elif isinstance(obj, dict):
    for k, v in obj.items():
      if k != "role":
        yield from _strings(v)
  elif isinstance(obj, (list, tuple)):
    for v in obj:
      yield from _strings(v)


def load_records(spec: str, cfg, limit: int = 0) -> list[dict]:
  """Preference pairs of a data source spec (preference_jsonl:PATH)."""
  ds = sources.open_source(spec, split="train", data_dir=cfg.data.data_dir or None)
  n = len(ds) if not limit else min(len(ds), limit)
  return [ds[i] for i in range(n)]


@functools.partial(jax.jit, static_argnames=("model",))
def _ref_logps(model, params, sides):
  """Summed reply log-probs [B] of each LMBatch in `sides`, in one forward over all of them."""
  both = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *sides)
  out = model.apply({"params": params}, both.inputs, positions=both.positions,
                    segment_ids=both.segment_ids, deterministic=True)
  lp = common_losses.token_logprobs(out.logits, both.targets)
  seq = jnp.sum(lp * both.loss_mask.astype(jnp.float32), axis=1)
  return jnp.split(seq, len(sides))


def token_sides(arrays) -> list[str]:
  """The entries of built arrays that are token rows (LMBatch fields), in order."""
  return [k for k, v in arrays.items() if isinstance(v, dict)]


def reference_logps(model, params, arrays, *, batch_size: int) -> dict:
  """{'ref_<side>_logp': [N]} for every token side of `arrays` under the reference, once, in
  fixed-size chunks (the last chunk wraps, keeping one shape)."""
  sides = token_sides(arrays)
  n = len(arrays[sides[0]]["inputs"])
  out = {k: [] for k in sides}
  for s in range(0, n, batch_size):
    idx = np.arange(s, s + batch_size) % n
    rows = tuple(batches_lib.LMBatch.from_dict({f: v[idx] for f, v in arrays[k].items()})
                 for k in sides)
    got = jax.device_get(_ref_logps(model, params, rows))
    for k, lp in zip(sides, got):
      out[k].append(lp[:min(batch_size, n - s)])
  return {f"ref_{k}_logp": np.concatenate(v) for k, v in out.items()}


def with_reference(objective, model, ref_params, arrays, *, batch_size: int) -> dict:
  if "reference" in objective.needs:
    return {**arrays, **reference_logps(model, ref_params, arrays, batch_size=batch_size)}
  n = len(jax.tree.leaves(arrays)[0])
  return {**arrays, **{f"ref_{k}_logp": np.zeros(n, np.float32) for k in token_sides(arrays)}}


def batch_maker(objective):
  """arrays (global) -> the objective's batch: token sides become LMBatches."""
  def make(arrays):
    return objective.batch(**{k: batches_lib.LMBatch.from_dict(v) if isinstance(v, dict) else v
                              for k, v in arrays.items()})
  return make


def _objective(cfg):
  """The stage's registered preference objective, checked: it is run by this runner and has a
  data set to read."""
  objective = objectives.for_stage(cfg)
  if objective.runner != "preference":
    raise config_lib.ConfigError(f"loss.name: {cfg.loss.name!r} is not an offline preference "
                                 f"objective (its runner is {objective.runner!r})")
  if not cfg.data.train_source:
    raise config_lib.ConfigError(f"data.train_source: {objective.name} needs a data set "
                                 "(preference_jsonl:PATH)")
  return objective


def run(cfg, workdir: str, *, progress: bool = True) -> trainer.TrainResult:
  objective = _objective(cfg)
  read = objective.read or load_records
  build = objective.build or encode_pairs
  os.makedirs(workdir, exist_ok=True)
  tok = common.start_from_previous(cfg, workdir)
  common.check_no_dropout(cfg)
  train_records = read(cfg.data.train_source, cfg)
  if tok is None:
    tok = common.resolve_tokenizer(cfg, workdir, build_char_from="".join(
        _strings(train_records)))
  common.fill_vocab_size(cfg, tok)
  env = common.make_env(cfg)
  model = env.model
  init_params = common.init_params_fn(model)
  init_from = common.previous_params(cfg)
  init_full = common.initial_params(cfg, model, env.mesh, init_params, init_from)
  # With LoRA the reference is the base with the adapters off; the trainer reuses init_full as
  # its frozen base, so policy and reference share one copy of it.
  ref_model, ref_params = lora.reference(model, init_full)

  seq, bs = cfg.data.seq_len, cfg.train.batch_size
  make_batch = batch_maker(objective)
  arrays = with_reference(objective, ref_model, ref_params, build(train_records, tok, seq),
                          batch_size=bs)
  source = in_memory.InMemorySource(arrays, wrap=make_batch, mesh=env.mesh, global_batch=bs,
                                     seed=cfg.seed, drop_remainder=True,
                                     what=f"{objective.name} examples")
  loss_fn = common.bind_loss(cfg)

  eval_records = read(cfg.data.eval_source, cfg) if cfg.data.eval_source else []
  evaluate = None
  if eval_records:
    eval_arrays = with_reference(objective, ref_model, ref_params, build(eval_records, tok, seq),
                                 batch_size=bs)
    n_eval = in_memory.num_rows(eval_arrays)
    eval_bs = min(bs, n_eval)
    eval_step = trainer.make_eval_step(loss_fn, model)

    def evaluate(state):
      nb = max(1, min(cfg.train.eval_batches, n_eval // eval_bs))
      batches = ((make_batch(shd.to_global(local, env.mesh)), counts)
                 for local, counts in in_memory.fixed_batches(eval_arrays, eval_bs, limit=nb))
      ev = evaluation.weighted_eval(eval_step, state.params, batches,
                                    weights=objective.eval_weights, default_weight="rows")
      return {"eval/loss": ev["loss"],
              **{f"eval/{k.split('/', 1)[1]}": v for k, v in ev.items() if "/" in k}}

  res = trainer.train(cfg, trainer.Job(
      model=model, loss_fn=loss_fn, source=source, mesh=env.mesh, init_params=init_params,
      init_from=init_from, evaluate=evaluate, tokens_per_step=2 * bs * seq,
      base_params=init_full if lora.spec_of(model) is not None else None),
      workdir=workdir, progress=progress)
  if cfg.rl.eval_prompts and not res.interrupted:
    # Every process runs the evaluation (its jitted programs span all of them); only process 0
    # writes the files.
    held = [r["prompt"] for r in eval_records] or dialogue.prompt_messages(cfg,
                                                                           cfg.rl.eval_split)
    evaluation.evaluate_policy(
        (model, res.state.params, tok), prompts=held[:cfg.rl.eval_prompts],
        reference=(ref_model, ref_params), max_new_tokens=cfg.rl.max_new_tokens,
        temperature=cfg.rl.eval_temperature, prompt_len=cfg.rl.prompt_len, seed=cfg.seed,
        out_dir=workdir, label=cfg.loss.name)
  return res


def memory_parts(cfg, workdir: str | None = None):
  """What `run` would build, as shapes, for the memory plan (gptjax/memory.py): the objective's
  batch as its own builder lays out the first record, at train.batch_size rows, and the initial
  parameters `run` keeps as the reference (with LoRA: the trainer's frozen base, counted there)."""
  from gptjax import memory
  objective = _objective(cfg)
  common.check_no_dropout(cfg)
  records = (objective.read or load_records)(cfg.data.train_source, cfg)
  tok = common.plan_tokenizer(cfg, workdir, char_text=lambda: "".join(_strings(records)))
  env = common.make_env(cfg)
  model = env.model
  init_params = common.init_params_fn(model)
  full = memory.abstract_params(cfg, model, init_params, env.mesh)
  arrays = (objective.build or encode_pairs)(records[:1], tok, cfg.data.seq_len)
  # with_reference adds one float32 log-prob per row and token side (zeros when reference-free).
  arrays = {**arrays, **{f"ref_{k}_logp": np.zeros(1, np.float32) for k in token_sides(arrays)}}
  batch = batch_maker(objective)(memory.global_batch(arrays, cfg.train.batch_size, env.mesh))
  spec = lora.spec_of(model)
  job = trainer.Job(model=model, loss_fn=common.bind_loss(cfg), source=None, mesh=env.mesh,
                    init_params=init_params, base_params=full if spec is not None else None)
  held = {} if spec is not None else {"reference policy": full}
  return memory.Parts(job=job, batch=batch, held=held)
