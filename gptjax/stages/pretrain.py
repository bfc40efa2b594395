"""Stage 1: pretraining, next-token prediction over a text corpus."""

from __future__ import annotations

import os

import jax

from gptjax import checkpoint as ckpt_lib
from gptjax import config as config_lib
from gptjax import model as model_lib
from gptjax import sampling
from gptjax import trainer
from gptjax.data import corpus
from gptjax.data.loader import PackedLoader
from gptjax.data.windows import RandomWindows
from gptjax.stages import common


def _iterator(cfg, docs, tok, *, seed: int, batch: int):
  """`windows`: random windows over the token stream (nanoGPT's sampling, with replacement);
  `packed`: an epoch-aware shuffle of whole documents packed into full rows; `grain`: the same
  batches as `packed`, through a grain pipeline (optionally with worker processes)."""
  pi, pc = jax.process_index(), jax.process_count()
  if cfg.data.loader == "windows":
    return RandomWindows(docs.tokens, seq_len=cfg.data.seq_len, batch_size=batch // pc, seed=seed,
                         process_index=pi, process_count=pc)
  if cfg.data.loader == "packed":
    return PackedLoader(docs, seq_len=cfg.data.seq_len, global_batch=batch, seed=seed,
                        pad_id=tok.pad_id, mode="stream", process_index=pi, process_count=pc)
  if cfg.data.loader == "grain":
    from gptjax.data.grain_loader import GrainStreamLoader
    return GrainStreamLoader(docs, seq_len=cfg.data.seq_len, global_batch=batch, seed=seed,
                             pad_id=tok.pad_id, process_index=pi, process_count=pc,
                             worker_count=cfg.data.grain_workers)
  raise config_lib.ConfigError(f"data.loader: expected 'windows', 'packed' or 'grain', got "
                               f"{cfg.data.loader!r}")


def run(cfg, workdir: str, *, progress: bool = True) -> trainer.TrainResult:
  tok = common.resolve_tokenizer(cfg, workdir, build_char_from=(
      None if os.path.exists(os.path.join(workdir, "tokenizer.json"))
      else corpus.char_vocab_text(cfg)))
  common.fill_vocab_size(cfg, tok)
  env = common.make_env(cfg)
  cache = os.path.join(workdir, "token_cache")
  train_docs = corpus.documents(cfg, "train", tok, cache_dir=cache)
  val_docs = corpus.documents(cfg, "validation", tok, cache_dir=cache)
  seq, gb = cfg.data.seq_len, cfg.train.batch_size
  source = common.LoaderSource(_iterator(cfg, train_docs, tok, seed=cfg.seed, batch=gb), env.mesh)
  loss_fn = common.bind_loss(cfg)
  eval_step = trainer.make_eval_step(loss_fn, env.model)

  def evaluate(state):
    # The same fixed validation windows at every evaluation, so the curve compares like with like.
    val = _iterator(cfg, val_docs, tok, seed=cfg.seed + 1, batch=gb)
    vs = common.LoaderSource(val, env.mesh)
    ms = [eval_step(state.params, vs.next(), None) for _ in range(cfg.train.eval_batches)]
    if hasattr(val, "close"):
      val.close()
    avg = trainer.average_metrics(ms)
    return {"eval/loss": avg["loss"], "eval/ce": avg.get("train/ce", avg["loss"])}

  def sample(state):
    prompts = list(cfg.train.sample_prompts)
    # The model's window bounds prompt + sample; ask for what fits rather than fail mid-run.
    room = env.model_cfg.max_len - max(len(tok.encode(p)) for p in prompts)
    outs, _ = sampling.sample_replies(
        env.model, state.params, [tok.encode(p) for p in prompts], seed=cfg.seed,
        max_new_tokens=max(1, min(cfg.train.sample_tokens, room)), temperature=0.8,
        pad_id=tok.pad_id, eos_ids=())
    return "\n---\n".join(p + tok.decode(o) for p, o in zip(prompts, outs))

  init_from = None
  if cfg.train.init_from:
    init_from = lambda fresh: ckpt_lib.init_from_workdir(cfg.train.init_from, fresh)
  return trainer.train(cfg, trainer.Job(
      model=env.model, loss_fn=loss_fn, source=source, mesh=env.mesh,
      init_params=common.init_params_fn(env.model), init_from=init_from, evaluate=evaluate,
      sample=sample, tokens_per_step=gb * seq,
      flops_per_token=model_lib.flops_per_token(env.model_cfg, seq)),
      workdir=workdir, progress=progress)


def memory_parts(cfg, workdir: str | None = None):
  """What `run` would build, as shapes, for the memory plan (gptjax/memory.py)."""
  common.plan_tokenizer(cfg, workdir, char_text=lambda: corpus.char_vocab_text(cfg))
  env = common.make_env(cfg)
  return common.lm_memory_parts(cfg, env, loss_fn=common.bind_loss(cfg))
