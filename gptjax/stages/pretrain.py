"""Stage 1: pretraining, next-token prediction over a text corpus."""

from __future__ import annotations

import jax
import numpy as np

from gptjax import checkpoint as ckpt_lib
from gptjax import model as model_lib
from gptjax import trainer
from gptjax.data import shakespeare
from gptjax.data.windows import RandomWindows
from gptjax.stages import common


def corpus(cfg, split: str) -> str:
  src = cfg.data.source
  if src == "shakespeare":
    return shakespeare.corpus_text(split, cfg.data.val_fraction)
  from gptjax.data import sources
  ds = sources.open_source(src, split=split, data_dir=cfg.data.data_dir or None)
  field = cfg.data.get("text_field", "text")
  texts = []
  for i in range(len(ds)):
    ex = ds[i]
    if field not in ex:
      raise ValueError(f"data.source {src!r}: example {i} has no field {field!r} "
                       f"(fields: {sorted(ex)}); set data.text_field")
    v = ex[field]
    texts.append(v.decode() if isinstance(v, bytes) else str(v))
  eos = "\n\n"
  return eos.join(texts)


def run(cfg, workdir: str, *, progress: bool = True) -> trainer.TrainResult:
  train_text = corpus(cfg, "train")
  tok = common.resolve_tokenizer(cfg, workdir, build_char_from=train_text)
  common.fill_vocab_size(cfg, tok)
  env = common.make_env(cfg)
  train_tokens = np.asarray(tok.encode(train_text), np.int32)
  val_tokens = np.asarray(tok.encode(corpus(cfg, "validation")), np.int32)
  seq, gb = cfg.data.seq_len, cfg.train.batch_size
  local_b = common.local_batch_size(gb)
  it = RandomWindows(train_tokens, seq_len=seq, batch_size=local_b, seed=cfg.seed,
                     process_index=jax.process_index(), process_count=jax.process_count())
  source = common.LoaderSource(it, env.mesh)
  loss_fn = common.bind_loss(cfg)
  eval_step = trainer.make_eval_step(loss_fn, env.model)

  def evaluate(state):
    # The same fixed validation windows at every evaluation, so the curve compares like with like.
    val = RandomWindows(val_tokens, seq_len=seq, batch_size=local_b, seed=cfg.seed + 1,
                        process_index=jax.process_index(), process_count=jax.process_count())
    vs = common.LoaderSource(val, env.mesh)
    ms = [eval_step(state.params, vs.next(), None) for _ in range(cfg.train.eval_batches)]
    avg = trainer.average_metrics(ms)
    return {"eval/loss": avg["loss"], "eval/ce": avg.get("train/ce", avg["loss"])}

  def sample(state):
    prompts = list(cfg.train.sample_prompts)
    outs = common.sample_prompts(env.model, state.params, tok, prompts, seed=cfg.seed,
                                 max_new_tokens=cfg.train.sample_tokens, temperature=0.8)
    return "\n---\n".join(p + o for p, o in zip(prompts, outs))

  init_from = None
  if cfg.train.init_from:
    init_from = lambda fresh: ckpt_lib.init_from_workdir(cfg.train.init_from, fresh)
  return trainer.train(
      cfg, workdir=workdir, model=env.model, loss_fn=loss_fn, source=source, mesh=env.mesh,
      init_params=common.init_params_fn(env.model), init_from=init_from, evaluate=evaluate,
      sample=sample, tokens_per_step=gb * seq,
      flops_per_token=model_lib.flops_per_token(env.model_cfg, seq), progress=progress)
