"""The pipeline's comparison step: every stage's model on the same held-out prompts.

For base, SFT, best-of-16 (SFT reranked by the RM), PPO, GRPO, DPO and PPO with β = 0 (those that
ran), one reply per held-out prompt is sampled at the same temperature and seed and scored by the
gold labeler (VADER) and by the RM, the proxy the RL stages optimise; the KL to SFT, distinct-2 and
the end-of-turn rate come beside it. The
best-of-N curve comes from the reward stage's own evaluation. Writes `<run>/compare.json`.
"""

from __future__ import annotations

import json
import os


from gptjax import pipeline
from gptjax.stages import rl as rl_stage


def _done(run_dir: str, name: str) -> bool:
  return os.path.exists(os.path.join(run_dir, name, "done.json"))


def run(cfg, run_dir: str, *, progress: bool = False) -> dict:
  pc = cfg.pipeline
  ppo_cfg = cfg.ppo
  d = lambda name: os.path.join(run_dir, name)
  sft = rl_stage.load_policy(d("sft"))
  tok = sft[2]
  messages = rl_stage.prompt_messages(ppo_cfg, "validation")[:pc.num_eval_prompts]
  scorer = rl_stage.make_scorer(_with_reward(ppo_cfg, d("reward")))
  common = dict(prompts=messages, reference=sft, max_new_tokens=ppo_cfg.rl.max_new_tokens,
                temperature=ppo_cfg.rl.eval_temperature, prompt_len=ppo_cfg.rl.prompt_len,
                seed=cfg.seed + 1234)
  policies = {"base": d("pretrain"), "sft": sft}
  for name in pipeline.COMPARED:
    if name in pc.stages and _done(run_dir, name):
      policies[name] = d(name)
  results = {}
  for name, policy in policies.items():
    loaded = rl_stage.load_policy(policy) if isinstance(policy, str) else policy
    if name == "base":
      # The base model never saw the chat markers' meaning; it gets the same token prompt and
      # simply continues the document, which is the point of showing it.
      loaded = (loaded[0], loaded[1], tok)
    # The RM scores every policy's kept replies (proxy_mean); sampling does not depend on it.
    bar = (lambda label: f"compare: {label}") if progress else (lambda label: "")
    results[name] = rl_stage.evaluate_policy(loaded, scorer=scorer, label=name,
                                             progress=bar(name), **common)
    if name == "sft":
      results["best-of-16"] = rl_stage.evaluate_policy(loaded, scorer=scorer, best_of=16,
                                                       label="best-of-16",
                                                       progress=bar("best-of-16"), **common)
  ordered = ["base", "sft", "best-of-16", *pipeline.COMPARED]
  out_policies = {}
  for name in ordered:
    if name not in results:
      continue
    r = results[name]
    out_policies[name] = {k: r.get(k) for k in ("gold_mean", "gold_se", "proxy_mean", "proxy_se",
                                                 "distinct_2", "eos_fraction", "mean_length")}
    out_policies[name]["kl_to_sft"] = (0.0 if name == "sft" else r.get("kl_to_ref"))
  bon = None
  rm_eval_path = os.path.join(d("reward"), "eval.json")
  if os.path.exists(rm_eval_path):
    with open(rm_eval_path) as f:
      rm_eval = json.load(f)
    b = rm_eval.get("best_of_n")
    if b:
      ns = sorted(int(n) for n in b["mean_gold"])
      bon = {"n": ns, "gold_mean": [b["mean_gold"][str(n)] for n in ns]}
      if b.get("se_gold"):
        bon["gold_se"] = [b["se_gold"][str(n)] for n in ns]
      if b.get("oracle_gold"):
        bon["oracle_gold"] = [b["oracle_gold"][str(n)] for n in ns]
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


def _with_reward(cfg, reward_dir):
  import copy
  c = copy.deepcopy(cfg)
  with c.unlocked():
    c.rl.reward = "rm"
    c.rl.reward_workdir = reward_dir
  return c
