"""Stage 2: supervised fine-tuning on chats, the LM loss over the assistant's tokens only.

    gptjax train --config experiments/sft.py:tiny --workdir runs/sft \
        --config.train.init_from=runs/pretrain

The model config and the tokenizer come from the previous stage's workdir (`train.init_from`): the
parameters only fit the model they were trained as, and the tokenizer is copied into this workdir so
the run can be resumed, sampled and continued from it alone.

Data (`data.source`):
  shakespeare:dialogue   the embedded default: a speech from a play is the user's turn and the next
                         speaker's reply is the assistant's; training plays train, held-out plays
                         validate. An optional system line names the persona ("You are HAMLET.").
                         Replies longer than `sft.max_reply_chars` are left out and the speech is
                         cut to its last words, so every conversation fits one row whole, with its
                         `<|end|>`: a model can only learn to stop from replies that end in the row.
  chat_jsonl:PATH        your own chats ({"messages": [...]} per line, see docs/assistant_stages.md);
                         `data.val_fraction` of the lines (by hash) form the validation split.

Conversations are packed by the data layer (`data.packing`: first_fit | best_fit | pad;
`data.overlong`: truncate | drop); the padding fraction and the truncated/dropped counts are logged
as `sft/...` metrics and written to eval.json.

After training, the stage evaluates what SFT is for: held-out loss on assistant tokens; base and SFT
replies to the same held-out prompts side by side (`samples.md`, `samples.json`); and the fraction
of replies that end with `<|end|>` within `sft.reply_tokens` tokens, for both models. The numbers go
to `<workdir>/eval.json`.

The dialogue helpers live in `gptjax/data/dialogue.py` and the reply sampler is
`sampling.sample_replies`; the reward-model stage and its preference-data generator use them too.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from gptjax import checkpoint as ckpt_lib
from gptjax import config as config_lib
from gptjax import model as model_lib
from gptjax import sampling
from gptjax import trainer
from gptjax import evaluation
from gptjax.data import chat, dialogue, packing
from gptjax.data.dialogue import DIALOGUE
from gptjax.data.loader import PackedLoader
from gptjax.stages import common

# --------------------------------------------------------------------------------------------
# Conversations.
# --------------------------------------------------------------------------------------------

def conversations(cfg, split: str) -> tuple[list[list[dict]], dict]:
  """The split's conversations as message lists, and counts of what was left out."""
  src = cfg.data.source
  if src == DIALOGUE:
    examples = dialogue.dialogue_examples(split, val_fraction=cfg.data.val_fraction)
    limit = cfg.sft.max_reply_chars
    kept = [e for e in examples if not limit or len(" ".join(e["reply"].split())) <= limit]
    chars = dialogue.prompt_char_budget(cfg)
    convs = [dialogue.dialogue_messages(e, prompt_chars=chars, persona=cfg.sft.persona) for e in kept]
    return convs, {"examples": len(examples), "skipped_long_replies": len(examples) - len(kept),
                   "prompt_chars": chars}
  if src.startswith("chat_jsonl:"):
    from gptjax.data import sources
    ds = sources.open_source(src, split=split, data_dir=cfg.data.data_dir or None,
                             val_fraction=cfg.data.val_fraction)
    convs = [ds[i]["messages"] for i in range(len(ds))]
    return convs, {"examples": len(convs)}
  raise config_lib.ConfigError(f"data.source: SFT reads '{DIALOGUE}' or 'chat_jsonl:PATH', got "
                               f"{src!r}")


def rendered(convs, tok) -> list:
  """Rendered (ids, mask) per conversation; None for one with nothing to train (the loader counts
  it as dropped)."""
  out = []
  for m in convs:
    ids, mask = chat.render(m, tok)
    out.append((np.asarray(ids, np.int32), np.asarray(mask, np.float32)) if any(mask) else None)
  return out


class PackedSource(common.LoaderSource):
  """A packed SFT loader as a batch source that also reports its packing counts."""

  def __init__(self, loader, mesh, prefix: str = "sft"):
    super().__init__(loader, mesh)
    self.prefix = prefix

  def pop_metrics(self) -> dict:
    s = self.iterator.pack_stats
    return {f"{self.prefix}/padding_fraction": s.padding_fraction,
            f"{self.prefix}/truncated": float(s.truncated),
            f"{self.prefix}/dropped_overlong": float(s.dropped_overlong),
            f"{self.prefix}/dropped_untrained": float(s.dropped_untrained)}


# --------------------------------------------------------------------------------------------
# The runner.
# --------------------------------------------------------------------------------------------

def eval_batches(loader, mesh):
  """(LMBatch, no extra counts) for every batch of a finite loader; closes it at the end."""
  src = common.LoaderSource(loader, mesh)
  try:
    while True:
      try:
        yield src.next(), {}
      except StopIteration:
        return
  finally:
    loader.close()


def run(cfg, workdir: str, *, progress: bool = True) -> trainer.TrainResult:
  os.makedirs(workdir, exist_ok=True)
  tok = common.start_from_previous(cfg, workdir, scalar_head=False)
  train_convs, train_counts = conversations(cfg, "train")
  val_convs, val_counts = conversations(cfg, "validation")
  if tok is None:
    text = "".join(m["content"] for c in train_convs for m in c)
    tok = common.resolve_tokenizer(cfg, workdir, build_char_from=text)
  common.fill_vocab_size(cfg, tok)
  env = common.make_env(cfg)
  seq, gb = cfg.data.seq_len, cfg.train.batch_size
  loader_kw = dict(seq_len=seq, pad_id=tok.pad_id, mode=cfg.data.packing,
                   overlong=cfg.data.overlong)
  train_docs, val_docs = rendered(train_convs, tok), rendered(val_convs, tok)
  if cfg.data.get("loader") == "grain":
    # The same batches and pack_stats through a grain pipeline (gptjax/data/grain_loader.py).
    from gptjax.data.grain_loader import GrainPackedLoader
    loader = GrainPackedLoader(train_docs, global_batch=gb, seed=cfg.seed, name="sft/train",
                               worker_count=cfg.data.get("grain_workers", 0), **loader_kw)
  else:
    loader = PackedLoader(train_docs, global_batch=gb, seed=cfg.seed, name="sft/train",
                          **loader_kw)
  source = PackedSource(loader, env.mesh)
  loss_fn = common.bind_loss(cfg)
  eval_step = trainer.make_eval_step(loss_fn, env.model)

  def evaluate(state):
    val = PackedLoader(val_docs, global_batch=gb, seed=cfg.seed, shuffle=False, num_epochs=1,
                       name="sft/validation", **loader_kw)
    ev = evaluation.weighted_eval(eval_step, state.params, eval_batches(val, env.mesh),
                                  weights={"sft/ce": "sft/tokens", "sft/accuracy": "sft/tokens"},
                                  limit=cfg.train.eval_batches)
    return {"eval/loss": ev["sft/ce"], "eval/accuracy": ev["sft/accuracy"],
            "eval/tokens": ev["sft/tokens"]}

  init_from = common.previous_params(cfg)
  result = trainer.train(cfg, trainer.Job(
      model=env.model, loss_fn=loss_fn, source=source, mesh=env.mesh,
      init_params=common.init_params_fn(env.model), init_from=init_from, evaluate=evaluate,
      tokens_per_step=gb * seq, flops_per_token=model_lib.flops_per_token(env.model_cfg, seq)),
      workdir=workdir, progress=progress)
  loader.close()
  if result.interrupted:
    return result

  eval_path = os.path.join(workdir, "eval.json")
  done = common.read_json(eval_path)
  if done and done.get("step") == result.step:
    result.eval = done
    return result

  # Packing counts over one full pass of each split (the logged ones cover only what this process
  # read since it last started).
  def pass_stats(docs):
    ex = [d for d in docs if d is not None]
    _, stats = packing.pack_examples(ex, seq_len=seq, pad_id=tok.pad_id, method=cfg.data.packing,
                                     overlong=cfg.data.overlong, num_bins=gb)
    stats.examples += len(docs) - len(ex)
    stats.dropped_untrained += len(docs) - len(ex)
    return stats.as_dict()

  report = {"stage": "sft", "step": result.step, "data_source": cfg.data.source,
            "packing": cfg.data.packing, "overlong": cfg.data.overlong,
            "train_conversations": len(train_convs), "validation_conversations": len(val_convs),
            "data_train": train_counts, "data_validation": val_counts,
            "pack_train": pass_stats(train_docs), "pack_validation": pass_stats(val_docs)}
  report.update(evaluate(result.state))
  report.update(compare_with_base(cfg, workdir, env.model, result.state.params, tok, val_convs))
  if jax.process_index() == 0:
    common.write_json(eval_path, report)
  fractions = ", ".join(f"{who} {report[key]:.1%}" for who, key in (
      ("SFT", "end_of_turn_fraction"), ("base", "base_end_of_turn_fraction"))
      if report.get(key) is not None)
  print(f"[{workdir}] SFT eval: held-out loss {report['eval/loss']:.4f}"
        + (f"; replies ending with <|end|> within {cfg.sft.reply_tokens} tokens: {fractions}"
           if fractions else ""), flush=True)
  result.eval = report
  return result


def compare_with_base(cfg, workdir, model, params, tok, val_convs) -> dict:
  """Base and SFT replies to the same held-out prompts; writes samples.md and samples.json."""
  s = cfg.sft
  prompts, refs = zip(*[dialogue.split_for_generation(c) for c in val_convs])
  rng = np.random.default_rng(cfg.seed)
  order = rng.permutation(len(prompts))[:s.eval_prompts]
  chosen = [prompts[i] for i in order]
  ids, kept = dialogue.fit_prompts(chosen, tok, max_len=cfg.model.max_len, reply_tokens=s.reply_tokens)
  if not ids:
    return {"end_of_turn_fraction": None, "base_end_of_turn_fraction": None, "eval_prompts": 0}
  kw = dict(seed=cfg.seed + 7, max_new_tokens=s.reply_tokens, temperature=s.eval_temperature,
            top_k=s.eval_top_k, pad_id=tok.pad_id, eos_ids=chat.reply_stop_ids(tok))
  sft_replies, sft_ended = sampling.sample_replies(model, params, ids, **kw)
  base_replies, base_ended = None, None
  if cfg.train.init_from:
    base_model, base_params, _, _ = ckpt_lib.load_for_inference(cfg.train.init_from)
    base_replies, base_ended = sampling.sample_replies(base_model, base_params, ids, **kw)
  rows = []
  for n, i in enumerate(kept):
    row = {"prompt": chosen[i], "reference": refs[order[i]],
           "sft": chat.parse_reply(sft_replies[n], tok), "sft_ended": bool(sft_ended[n])}
    if base_replies is not None:
      row.update(base=chat.parse_reply(base_replies[n], tok), base_ended=bool(base_ended[n]))
    rows.append(row)
  if jax.process_index() == 0:
    common.write_json(os.path.join(workdir, "samples.json"), rows)
    lines = ["# SFT samples: base model vs SFT model on held-out prompts", "",
             f"Sampling: temperature {s.eval_temperature}, top-k {s.eval_top_k or 'off'}, at most "
             f"{s.reply_tokens} new tokens; a reply that did not end with <|end|> is marked "
             "[no end].", ""]
    for r in rows[:s.show_samples]:
      who = "\n".join(f"> **{m['role']}**: {m['content']}" for m in r["prompt"])
      lines += [who, "", f"- reference: {r['reference']}"]
      if "base" in r:
        lines.append(f"- base: {r['base']}" + ("" if r["base_ended"] else " [no end]"))
      lines += [f"- SFT: {r['sft']}" + ("" if r["sft_ended"] else " [no end]"), ""]
    with open(os.path.join(workdir, "samples.md"), "w") as f:
      f.write("\n".join(lines))
  return {"eval_prompts": len(ids), "reply_tokens": s.reply_tokens,
          "end_of_turn_fraction": float(np.mean(sft_ended)),
          "base_end_of_turn_fraction": None if base_ended is None else float(np.mean(base_ended)),
          "mean_reply_tokens": float(np.mean([len(r) for r in sft_replies]))}


def memory_parts(cfg, workdir: str | None = None):
  """What `run` would build, as shapes, for the memory plan (gptjax/memory.py)."""
  def char_text():
    convs, _ = conversations(cfg, "train")
    return "".join(m["content"] for c in convs for m in c)
  common.plan_tokenizer(cfg, workdir, scalar_head=False, char_text=char_text)
  env = common.make_env(cfg)
  return common.lm_memory_parts(cfg, env, loss_fn=common.bind_loss(cfg))
