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
from gptjax import checkpoint as ckpt_lib
from gptjax import config as config_lib
from gptjax import lora
from gptjax import sharding as shd
from gptjax import trainer
from gptjax.data import chat, sources
from gptjax.losses import dpo as dpo_lib
from gptjax.stages import common
from gptjax.stages import rl as rl_stage


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


class PreferenceSource:
  """Shuffled epochs over encoded pairs with their reference log-probs; state (epoch, index)."""

  def __init__(self, pairs, ref_c, ref_r, *, batch_size: int, seed: int, mesh=None):
    self.pairs, self.ref_c, self.ref_r = pairs, ref_c, ref_r
    self.n = len(ref_c)
    if self.n < batch_size:
      raise ValueError(f"train.batch_size={batch_size} exceeds the {self.n} preference pairs")
    self.batch_size, self.seed, self.mesh = batch_size, seed, mesh
    self.epoch, self.index = 0, 0

  def _order(self):
    return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

  def batch(self, idx):
    side = lambda s: batches_lib.LMBatch.from_dict({k: v[idx] for k, v in self.pairs[s].items()})
    b = batches_lib.DPOBatch(chosen=side("chosen"), rejected=side("rejected"),
                             ref_chosen_logp=self.ref_c[idx], ref_rejected_logp=self.ref_r[idx])
    return shd.to_global(b, self.mesh) if self.mesh is not None else b

  def next(self, state=None):
    if self.index + self.batch_size > self.n:
      self.epoch, self.index = self.epoch + 1, 0
    idx = self._order()[self.index:self.index + self.batch_size]
    self.index += self.batch_size
    return self.batch(idx)

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "index": self.index}

  def set_state(self, s: dict) -> None:
    self.epoch, self.index = int(s["epoch"]), int(s["index"])


def run(cfg, workdir: str, *, progress: bool = True) -> trainer.TrainResult:
  # Any registered loss over a DPOBatch trains here (dpo, ipo, or one of your own, e.g. SimPO);
  # bind_loss checks that the config's loss.* hyperparameters are ones the loss takes.
  if not cfg.data.train_source:
    raise config_lib.ConfigError("data.train_source: DPO needs preference pairs "
                                 "(preference_jsonl:PATH)")
  rl_stage.inherit_model_config(cfg)
  rl_stage.check_no_dropout(cfg)
  os.makedirs(workdir, exist_ok=True)
  train_records = load_records(cfg.data.train_source, cfg)
  msgs = [r["prompt"] for r in train_records]
  tok = rl_stage._tokenizer(cfg, workdir, msgs + [[{"role": "user", "content": r["chosen"] +
                                                     r["rejected"]}] for r in train_records])
  common.fill_vocab_size(cfg, tok)
  env = common.make_env(cfg)
  model = env.model
  init_params = common.init_params_fn(model)
  init_from = None
  if cfg.train.init_from:
    init_from = lambda fresh: ckpt_lib.init_from_workdir(cfg.train.init_from, fresh)
  init_full = rl_stage.initial_params(cfg, model, env.mesh, init_params, init_from)
  # With LoRA the reference is the base with the adapters off; the trainer reuses init_full as
  # its frozen base, so policy and reference share one copy of it.
  ref_model, ref_params = lora.reference(model, init_full)

  seq, bs = cfg.data.seq_len, cfg.train.batch_size
  pairs = encode_pairs(train_records, tok, seq)
  ref_c, ref_r = reference_logps(ref_model, ref_params, pairs, batch_size=bs)
  source = PreferenceSource(pairs, ref_c, ref_r, batch_size=bs, seed=cfg.seed, mesh=env.mesh)
  loss_fn = common.bind_loss(cfg)

  evaluate = None
  eval_records = load_records(cfg.data.eval_source, cfg) if cfg.data.eval_source else []
  if eval_records:
    eval_pairs = encode_pairs(eval_records, tok, seq)
    ev_c, ev_r = reference_logps(ref_model, ref_params, eval_pairs, batch_size=bs)
    eval_source = PreferenceSource(eval_pairs, ev_c, ev_r, batch_size=min(bs, len(ev_c)),
                                   seed=cfg.seed + 1, mesh=env.mesh)
    eval_step = trainer.make_eval_step(loss_fn, model)

    def evaluate(state):
      nb = max(1, min(cfg.train.eval_batches, len(ev_c) // eval_source.batch_size))
      ms = [eval_step(state.params, eval_source.batch(
          np.arange(i * eval_source.batch_size, (i + 1) * eval_source.batch_size)), None)
            for i in range(nb)]
      avg = trainer.average_metrics(ms)
      return {"eval/loss": avg["loss"],
              **{f"eval/{k.split('/', 1)[1]}": v for k, v in avg.items() if k.startswith("dpo/")}}

  res = trainer.train(cfg, workdir=workdir, model=model, loss_fn=loss_fn, source=source,
                      mesh=env.mesh, init_params=init_params, init_from=init_from,
                      evaluate=evaluate, tokens_per_step=2 * bs * seq, progress=progress,
                      base_params=init_full if lora.spec_of(model) is not None else None)
  if cfg.rl.eval_prompts and not res.interrupted:
    # Every process runs the evaluation (its jitted programs span all of them); only process 0
    # writes the files.
    held = [r["prompt"] for r in eval_records] or rl_stage.prompt_messages(cfg, cfg.rl.eval_split)
    rl_stage.evaluate_policy((model, res.state.params, tok), prompts=held[:cfg.rl.eval_prompts],
                             reference=(ref_model, ref_params), max_new_tokens=cfg.rl.max_new_tokens,
                             temperature=cfg.rl.eval_temperature, prompt_len=cfg.rl.prompt_len,
                             seed=cfg.seed, out_dir=workdir, label=cfg.loss.name)
  return res
