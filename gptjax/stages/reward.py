"""Stage 3: a Bradley–Terry reward model, initialised from SFT (trunk + a scalar head).

    gptjax train --config experiments/reward.py:tiny --workdir runs/reward \
        --config.train.init_from=runs/sft

The trained model is read back, normalised, with `gptjax.reward_model.load_reward_model(workdir)`
(the RL stages' scorer; see that module).

Data (`data.source`):
  generated               the default: `gptjax.rm_data.generate` samples K replies per prompt from
                          the SFT model (`train.init_from`) and ranks them with the VADER labeler
                          into `<workdir>/preferences/`, once (it is idempotent).
  preference_jsonl:PATH   your own pairs ({"prompt", "chosen", "rejected"}; optionally the whole
                          ranking as "responses" + "ranks"); `data.eval_source` names a held-out
                          file, else `data.val_fraction` of the lines (by hash) are held out.

Normalisation. After training, a bias b is computed so the reward model's scores of the SFT samples
on the training prompts have mean 0. It is written to `<workdir>/reward_normalization.json`
(keyed by the checkpoint step it was computed for) and to eval.json, and `load_reward_model` adds
it to the scalar head's bias. It is kept outside the checkpoint on purpose: folding it into a saved
step would make a continued run start from other parameters than an uninterrupted one.

Evaluation (eval.json): held-out pairwise accuracy against the noisy labels and against the
noiseless labeler (pairs whose gold scores differ); Spearman correlation of the reward with the gold
score over the held-out SFT samples; best-of-N with the reward model on held-out prompts (mean gold
score of the chosen reply for N = 1 … 16, beside the mean of all samples and the gold oracle).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import jax
import numpy as np

from gptjax import batches as batches_lib
from gptjax import checkpoint as ckpt_lib
from gptjax import config as config_lib
from gptjax import labeler
from gptjax import lora
from gptjax import metrics as metrics_lib
from gptjax import model as model_lib
from gptjax import evaluation
from gptjax import reward_model
from gptjax import rm_data
from gptjax import sampling
from gptjax import sharding as shd
from gptjax import trainer
from gptjax.data import chat, dialogue, in_memory, records, tokenizers
from gptjax.data.errors import DataError
from gptjax.losses import reward as reward_loss
from gptjax.reward_model import completions, score_records, score_sequences, sequence_ids
from gptjax.stages import common

NORMALIZATION_FILE = reward_model.NORMALIZATION_FILE


# --------------------------------------------------------------------------------------------
# Preference records -> fixed-shape arrays.
# --------------------------------------------------------------------------------------------

def read_preferences(path: str) -> list[dict]:
  """Records {prompt: messages, responses, ranks, scores|None, ended} from a preference JSONL."""
  out = []
  for lineno, obj in records.read_jsonl(path):
    where = f"{path}:{lineno}"
    if "prompt" not in obj:
      raise DataError(f"{where}: field 'prompt' is missing; expected a string or a messages list")
    prompt = records.prompt_messages(obj["prompt"], where)
    if "responses" in obj:
      resp, ranks = obj["responses"], obj.get("ranks")
      if not isinstance(resp, list) or len(resp) < 2 or not all(isinstance(r, str) for r in resp):
        raise DataError(f"{where}: field 'responses' expected a list of at least 2 strings")
      if not isinstance(ranks, list) or len(ranks) != len(resp) or \
          not all(isinstance(r, int) for r in ranks):
        raise DataError(f"{where}: field 'ranks' expected {len(resp)} integers (higher = "
                        "preferred), one per response")
    else:
      for field in ("chosen", "rejected"):
        if not isinstance(obj.get(field), str):
          raise DataError(f"{where}: field '{field}' is missing or not a string")
      resp, ranks = [obj["chosen"], obj["rejected"]], [1, 0]
      if resp[0] == resp[1]:
        raise DataError(f"{where}: field 'rejected' equals 'chosen'; expected two different "
                        "replies")
    k = len(resp)
    scores = obj.get("scores")
    if scores is not None and (not isinstance(scores, list) or len(scores) != k or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores)):
      raise DataError(f"{where}: field 'scores' expected {k} numbers (one per response) or null")
    ended = obj.get("ended") or [True] * k
    if not isinstance(ended, list) or len(ended) != k or not all(isinstance(x, bool)
                                                                 for x in ended):
      raise DataError(f"{where}: field 'ended' expected {k} booleans (one per response)")
    ids = obj.get("response_ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) != k or not all(
        isinstance(x, list) and all(isinstance(t, int) and t >= 0 for t in x) for x in ids)):
      raise DataError(f"{where}: field 'response_ids' expected {k} lists of token ids or null")
    out.append({"prompt": prompt, "responses": resp, "ranks": ranks, "scores": scores,
                "ended": ended, "response_ids": obj.get("response_ids")})
  if not out:
    raise DataError(f"{path}: no preference records")
  return out


def to_arrays(recs: list[dict], tok, *, seq_len: int) -> tuple[dict, dict]:
  """[N,K,T] tokens/positions/mask and [N,K] rank; replies past a record's own K are empty."""
  k = max(len(r["responses"]) for r in recs)
  n = len(recs)
  tokens = np.full((n, k, seq_len), tok.pad_id, np.int32)
  mask = np.zeros((n, k, seq_len), np.float32)
  rank = np.zeros((n, k), np.int32)
  truncated = 0
  for i, r in enumerate(recs):
    prompt = chat.render_prompt(r["prompt"], tok)
    for j, completion in enumerate(completions(r, tok)):
      ids = sequence_ids(prompt, completion, seq_len=seq_len)
      truncated += len(prompt) + len(completion) > seq_len
      tokens[i, j, :len(ids)] = ids
      mask[i, j, :len(ids)] = 1
      rank[i, j] = r["ranks"][j]
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape).copy()
  arrays = {"tokens": tokens, "positions": positions, "mask": mask, "rank": rank}
  return arrays, {"records": n, "replies_per_prompt": k, "truncated_sequences": int(truncated)}


# --------------------------------------------------------------------------------------------
# The runner.
# --------------------------------------------------------------------------------------------

def preference_files(cfg, workdir: str) -> dict:
  src = cfg.data.source
  if src == "generated":
    if not cfg.train.init_from:
      raise config_lib.ConfigError("data.source='generated' samples replies from the SFT model: "
                                   "set train.init_from to the SFT workdir")
    out_dir = cfg.rm_data.out_dir or os.path.join(workdir, "preferences")
    return rm_data.generate(cfg, sft_workdir=cfg.train.init_from, out_dir=out_dir)
  if src.startswith("preference_jsonl:"):
    path = src.split(":", 1)[1]
    if cfg.data.eval_source:
      return {"train": path, "validation": cfg.data.eval_source.split(":", 1)[-1]}
    return {"train": path, "validation": None}
  raise config_lib.ConfigError(f"data.source: the reward stage reads 'generated' or "
                               f"'preference_jsonl:PATH', got {src!r}")


def _held_out(recs: list[dict], val_fraction: float):
  """Splits one file's records by a hash of the prompt, so a prompt never lands on both sides."""
  def is_val(r):
    h = hashlib.sha256(json.dumps(r["prompt"], sort_keys=True).encode()).digest()
    return int.from_bytes(h[:8], "big") % 10_000 < int(round(val_fraction * 10_000))
  val = [r for r in recs if is_val(r)]
  train = [r for r in recs if not is_val(r)]
  if not train or not val:
    raise DataError(f"data.val_fraction={val_fraction} leaves an empty split ({len(train)} train, "
                    f"{len(val)} validation records); set data.eval_source")
  return train, val


def run(cfg, workdir: str, *, progress: bool = True) -> trainer.TrainResult:
  os.makedirs(workdir, exist_ok=True)
  tok = common.start_from_previous(cfg, workdir, scalar_head=True)
  if tok is None:
    if not os.path.exists(os.path.join(workdir, tokenizers.TOKENIZER_FILE)) and \
        cfg.data.tokenizer == "char":
      raise config_lib.ConfigError("train.init_from is empty: a reward model starts from an SFT "
                                   "workdir, or from a data.tokenizer file")
    tok = common.resolve_tokenizer(cfg, workdir)
  common.fill_vocab_size(cfg, tok)
  with cfg.unlocked():
    cfg.model.scalar_head = True
  files = preference_files(cfg, workdir)
  train_recs = read_preferences(files["train"])
  if files["validation"]:
    val_recs = read_preferences(files["validation"])
  else:
    train_recs, val_recs = _held_out(train_recs, cfg.data.val_fraction)
  env = common.make_env(cfg, scalar_head=True)
  seq, gb = cfg.data.seq_len, cfg.train.batch_size
  train_arrays, train_counts = to_arrays(train_recs, tok, seq_len=seq)
  val_arrays, val_counts = to_arrays(val_recs, tok, seq_len=seq)
  source = in_memory.InMemorySource(train_arrays, wrap=lambda a: batches_lib.RewardBatch(**a),
                                     mesh=env.mesh, global_batch=gb, seed=cfg.seed)
  loss_fn = common.bind_loss(cfg)
  eval_step = trainer.make_eval_step(loss_fn, env.model)

  def evaluate(state):
    # Each process feeds its own rows of every (identical) held-out batch, as training does.
    batches = ((batches_lib.RewardBatch(**shd.to_global(local, env.mesh)), counts)
               for local, counts in in_memory.fixed_batches(val_arrays, gb,
                                                            limit=cfg.train.eval_batches))
    ev = evaluation.weighted_eval(eval_step, state.params, batches, weights={
        "rm/accuracy": "rm/pairs", "rm/margin": "rm/pairs", "rm/bt_loss": "rows"})
    return {"eval/rm_accuracy": ev["rm/accuracy"], "eval/rm_margin": ev["rm/margin"],
            "eval/rm_loss": ev["rm/bt_loss"]}

  init_from = common.previous_params(cfg)
  k = train_counts["replies_per_prompt"]
  result = trainer.train(cfg, trainer.Job(
      model=env.model, loss_fn=loss_fn, source=source, mesh=env.mesh,
      init_params=common.init_params_fn(env.model), init_from=init_from, evaluate=evaluate,
      tokens_per_step=gb * k * seq,
      flops_per_token=model_lib.flops_per_token(env.model_cfg, seq, lm_head=False)),
      workdir=workdir, progress=progress)
  if result.interrupted:
    return result

  eval_path = os.path.join(workdir, "eval.json")
  done = common.read_json(eval_path)
  if done and done.get("step") == result.step:
    result.eval = done
    return result
  score_fn = reward_model.make_score_fn(env.model)
  params = result.state.params
  report = {"stage": "reward", "step": result.step, "data_source": cfg.data.source,
            "preference_files": files, "data_train": train_counts, "data_validation": val_counts,
            "loss": config_lib.loss_kwargs(cfg)}
  report.update(evaluate(result.state))

  scores_of = functools.partial(score_records, score_fn, params, tok=tok, seq_len=seq)

  # Normalisation over the training prompts' replies (for generated data: SFT samples).
  raw_train = scores_of(train_recs)
  bias = -float(np.mean(raw_train))
  norm = {"bias": bias, "checkpoint_step": result.step, "raw_mean": float(np.mean(raw_train)),
          "raw_std": float(np.std(raw_train)), "replies": int(len(raw_train))}
  if jax.process_index() == 0:
    common.write_json(os.path.join(workdir, NORMALIZATION_FILE), norm)
  report["normalization"] = norm
  report.update(held_out_report(val_recs, scores_of(val_recs) + bias))
  if cfg.data.source == "generated" and cfg.reward.best_of_n_prompts:
    report["best_of_n"] = best_of_n(cfg, env.model, reward_model.add_head_bias(params, bias), tok,
                                    score_fn, progress=progress)
  if jax.process_index() == 0:
    common.write_json(eval_path, report)
  msg = (f"[{workdir}] RM eval: held-out accuracy {report['accuracy_noisy']:.1%} vs noisy labels"
         + (f", {report['accuracy_noiseless']:.1%} vs the noiseless labeler, Spearman "
            f"{report['spearman_gold']:.3f}" if report.get("accuracy_noiseless") is not None
            else ""))
  if "best_of_n" in report:
    msg += "; best-of-N gold " + ", ".join(f"N={n}: {v:.3f}" for n, v in
                                           report["best_of_n"]["mean_gold"].items())
  print(msg, flush=True)
  result.eval = report
  return result


def held_out_report(recs: list[dict], flat_scores: np.ndarray) -> dict:
  """Pairwise accuracy vs the noisy ranks and (with gold scores) vs the noiseless labeler, and
  the Spearman correlation of reward with gold."""
  noisy = noisy_n = clean = clean_n = 0
  at, golds, rewards = 0, [], []
  for r in recs:
    k = len(r["responses"])
    s = flat_scores[at:at + k]
    at += k
    for i, j in zip(*reward_loss.pair_indices(k)):
      if r["ranks"][i] != r["ranks"][j]:
        noisy_n += 1
        noisy += bool((s[i] > s[j]) == (r["ranks"][i] > r["ranks"][j]))
      if r["scores"] is not None and r["scores"][i] != r["scores"][j]:
        clean_n += 1
        clean += bool((s[i] > s[j]) == (r["scores"][i] > r["scores"][j]))
    if r["scores"] is not None:
      golds += list(r["scores"])
      rewards += [float(x) for x in s]
  out = {"accuracy_noisy": noisy / max(noisy_n, 1), "pairs_noisy": noisy_n,
         "accuracy_noiseless": clean / clean_n if clean_n else None,
         "pairs_noiseless": clean_n,
         "spearman_gold": metrics_lib.rank_correlation(rewards, golds) if golds else None,
         "held_out_reward_mean": float(np.mean(flat_scores))}
  return out


def best_of_n(cfg, model, params, tok, score_fn, ns=(1, 2, 4, 8, 16), *,
              progress: bool = False) -> dict:
  """Mean gold score of the reply the reward model picks among the first N SFT samples per
  held-out prompt, for each N (the same samples for every N, so the curve is paired)."""
  r = cfg.reward
  n_max = max(ns)
  prompts = rm_data.prompt_set(cfg, "validation", r.best_of_n_prompts,
                               field="reward.best_of_n_prompts", seed_offset=3)
  sft_model, sft_params, _, sft_cfg = ckpt_lib.load_for_inference(cfg.train.init_from)
  ids, _ = dialogue.fit_prompts(prompts, tok, max_len=sft_cfg.model.max_len,
                                reply_tokens=cfg.sft.reply_tokens)
  repeated = [p for p in ids for _ in range(n_max)]
  replies, _ = sampling.sample_replies(
      sft_model, sft_params, repeated, seed=cfg.seed + 11, max_new_tokens=cfg.sft.reply_tokens,
      temperature=cfg.rm_data.temperature, top_k=cfg.rm_data.top_k,
      batch_size=cfg.rm_data.batch_size, pad_id=tok.pad_id, eos_ids=chat.reply_stop_ids(tok),
      progress="reward: best-of-N samples" if progress else "", engine=True)
  gold = labeler.gold_score([chat.parse_reply(x, tok) for x in replies]).reshape(len(ids), n_max)
  seqs = [sequence_ids(p, x, seq_len=cfg.data.seq_len) for p, x in zip(repeated, replies)]
  rm = score_sequences(score_fn, params, seqs, seq_len=cfg.data.seq_len,
                       pad_id=tok.pad_id).reshape(len(ids), n_max)
  out = {"prompts": len(ids), "mean_gold": {}, "oracle_gold": {}, "mean_reward": {}}
  rows = np.arange(len(ids))
  for n in ns:
    pick = np.argmax(rm[:, :n], axis=1)
    out["mean_gold"][str(n)] = float(np.mean(gold[rows, pick]))
    out["oracle_gold"][str(n)] = float(np.mean(np.max(gold[:, :n], axis=1)))
    out["mean_reward"][str(n)] = float(np.mean(rm[rows, pick]))
  out["sample_mean_gold"] = float(np.mean(gold))
  return out


def memory_parts(cfg, workdir: str | None = None):
  """What `run` would build, as shapes, for the memory plan (gptjax/memory.py). The rows are
  `to_arrays`' [B, K, T] with K the most replies of a record: the data set's, or
  rm_data.replies_per_prompt for data the run would generate."""
  from gptjax import memory
  if not cfg.train.init_from and cfg.data.tokenizer == "char" and not (
      workdir and os.path.exists(os.path.join(workdir, tokenizers.TOKENIZER_FILE))):
    raise config_lib.ConfigError("train.init_from is empty: a reward model starts from an SFT "
                                 "workdir, or from a data.tokenizer file")
  tok = common.plan_tokenizer(cfg, workdir, scalar_head=True)
  with cfg.unlocked():
    cfg.model.scalar_head = True
  src = cfg.data.source
  if src.startswith("preference_jsonl:"):
    recs = read_preferences(src.split(":", 1)[1])
    widest = max(recs, key=lambda r: len(r["responses"]))
  elif src == "generated":
    k = int(cfg.rm_data.replies_per_prompt)
    # A record of K empty replies: to_arrays' layout for the K replies generated per prompt.
    widest = {"prompt": [{"role": "user", "content": ""}], "responses": [""] * k,
              "ranks": list(range(k)), "ended": [True] * k, "response_ids": None}
  else:
    raise config_lib.ConfigError(f"data.source: the reward stage reads 'generated' or "
                                 f"'preference_jsonl:PATH', got {src!r}")
  env = common.make_env(cfg, scalar_head=True)
  arrays, _ = to_arrays([widest], tok, seq_len=cfg.data.seq_len)
  batch = batches_lib.RewardBatch(**memory.global_batch(arrays, cfg.train.batch_size, env.mesh))
  init_params = common.init_params_fn(env.model)
  base = (memory.abstract_params(cfg, env.model, init_params, env.mesh)
          if lora.spec_of(env.model) is not None else None)
  job = trainer.Job(model=env.model, loss_fn=common.bind_loss(cfg), source=None, mesh=env.mesh,
                    init_params=init_params, base_params=base)
  extra = {"batch": ("rm_data.replies_per_prompt",)} if src == "generated" else {}
  return memory.Parts(job=job, batch=batch, extra_fields=extra)
