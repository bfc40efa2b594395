"""The pipeline's comparison step: every stage's model on the same held-out prompts.

For base, SFT, best-of-16 (SFT reranked by the RM) and every policy stage that ran (PPO, GRPO,
DPO, PPO with β = 0, and any other objective's stage: `stage_names.policy_stages`), one reply
per held-out prompt is sampled at the same temperature and seed and scored by the
gold labeler (VADER) and by the RM, the proxy the RL stages optimise; the KL to SFT, distinct-2 and
the end-of-turn rate come beside it. Writes `<run>/compare.json`.

Best-of-N has one definition here: for each held-out prompt, N replies sampled from SFT under the
same settings as every other row (prompts, temperature, reply length), the one the RM scores
highest kept; its KL to SFT is the analytic log N − (N−1)/N. The curve over N
(`pipeline.best_of_n`) reuses one set of max(N) replies per prompt, so it is paired across N, and
the table's best-of-16 row is its N = 16 point. (The reward stage's own best-of-N in its eval.json
samples like rm_data does, at temperature 1.0 and SFT's reply length, on rm_data's prompts: an RM
diagnostic, not this table's figure.)
"""

from __future__ import annotations

import json
import os

import numpy as np

from gptjax import checkpoint as ckpt_lib
from gptjax import evaluation
from gptjax import reward_model
from gptjax import stage_names
from gptjax.data import dialogue


def _done(run_dir: str, name: str) -> bool:
  return os.path.exists(os.path.join(run_dir, name, "done.json"))


def run(cfg, run_dir: str, *, progress: bool = False) -> dict:
  pc = cfg.pipeline
  ppo_cfg = cfg.ppo
  d = lambda name: os.path.join(run_dir, name)
  sft = ckpt_lib.load_for_inference(d("sft"))[:3]
  tok = sft[2]
  messages = dialogue.prompt_messages(ppo_cfg, "validation")[:pc.num_eval_prompts]
  scorer = reward_model.make_scorer("rm", d("reward"))
  common = dict(prompts=messages, reference=sft, max_new_tokens=ppo_cfg.rl.max_new_tokens,
                temperature=ppo_cfg.rl.eval_temperature, prompt_len=ppo_cfg.rl.prompt_len,
                seed=cfg.seed + 1234)
  policies = {"base": d("pretrain"), "sft": sft}
  for name in stage_names.policy_stages():
    if name in pc.stages and _done(run_dir, name):
      policies[name] = d(name)
  results = {}
  for name, policy in policies.items():
    loaded = ckpt_lib.load_for_inference(policy)[:3] if isinstance(policy, str) else policy
    if name == "base":
      # The base model never saw the chat markers' meaning; it gets the same token prompt and
      # simply continues the document, which is the point of showing it.
      loaded = (loaded[0], loaded[1], tok)
    # The RM scores every policy's kept replies (proxy_mean); sampling does not depend on it.
    bar = (lambda label: f"compare: {label}") if progress else (lambda label: "")
    results[name] = evaluation.evaluate_policy(loaded, scorer=scorer, label=name,
                                               progress=bar(name), **common)
    if name == "sft":
      ns = sorted(set(pc.best_of_n) | {BEST_OF_ROW})
      bon, results["best-of-16"] = best_of_n_curve(loaded, scorer=scorer, ns=ns,
                                                   progress=bar("best-of-N"), **common)
  ordered = ["base", "sft", "best-of-16", *stage_names.policy_stages()]
  out_policies = {}
  for name in ordered:
    if name not in results:
      continue
    r = results[name]
    out_policies[name] = {k: r.get(k) for k in ("gold_mean", "gold_se", "proxy_mean", "proxy_se",
                                                 "distinct_2", "eos_fraction", "mean_length")}
    out_policies[name]["kl_to_sft"] = (0.0 if name == "sft" else r.get("kl_to_ref"))
  samples = []
  k = min(pc.num_side_by_side, min(len(r["samples"]) for r in results.values()))
  for i in range(k):
    samples.append({"prompt": results["sft"]["samples"][i]["prompt"],
                    "replies": {name: results[name]["samples"][i]["reply"]
                                for name in ordered if name in results}})
  out = {"num_prompts": len(messages), "policies": out_policies, "best_of_n": bon,
         "samples": samples}
  with open(os.path.join(run_dir, "compare.json"), "w") as f:
    json.dump(out, f, indent=2)
  return {"num_prompts": len(messages)}


BEST_OF_ROW = 16          # the N of the table's best-of-N row


def best_of_n_curve(sft, *, scorer, ns, prompts, reference=None, progress: str = "",
                    **sampling_settings):
  """Best-of-N of the SFT policy for each N in `ns`, from one set of max(ns) replies per prompt
  sampled under `sampling_settings` (those of every other row of the comparison).

  Returns (curve, row): curve = {n, gold_mean, gold_se, proxy_mean, oracle_gold, kl}, with the
  gold of the reply the RM picks among the first N, and of the best of them by gold (the
  oracle); row = the BEST_OF_ROW point with the table's fields, from the same picks.
  """
  del reference                              # the KL of best-of-N is analytic
  n_max = max(ns)
  repeated = [p for p in prompts for _ in range(n_max)]
  # On the engine: of n_max replies to a prompt, most end long before the longest.
  res = evaluation.evaluate_policy(sft, prompts=repeated, scorer=scorer, label="best-of-N",
                                   num_samples=len(repeated), progress=progress, engine=True,
                                   **sampling_settings)
  reps = res["samples"]
  gold = np.asarray([r["gold"] for r in reps]).reshape(len(prompts), n_max)
  proxy = np.asarray([r["proxy"] for r in reps]).reshape(len(prompts), n_max)
  rows = np.arange(len(prompts))
  curve = {"n": list(ns), "gold_mean": [], "gold_se": [], "proxy_mean": [], "oracle_gold": [],
           "kl": []}
  se = lambda x: float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
  row = None
  for n in ns:
    pick = np.argmax(proxy[:, :n], axis=1)
    g, px = gold[rows, pick], proxy[rows, pick]
    kl = float(np.log(n) - (n - 1) / n)
    curve["gold_mean"].append(float(g.mean()))
    curve["gold_se"].append(se(g))
    curve["proxy_mean"].append(float(px.mean()))
    curve["oracle_gold"].append(float(gold[:, :n].max(axis=1).mean()))
    curve["kl"].append(kl)
    if n == BEST_OF_ROW:
      kept = [reps[i * n_max + j] for i, j in zip(rows, pick)]
      replies = [r["reply"] for r in kept]
      row = {"label": f"best-of-{n}", "n": len(kept), "gold_mean": float(g.mean()),
             "gold_se": se(g), "proxy_mean": float(px.mean()), "proxy_se": se(px),
             "kl_to_ref": kl, "distinct_2": evaluation.distinct_n(replies, 2),
             "eos_fraction": float(np.mean([r["ended"] for r in kept])),
             "mean_length": float(np.mean([len(r) for r in replies])), "best_of": n,
             "samples": kept}
  return curve, row

