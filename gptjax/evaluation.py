"""Evaluation shared by every stage: the held-out policy evaluation, distinct-n, and the weighted
average of a loss's metrics over fixed batches.

    evaluate_policy(policy, prompts=..., reference=..., scorer=...)   # gold, proxy, KL, distinct-2
    weighted_eval(eval_step, params, batches, weights={"sft/ce": "sft/tokens"})

A policy or a reference is a workdir or a (model, params[, tokenizer]) tuple; a workdir is read
with `checkpoint.load_for_inference`, whatever stage wrote it.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import checkpoint as ckpt_lib
from gptjax import engine as engine_lib
from gptjax import metrics as metrics_lib
from gptjax import sampling
from gptjax import sharding as shd
from gptjax.data import chat, dialogue
from gptjax.rl import rollout as rollout_lib


def weighted_eval(eval_step, params, batches: Iterable, *, weights: Mapping[str, str],
                  default_weight: str | None = None, limit: int = 0) -> dict:
  """The metrics of `eval_step(params, batch, None)` averaged over `batches`, each weighted by
  what `weights` names for it: another metric of the same step (the loss says how many tokens or
  pairs it averaged over, e.g. 'sft/tokens', 'rm/pairs') or a count the iterator yields beside
  the batch. `batches` yields (batch, counts dict); `limit` > 0 stops after that many batches.

  With `default_weight`, every other metric is averaged too, weighted by that one. Returns
  {metric: its weighted mean} and the total of each weight under its own name. Sums are float64 on the host, so the order of batches is the only
  order of addition.
  """
  weights = dict(weights)
  sums, totals = {}, {}
  for i, (batch, counts) in enumerate(batches):
    if limit and i >= limit:
      break
    m = jax.device_get(eval_step(params, batch, None))
    seen = {**{k: float(v) for k, v in m.items()}, **{k: float(v) for k, v in counts.items()}}
    if default_weight is not None:
      for k in m:
        weights.setdefault(k, default_weight)
    for k, w in weights.items():
      sums[k] = sums.get(k, 0.0) + seen[k] * seen[w]
    for w in set(weights.values()):
      totals[w] = totals.get(w, 0.0) + seen[w]
  out = {k: sums.get(k, 0.0) / max(totals.get(w, 0.0), 1.0) for k, w in weights.items()}
  out.update(totals)
  return out


def distinct_n(texts, n: int = 2) -> float:
  """Distinct n-grams over all n-grams of whitespace words, pooled over the samples."""
  grams, total = set(), 0
  for t in texts:
    w = t.split()
    for i in range(len(w) - n + 1):
      grams.add(tuple(w[i:i + n]))
      total += 1
  return len(grams) / total if total else 0.0


def _as_policy(p):
  if isinstance(p, str):
    return ckpt_lib.load_for_inference(p)[:3]
  return p


def evaluate_policy(policy, *, prompts, reference=None, max_new_tokens: int = 32,
                    temperature: float = 0.7, prompt_len: int = 32, seed: int = 1234,
                    best_of: int = 1, scorer=None, batch_size: int = 64,
                    out_dir: str | None = None, label: str = "", num_samples: int = 16,
                    progress: str = "", engine: bool | None = None) -> dict:
  """Samples one reply per held-out prompt and measures it against the gold labeler.

  policy, reference: a workdir or (model, params[, tokenizer]); the reference (SFT) gives the
  KL estimate E[Σ_t log π − log π_ref] over the policy's own samples at `temperature`.
  best_of > 1 draws that many replies per prompt and keeps the one `scorer` (e.g. the RM's
  RewardScorer via rollout.TokenScorer) likes best; its KL to the sampler is the analytic log n − (n−1)/n.
  engine: decode with the continuous-batching engine (`gptjax/engine.py`) wherever
  `engine.supports` the parameters (whole on each process); None means "for best_of > 1", where
  most of a batch's rows finish long before its longest. Greedy, both decoders agree; sampled,
  the engine's draws are its own (per-request keys).
  With a scorer, the kept replies' mean score is reported too (`proxy_mean`: the RM's view beside
  the gold's, which is how over-optimisation shows).
  With several processes and networks whole on each, every process samples its share of the
  prompt batches (a scorer follows if it is a TextScorer or has `with_params`, as TokenScorer does).
  Returns {gold_mean, gold_se, kl_to_ref, distinct_2, eos_fraction, n, [proxy_mean, proxy_se,]
  ...} and, with out_dir,
  writes <out_dir>/eval.json (the metrics and `num_samples` samples) and eval_samples.jsonl (all).
  """
  from gptjax import labeler
  model, params, tok = _as_policy(policy)[:3]
  ref = _as_policy(reference) if reference is not None else None
  if best_of > 1 and scorer is None:
    raise ValueError("evaluate_policy: best_of > 1 needs a scorer to pick the best reply")
  ids, lengths, texts = dialogue.encode_prompts([chat.as_messages(p) if isinstance(p, str) else p
                                        for p in prompts], tok, prompt_len)
  eos = chat.reply_stop_ids(tok)
  key = jax.random.key(seed)
  starts = list(range(0, len(ids), batch_size))
  use_engine = best_of > 1 if engine is None else engine

  def one_batch(networks, b):
    """Completion ids, mask and KL of the kept reply of each prompt in batch b, padded to
    `batch_size` rows so every batch has one shape; `n` says how many rows are real."""
    params, ref_params, scorer_params = networks
    scorer_b = scorer if scorer_params is None else scorer.with_params(scorer_params)
    start = starts[b]
    rows = np.repeat(np.arange(start, min(start + batch_size, len(ids))), best_of)
    sample = sampling.generate
    if use_engine and engine_lib.supports(params=params):
      sample = functools.partial(engine_lib.generate, slots=len(rows))
    out = sample(model, params, jnp.asarray(ids[rows]), jnp.asarray(lengths[rows]),
                 rng=jax.random.fold_in(key, start), max_new_tokens=max_new_tokens,
                 temperature=temperature, eos_ids=eos, pad_id=tok.pad_id)
    comp, mask = shd.to_host(out.completion), shd.to_host(out.completion_mask)
    pick = np.arange(len(rows))
    kl = np.zeros(len(rows), np.float32)
    s = np.zeros(len(rows), np.float32)
    if scorer_b is not None:
      outs = [tok.decode([t for t, m in zip(r, mr) if m > 0 and t not in eos])
              for r, mr in zip(comp, mask)]
      s = np.asarray(scorer_b(tokens=out.tokens, total_lengths=out.total_lengths,
                              prompt_texts=[texts[i] for i in rows], completion_texts=outs),
                     np.float32)
    if best_of > 1:
      pick = np.arange(0, len(rows), best_of) + np.argmax(s.reshape(-1, best_of), axis=1)
      kl = np.zeros(len(pick), np.float32)          # analytic for best-of-n: set below
    elif ref_params is not None:
      lp = sampling.completion_logprobs(model, params, out, temperature=temperature)
      lr = sampling.completion_logprobs(ref[0], ref_params, out, temperature=temperature)
      kl = shd.to_host(jnp.sum(lp - lr, axis=1)).astype(np.float32)
    pad = batch_size - len(pick)
    if bar is not None:
      bar.update(1)
    return {"comp": np.pad(comp[pick], ((0, pad), (0, 0))),
            "mask": np.pad(mask[pick], ((0, pad), (0, 0))),
            "kl": np.pad(kl, (0, pad)), "proxy": np.pad(s[pick], (0, pad)),
            "n": np.int32(len(pick))}

  # A scorer can follow a split over processes if it computes in Python (TextScorer) or can be
  # handed this process's copy of its network (TokenScorer.with_params); any other runs every
  # batch jointly. A batch's key depends on its index only, so a split equals one process.
  text_scorer = scorer is None or isinstance(scorer, rollout_lib.TextScorer)
  movable = text_scorer or hasattr(scorer, "with_params")
  scorer_params = scorer.params if movable and not text_scorer else None
  bar = metrics_lib.batch_bar(progress, len(starts))
  batches = shd.map_batches(
      one_batch, len(starts), (params, ref[1] if ref is not None else None, scorer_params),
      splittable=movable)
  if bar is not None:
    bar.close()
  replies, kls, has_eos, proxy = [], [], [], []
  for r in batches:
    comp, mask = r["comp"][:r["n"]], r["mask"][:r["n"]]
    replies += [tok.decode([t for t, m in zip(row, mrow) if m > 0 and t not in eos])
                for row, mrow in zip(comp, mask)]
    has_eos += list(np.any(np.isin(comp, eos) & (mask > 0), axis=1))
    kls += list(r["kl"][:r["n"]])
    proxy += list(r["proxy"][:r["n"]])
  if best_of > 1:
    # Best-of-n's KL to its sampler is the analytic log n − (n−1)/n per prompt (see above).
    kls = [np.log(best_of) - (best_of - 1) / best_of] * len(replies)
  elif ref is None:
    kls = []                             # no reference: no KL to report
  gold = labeler.gold_score(replies)
  res = {
      "label": label, "n": len(replies),
      "gold_mean": float(gold.mean()),
      "gold_se": float(gold.std(ddof=1) / np.sqrt(len(gold))) if len(gold) > 1 else 0.0,
      "kl_to_ref": float(np.mean(kls)) if kls else None,
      "distinct_2": distinct_n(replies, 2),
      "eos_fraction": float(np.mean(has_eos)),
      "mean_length": float(np.mean([len(r) for r in replies])),
      "best_of": best_of, "temperature": temperature, "max_new_tokens": max_new_tokens,
  }
  if scorer is not None:
    proxy = np.asarray(proxy, np.float64)
    res["proxy_mean"] = float(proxy.mean())
    res["proxy_se"] = float(proxy.std(ddof=1) / np.sqrt(len(proxy))) if len(proxy) > 1 else 0.0
  samples = [{"prompt": p, "reply": r, "gold": float(g), "ended": bool(e)}
             for p, r, g, e in zip(texts, replies, gold, has_eos)]
  if scorer is not None:
    for s, x in zip(samples, proxy):
      s["proxy"] = float(x)
  if out_dir and jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
      json.dump({**res, "samples": samples[:num_samples]}, f, indent=2)
    with open(os.path.join(out_dir, "eval_samples.jsonl"), "w") as f:
      for s in samples:
        f.write(json.dumps(s) + "\n")
  return {**res, "samples": samples[:num_samples]}
