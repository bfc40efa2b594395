"""Stage 4 (offline): DPO / IPO on preference pairs (cfg.stage = 'dpo'; loss.name 'dpo' or 'ipo').

    gptjax train --config experiments/rl.py:dpo_tiny --workdir runs/dpo \
        --config.train.init_from=runs/sft --config.data.tokenizer=runs/sft \
        --config.data.train_source=preference_jsonl:runs/rm_data/train.jsonl

Pairs come from `data.train_source` (preference_jsonl: {"prompt", "chosen", "rejected"}), each
reply rendered with the chat template after its prompt, the loss mask on the reply and its
`<|end|>`. The reference is the initial policy (`train.init_from`, else the fresh init); its
summed reply log-probs are computed once, before training, by a forward-only jitted function and
carried in every `DPOBatch`. Evaluation reports the same loss and metrics on `data.eval_source`;
at the end the policy is evaluated on held-out prompts like the RL policies (`eval.json`).
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from gptjax import batches as batches_lib
from gptjax import config as config_lib
from gptjax import lora
from gptjax import sharding as shd
from gptjax import trainer
from gptjax import evaluation
from gptjax.data import chat, dialogue, in_memory, sources
from gptjax.losses import dpo as dpo_lib
from gptjax.stages import common


def _encode_pair_side(prompt_ids, reply_ids, seq_len):
  """ids (≤ seq_len + 1) and the mask of trained targets for one prompt + reply."""
  room = seq_len + 1
  reply_ids = reply_ids[:max(room - 4, 1)]
  keep = room - len(reply_ids)
  if len(prompt_ids) > keep:
    prompt_ids = prompt_ids[:2] + prompt_ids[len(prompt_ids) - (keep - 2):]
  ids = prompt_ids + reply_ids
  return ids, len(prompt_ids)


def encode_pairs(records, tok, seq_len: int) -> dict:
  """{'chosen': LMBatch-like dict, 'rejected': ...} numpy [N, seq_len] from preference records."""
  out = {}
  for side in ("chosen", "rejected"):
    n = len(records)
    f = {k: np.zeros((n, seq_len), np.int32) for k in ("inputs", "targets", "segment_ids")}
    f["inputs"][:] = tok.pad_id
    f["targets"][:] = tok.pad_id
    f["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy()
    f["loss_mask"] = np.zeros((n, seq_len), np.float32)
    for i, r in enumerate(records):
      ids, p = _encode_pair_side(chat.render_prompt(r["prompt"], tok),
                                 chat.reply_ids(tok, r["prompt"], r[side]), seq_len)
      t = len(ids) - 1
      f["inputs"][i, :t], f["targets"][i, :t] = ids[:-1], ids[1:]
      f["segment_ids"][i, :t] = 1
      f["loss_mask"][i, p - 1:t] = 1
    out[side] = f
  return out


def load_records(spec: str, cfg, limit: int = 0) -> list[dict]:
  ds = sources.open_source(spec, split="train", data_dir=cfg.data.data_dir or None)
  n = len(ds) if not limit else min(len(ds), limit)
  return [ds[i] for i in range(n)]


@functools.partial(jax.jit, static_argnames=("model",))
def _ref_logps(model, params, chosen, rejected):
  return dpo_lib.sequence_logps(model, params, chosen, rejected)


def reference_logps(model, params, pairs, *, batch_size: int):
  """Summed reply log-probs of every pair under the reference, once, in fixed-size chunks."""
  n = pairs["chosen"]["inputs"].shape[0]
  out_c, out_r = [], []
  for s in range(0, n, batch_size):
    idx = np.arange(s, s + batch_size) % n          # the last chunk wraps, keeping one shape
    c = batches_lib.LMBatch.from_dict({k: v[idx] for k, v in pairs["chosen"].items()})
    r = batches_lib.LMBatch.from_dict({k: v[idx] for k, v in pairs["rejected"].items()})
    lc, lr = jax.device_get(_ref_logps(model, params, c, r))
    take = min(batch_size, n - s)
    out_c.append(lc[:take])
    out_r.append(lr[:take])
  return np.concatenate(out_c), np.concatenate(out_r)


def pair_batch(arrays) -> batches_lib.DPOBatch:
  """The DPOBatch of encoded pairs and their reference log-probs (rows of `pair_arrays`)."""
  return batches_lib.DPOBatch(chosen=batches_lib.LMBatch.from_dict(arrays["chosen"]),
                              rejected=batches_lib.LMBatch.from_dict(arrays["rejected"]),
                              ref_chosen_logp=arrays["ref_chosen_logp"],
                              ref_rejected_logp=arrays["ref_rejected_logp"])


def pair_arrays(pairs, ref_c, ref_r) -> dict:
  return {"chosen": pairs["chosen"], "rejected": pairs["rejected"], "ref_chosen_logp": ref_c,
          "ref_rejected_logp": ref_r}


def run(cfg, workdir: str, *, progress: bool = True) -> trainer.TrainResult:
  # Any registered loss over a DPOBatch trains here (dpo, ipo, or one of your own, e.g. SimPO);
  # bind_loss checks that the config's loss.* hyperparameters are ones the loss takes.
  if not cfg.data.train_source:
    raise config_lib.ConfigError("data.train_source: DPO needs preference pairs "
                                 "(preference_jsonl:PATH)")
  os.makedirs(workdir, exist_ok=True)
  tok = common.start_from_previous(cfg, workdir)
  common.check_no_dropout(cfg)
  train_records = load_records(cfg.data.train_source, cfg)
  if tok is None:
    tok = common.resolve_tokenizer(cfg, workdir, build_char_from="".join(
        r["prompt"][-1]["content"] + r["chosen"] + r["rejected"] for r in train_records))
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
  pairs = encode_pairs(train_records, tok, seq)
  ref_c, ref_r = reference_logps(ref_model, ref_params, pairs, batch_size=bs)
  source = in_memory.InMemorySource(pair_arrays(pairs, ref_c, ref_r), wrap=pair_batch,
                                     mesh=env.mesh, global_batch=bs, seed=cfg.seed,
                                     drop_remainder=True, what="preference pairs")
  loss_fn = common.bind_loss(cfg)

  eval_records = load_records(cfg.data.eval_source, cfg) if cfg.data.eval_source else []
  evaluate = None
  if eval_records:
    eval_pairs = encode_pairs(eval_records, tok, seq)
    ev_c, ev_r = reference_logps(ref_model, ref_params, eval_pairs, batch_size=bs)
    eval_arrays = pair_arrays(eval_pairs, ev_c, ev_r)
    eval_bs = min(bs, len(ev_c))
    eval_step = trainer.make_eval_step(loss_fn, model)

    def evaluate(state):
      nb = max(1, min(cfg.train.eval_batches, len(ev_c) // eval_bs))
      batches = ((pair_batch(shd.to_global(local, env.mesh)), counts)
                 for local, counts in in_memory.fixed_batches(eval_arrays, eval_bs, limit=nb))
      ev = evaluation.weighted_eval(eval_step, state.params, batches,
                                    weights={}, default_weight="rows")
      return {"eval/loss": ev["loss"],
              **{f"eval/{k.split('/', 1)[1]}": v for k, v in ev.items() if k.startswith("dpo/")}}

  res = trainer.train(cfg, workdir=workdir, model=model, loss_fn=loss_fn, source=source,
                      mesh=env.mesh, init_params=init_params, init_from=init_from,
                      evaluate=evaluate, tokens_per_step=2 * bs * seq, progress=progress,
                      base_params=init_full if lora.spec_of(model) is not None else None)
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
