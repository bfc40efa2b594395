"""The report card: `report.md` plus PNG plots in the run directory.

It reads only what the stages left behind (each stage's metrics.jsonl, eval.json and done.json,
and the comparison's compare.json), so it can be rebuilt at any time:

    python -m gptjax.report runs/demo
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")       # headless: no display on CI machines or TPU VMs
import matplotlib.pyplot as plt  # noqa: E402

from gptjax import stage_names  # noqa: E402

# The stages that train (and so log metrics.jsonl), in the pipeline's order.
TRAIN_STAGES = tuple(s for s in stage_names.all_stages()
                     if s not in ("tokenizer", "rm_data", "compare", "report"))


def _load_jsonl(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def _load_json(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _series(rows, key):
  pts = [(r["step"], r[key]) for r in rows if key in r]
  return [p[0] for p in pts], [p[1] for p in pts]


def plotted_series(run_dir, stages, keys_by_stage):
  """The (stage, metric) pairs a curve plot would draw: those logged at least once."""
  return [(s, k) for s in stages for k in keys_by_stage(s)
          if _series(_load_jsonl(os.path.join(run_dir, s, "metrics.jsonl")), k)[0]]


def rm_keys(stage):
  return ["rm/accuracy", "eval/rm_accuracy"]


def _plot_curves(run_dir, stages, keys_by_stage, title, fname, ylabel=None):
  present = plotted_series(run_dir, stages, keys_by_stage)
  if not present:
    return None
  n = len({s for s, _ in present})
  # At most three panels a row: six stages in one row shrink to unreadable when displayed.
  cols = min(n, 3)
  rows_n = -(-n // cols)
  fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
  for ax in axes.flat[n:]:
    ax.axis("off")
  for ax, stage in zip(axes.flat, dict.fromkeys(s for s, _ in present)):
    rows = _load_jsonl(os.path.join(run_dir, stage, "metrics.jsonl"))
    for s, k in present:
      if s == stage:
        x, y = _series(rows, k)
        ax.plot(x, y, label=k, marker="o" if len(x) < 15 else None, markersize=3)
    ax.set_title(stage)
    ax.set_xlabel("step")
    if ylabel:
      ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  path = os.path.join(run_dir, fname)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return fname


def loss_keys(stage):
  """The curves of a stage's loss panel: an offline policy stage (DPO, KTO, ...) is evaluated on
  held-out data as it trains, an online one only logs its training loss."""
  keys = {"pretrain": ["train/loss", "eval/loss"], "sft": ["train/loss", "eval/loss"],
          "reward": ["train/loss", "eval/rm_loss"]}
  if stage in keys:
    return keys[stage]
  if stage in stage_names.policy_stages() and stage not in stage_names.rl_stages():
    return ["train/loss", "eval/loss"]
  return ["train/loss"]


def _bar(run_dir, compare, fname):
  policies = compare.get("policies", {}) if compare else {}
  names = [n for n in policies if "gold_mean" in policies[n]]
  if not names:
    return None
  means = [policies[n]["gold_mean"] for n in names]
  errs = [policies[n].get("gold_se", 0.0) for n in names]
  fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.4))
  ax.bar(names, means, yerr=errs, capsize=4, color="#4c72b0")
  ax.axhline(0, color="black", lw=0.8)
  ax.set_ylabel("gold VADER score\n(" + compare.get("error_label", "mean ± s.e.") + ")")
  ax.set_title("Kindness of the replies, by stage")
  fig.tight_layout()
  fig.savefig(os.path.join(run_dir, fname), dpi=110)
  plt.close(fig)
  return fname


BEST_OF_N_DEFINITION = (
    "Best-of-N, here and in the table: for each held-out prompt, N replies are sampled from SFT "
    "with the same prompts, temperature and reply length as every other row, and the one the RM "
    "scores highest is kept; its KL to SFT is the analytic log N − (N−1)/N. The curve reuses one "
    "set of replies per prompt (as many as its largest N) for every N, and its N = 16 point is the "
    "table's best-of-16 row. "
    "The oracle keeps the reply with the highest gold score instead: the most reranking can give.")


def _bon(run_dir, compare, fname):
  curve = (compare or {}).get("best_of_n")
  if not curve:
    return None
  ns = [int(n) for n in curve["n"]]
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  ax.errorbar(ns, curve["gold_mean"], yerr=curve.get("gold_se"), marker="o", capsize=3,
              label="gold of the RM's pick")
  if curve.get("oracle_gold"):
    ax.plot(ns, curve["oracle_gold"], marker="^", ls="--", color="gray",
            label="oracle (pick by gold)")
  ax.legend(fontsize=7, loc="upper left")
  ax.set_xscale("log", base=2)
  ax.set_xticks(ns, [str(n) for n in ns])
  ax.set_xlabel("N (SFT replies per prompt, reranked by the RM)")
  ax.set_ylabel("gold VADER score\n(" + compare.get("error_label", "mean ± s.e.") + ")")
  ax.set_title("Best-of-N")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(run_dir, fname), dpi=110)
  plt.close(fig)
  return fname


RL_QUANTITIES = (("rl/score", "RM score (proxy)"), ("rl/gold_score", "gold VADER score"),
                 ("rl/kl", "KL to SFT (nats)"))


def _rl_curves(run_dir, stages, fname):
  """One panel per quantity (their scales differ: RM units, gold in [−1, 1], nats), one line per
  RL stage, against the RL iteration, from each stage's rl_iterations.jsonl."""
  runs = {s: [r for r in _load_jsonl(os.path.join(run_dir, s, "rl_iterations.jsonl"))
              if "rl/iteration" in r] for s in stages}
  runs = {s: rows for s, rows in runs.items() if rows}
  panels = [(k, label) for k, label in RL_QUANTITIES
            if any(k in r for rows in runs.values() for r in rows)]
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
  for ax, (key, label) in zip(axes[0], panels):
    for i, (stage, rows) in enumerate(runs.items()):
      pts = [(r["rl/iteration"], r[key]) for r in rows if key in r]
      if pts:
        ax.plot(*zip(*pts), color=f"C{i}", label=stage, marker="o" if len(pts) < 15 else None,
                markersize=3)
    ax.set_xlabel("RL iteration")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(label)
    ax.set_title(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("RL: each iteration's samples on its training prompts")
  fig.tight_layout()
  fig.savefig(os.path.join(run_dir, fname), dpi=110)
  plt.close(fig)
  return fname


def _frontier(run_dir, compare, fname):
  """Gold against KL to SFT on one axis (Gao et al. 2022): RL, DPO, and best-of-N for every N,
  all on the same held-out prompts; the fair comparison of how much gold each buys per nat."""
  policies = (compare or {}).get("policies", {})
  curve = (compare or {}).get("best_of_n")
  points = {n: p for n, p in policies.items()
            if n not in ("base",) and not n.startswith("best-of-")
            and p.get("kl_to_sft") is not None and p.get("gold_mean") is not None}
  if not points and not curve:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  if curve and curve.get("kl"):
    ax.errorbar(curve["kl"], curve["gold_mean"], yerr=curve.get("gold_se"), marker="o",
                color="gray", capsize=2, label="best-of-N (N = " + ", ".join(
                    str(n) for n in curve["n"]) + ")")
    for n, x, y in zip(curve["n"], curve["kl"], curve["gold_mean"]):
      ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(3, -9), fontsize=6,
                  color="gray")
  for i, (name, p) in enumerate(points.items()):
    ax.errorbar([p["kl_to_sft"]], [p["gold_mean"]], yerr=[p.get("gold_se") or 0.0],
                marker="s", ls="none", capsize=3, color=f"C{i}", label=name)
  ax.set_xscale("symlog", linthresh=1.0)
  ax.set_xlabel("KL to SFT (nats; symlog scale)")
  ax.set_ylabel("gold VADER score\n(" + compare.get("error_label", "mean ± s.e.") + ")")
  ax.set_title("Gold against KL on held-out prompts")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(os.path.join(run_dir, fname), dpi=110)
  plt.close(fig)
  return fname


def overopt_plot(path: str, runs: dict,
                 title: str = "Over-optimisation: the proxy against the gold") -> bool:
  """Proxy and gold, and their rank agreement, per iteration of RL runs.

  runs: {label: workdir} of PPO/GRPO runs that logged rl/gold_score. Writes the PNG at `path`
  and returns True, or False if none of them logged the gold. The report card draws the
  pipeline's PPO and ppo_beta0 stages; pass other runs (another RM, another β) to set them beside.
  """
  series = {label: [r for r in _load_jsonl(os.path.join(d, "metrics.jsonl"))
                    if "rl/gold_score" in r and "rl/kl" in r] for label, d in runs.items()}
  series = {label: rows for label, rows in series.items() if rows}
  if not series:
    return False
  # Legends go under the panels: inside, they hid the curves once four runs were drawn.
  fig, (ax, ax_rho) = plt.subplots(1, 2, figsize=(11, 4.2 + 0.25 * len(series)))
  ax_gold = ax.twinx()
  for i, (label, rows) in enumerate(series.items()):
    colour = f"C{i}"
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["rl/score"] for r in rows], color=colour, label=f"{label}: RM (proxy)")
    ax_gold.plot(steps, [r["rl/gold_score"] for r in rows], color=colour, ls="--",
                 label=f"{label}: gold")
    rho = [(r["step"], r["rl/proxy_gold_spearman"]) for r in rows
           if "rl/proxy_gold_spearman" in r]
    if rho:
      ax_rho.plot(*zip(*rho), color=colour, label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("RM score (solid)")
  ax_gold.set_ylabel("gold VADER score (dashed)")
  handles, labels = ax.get_legend_handles_labels()
  handles_g, labels_g = ax_gold.get_legend_handles_labels()
  ax.legend(handles + handles_g, labels + labels_g, fontsize=7, loc="upper center",
            bbox_to_anchor=(0.5, -0.16), ncol=2)
  ax.grid(alpha=0.3)
  ax_rho.axhline(0, color="black", lw=0.8)
  ax_rho.set_xlabel("step")
  ax_rho.set_ylabel("Spearman ρ(RM, gold) on the samples")
  if any(not line.get_label().startswith("_") for line in ax_rho.lines):
    ax_rho.legend(fontsize=7, loc="upper center",  # none when no iteration had a defined ρ
                  bbox_to_anchor=(0.5, -0.16))
  ax_rho.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


# ------------------------------------------------------------------------------------ seeds --

RESULT_FIELDS = ("gold_mean", "proxy_mean", "kl_to_sft", "distinct_2", "eos_fraction")
RM_FIELDS = ("accuracy_noisy", "accuracy_noiseless", "spearman_gold")


def interval(values) -> tuple[float | None, float | None]:
  """(mean, half-width of the 95% Student-t interval of the mean) over seeds; the half-width is
  None with fewer than two values."""
  import numpy as np
  from scipy import stats
  xs = np.asarray([v for v in values if v is not None], np.float64)
  if not len(xs):
    return None, None
  if len(xs) < 2:
    return float(xs.mean()), None
  sem = xs.std(ddof=1) / np.sqrt(len(xs))
  return float(xs.mean()), float(stats.t.ppf(0.975, len(xs) - 1) * sem)


def seed_runs(run_dir: str) -> dict:
  """{seed: directory} of the main run and its extra seeds (<run>/seeds/<seed>)."""
  cfg = _load_json(os.path.join(run_dir, "pipeline_config.json")) or {}
  return {cfg.get("seed", 0): run_dir, **stage_names.seed_dirs(run_dir)}


def aggregate(run_dir: str) -> dict | None:
  """The results of every seed that finished its comparison, and their means with 95% intervals:
  {seeds, policies: {name: {field: [mean, half-width, n]}}, best_of_n: {...}, reward: {...}}.
  None when fewer than two seeds have results."""
  runs = {seed: d for seed, d in seed_runs(run_dir).items()
          if os.path.exists(os.path.join(d, "compare.json"))}
  if len(runs) < 2:
    return None
  compares = {seed: _load_json(os.path.join(d, "compare.json")) for seed, d in runs.items()}
  names = list(dict.fromkeys(n for c in compares.values() for n in c.get("policies", {})))
  policies = {}
  for name in names:
    per = [c["policies"][name] for c in compares.values() if name in c.get("policies", {})]
    policies[name] = {f: [*interval([p.get(f) for p in per]), len(per)] for f in RESULT_FIELDS}
  curves = [c["best_of_n"] for c in compares.values() if c.get("best_of_n")]
  bon = None
  if curves:
    ns = [n for n in curves[0]["n"] if all(n in c["n"] for c in curves)]
    pick = lambda key: [interval([c[key][c["n"].index(n)] for c in curves if c.get(key)])
                        for n in ns]
    bon = {"n": ns, "gold": pick("gold_mean"), "oracle_gold": pick("oracle_gold"),
           "kl": pick("kl"), "seeds": len(curves)}
  # The RM varies across seeds only when the reward stage ran per seed (not a shared link).
  rms = [_load_json(os.path.join(d, "reward", "eval.json")) for d in runs.values()
         if d == run_dir or not os.path.islink(os.path.join(d, "reward"))]
  rms = [r for r in rms if r]
  reward = ({f: [*interval([r.get(f) for r in rms]), len(rms)] for f in RM_FIELDS}
            if len(rms) > 1 else None)
  return {"seeds": sorted(runs), "num_prompts": compares[min(runs)].get("num_prompts"),
          "policies": policies, "best_of_n": bon, "reward": reward,
          "per_seed": {str(seed): {"policies": {n: {f: p.get(f) for f in RESULT_FIELDS}
                                                for n, p in c.get("policies", {}).items()}}
                       for seed, c in compares.items()}}


def as_compare(agg: dict, main_compare: dict) -> dict:
  """The aggregate in compare.json's shape (means, and intervals where the plots read their
  error bars), so the same plotting code draws one seed or many."""
  out = dict(main_compare or {})
  out["policies"] = {name: {"gold_mean": f["gold_mean"][0], "gold_se": f["gold_mean"][1] or 0.0,
                            "kl_to_sft": f["kl_to_sft"][0]}
                     for name, f in agg["policies"].items()}
  if agg.get("best_of_n"):
    b = agg["best_of_n"]
    out["best_of_n"] = {"n": b["n"], "gold_mean": [m for m, _ in b["gold"]],
                        "gold_se": [h or 0.0 for _, h in b["gold"]],
                        "oracle_gold": [m for m, _ in b["oracle_gold"]],
                        "kl": [m for m, _ in b["kl"]]}
  out["error_label"] = f"mean ± 95% interval over {len(agg['seeds'])} seeds"
  return out


def _pm(mean_hw_n, digits=3):
  mean, hw, _ = mean_hw_n
  if mean is None:
    return "–"
  return f"{mean:.{digits}f}" + (f" ± {hw:.{digits}f}" if hw is not None else " (1 seed)")


def _fmt(v, digits=3):
  if v is None:
    return "–"
  if isinstance(v, float):
    return f"{v:.{digits}f}"
  return str(v)


def write(run_dir: str) -> str:
  lines = ["# gptjax report card", ""]
  env = _load_json(os.path.join(run_dir, "environment.json")) or {}
  compare = _load_json(os.path.join(run_dir, "compare.json"))
  stages = [s for s in TRAIN_STAGES if os.path.isdir(os.path.join(run_dir, s))]
  lines += [f"Run directory: `{os.path.abspath(run_dir)}`. Environment: "
            + ", ".join(f"{k}={v}" for k, v in env.items()), ""]
  lines += ["The recipe: a base model is pretrained on Shakespeare's plays; supervised finetuning "
            "(SFT) turns it into an assistant that answers a speech with a reply; a reward model "
            "(RM) learns which of two replies a labeler (VADER sentiment, with noise) finds kinder; "
            "reinforcement learning (PPO, and GRPO/DPO as alternatives) then optimises the SFT "
            "model against the RM, with a KL penalty that keeps it close to SFT. The *gold* score "
            "is the labeler's own noiseless VADER score, which the RM only approximates.", ""]

  # Results first: what a reader wants to know.
  agg = aggregate(run_dir)
  if agg:
    with open(os.path.join(run_dir, "results_seeds.json"), "w") as f:
      json.dump(agg, f, indent=2)
    lines += ["## Results on held-out prompts", "",
              f"{agg['num_prompts']} prompts from plays never seen in training; seeds "
              f"{', '.join(map(str, agg['seeds']))}. Every figure is the mean over the seeds ± "
              "the half-width of its 95% Student-t interval (each seed's own figures, with "
              "standard errors over prompts, are in `results_seeds.json` and each seed's "
              "compare.json).", "",
              "| model | gold score | RM score (proxy) | KL to SFT | distinct-2 | ends its turn |",
              "|---|---|---|---|---|---|"]
    for name, f in agg["policies"].items():
      lines.append(f"| {name} | {_pm(f['gold_mean'])} | {_pm(f['proxy_mean'], 2)} | "
                   f"{_pm(f['kl_to_sft'])} | {_pm(f['distinct_2'])} | "
                   f"{_pm(f['eos_fraction'], 2)} |")
    lines.append("")
    if agg.get("reward"):
      lines += ["Reward model over the seeds (held-out pairs): " + "; ".join(
          f"{k} {_pm(v)}" for k, v in agg["reward"].items()) + ".", ""]
    compare = as_compare(agg, compare)
  elif compare and compare.get("policies"):
    lines += ["## Results on held-out prompts", "",
              f"{compare.get('num_prompts', '?')} prompts from plays never seen in training.", "",
              "| model | gold score (mean ± s.e.) | RM score (proxy) | KL to SFT | distinct-2 | "
              "ends its turn |",
              "|---|---|---|---|---|---|"]
    for name, p in compare["policies"].items():
      lines.append(f"| {name} | {_fmt(p.get('gold_mean'))} ± {_fmt(p.get('gold_se'))} | "
                   f"{_fmt(p.get('proxy_mean'), 2)} | {_fmt(p.get('kl_to_sft'))} | "
                   f"{_fmt(p.get('distinct_2'))} | {_fmt(p.get('eos_fraction'), 2)} |")
    lines.append("")
  if compare and compare.get("policies"):
    bar = _bar(run_dir, compare, "gold_by_stage.png")
    if bar:
      lines += [f"![gold score by stage]({bar})", ""]
    bon = _bon(run_dir, compare, "best_of_n.png")
    if bon:
      lines += [BEST_OF_N_DEFINITION + " If the RM has learned the labeler's preference, the "
                "gold score rises with N.", "", f"![best of N]({bon})", ""]
    frontier = _frontier(run_dir, compare, "gold_vs_kl.png")
    if frontier:
      lines += ["Gold against KL to SFT, every policy on the same held-out prompts: the fair "
                "comparison of RL, DPO and best-of-N (Gao et al. 2022), since each buys gold by "
                "moving away from SFT.", "", f"![gold against KL]({frontier})", ""]

  # The online RL stages' loss is a surrogate whose value says nothing of progress (it hovers
  # around zero by construction); their curves are the RL section's.
  loss_stages = [s for s in stages if s not in stage_names.rl_stages()]
  loss = _plot_curves(run_dir, loss_stages, loss_keys, "Loss curves", "losses.png", "loss")
  if loss:
    lines += ["## Training curves", "", f"![losses]({loss})", ""]
  rm = _plot_curves(run_dir, ["reward"], rm_keys,
                    "Reward model", "rm_accuracy.png", "pairwise accuracy")
  rm_eval = _load_json(os.path.join(run_dir, "reward", "eval.json"))
  if rm or rm_eval:
    lines += ["## Reward model", ""]
    if rm:
      lines += [f"![rm accuracy]({rm})", ""]
    if rm_eval:
      lines += ["| metric | value |", "|---|---|"]
      lines += [f"| {k} | {_fmt(v)} |" for k, v in rm_eval.items()
                if isinstance(v, (int, float))]
      lines.append("")
  rl_stages = [s for s in stage_names.rl_stages() if s in stages]
  rl = _rl_curves(run_dir, rl_stages, "rl.png")
  if rl:
    lines += ["## Reinforcement learning", "",
              "Per RL iteration, on that iteration's samples of its training prompts: the RM's "
              "(proxy) score, the labeler's gold score, and the KL to the SFT reference.", "",
              f"![rl]({rl})", ""]
  over = "overopt.png" if "ppo_beta0" in stages and overopt_plot(
      os.path.join(run_dir, "overopt.png"),
      {s: os.path.join(run_dir, s) for s in ("ppo", "ppo_beta0") if s in stages}) else None
  if over:
    lines += ["## Over-optimisation (PPO with β = 0)", "",
              "`ppo_beta0` is the PPO stage with its KL penalty removed. Left: the RM (proxy) and "
              "the gold score of each iteration's samples (the KL to SFT is in the RL curves "
              "above). Right: how well "
              "the RM still ranks the policy's own samples as the gold does (Spearman ρ over "
              "each iteration's samples). The RM was fitted on SFT replies; a falling ρ means it "
              "no longer tells the policy's better replies from its worse ones.", "",
              f"![over-optimisation]({over})", ""]

  sft_eval = _load_json(os.path.join(run_dir, "sft", "eval.json"))
  if sft_eval:
    lines += ["## SFT", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in sft_eval.items() if isinstance(v, (int, float))]
    lines.append("")

  if compare and compare.get("samples"):
    lines += ["## Samples, side by side", ""]
    for i, s in enumerate(compare["samples"]):
      lines += [f"### Prompt {i + 1}", "", "> " + s["prompt"].replace("\n", "\n> "), ""]
      for name, text in s["replies"].items():
        lines += [f"**{name}**: " + text.strip().replace("\n", " / "), ""]

  lines += ["## Timings", "", "| stage | wall (s) | compile (s) | steps | tokens/s | MFU |",
            "|---|---|---|---|---|---|"]
  for s in (s for s in stage_names.all_stages() if s != "report"):
    done = _load_json(os.path.join(run_dir, s, "done.json"))
    if not done:
      continue
    rows = _load_jsonl(os.path.join(run_dir, s, "metrics.jsonl"))
    tps = [r["perf/tokens_per_sec"] for r in rows if "perf/tokens_per_sec" in r]
    mfu = [r["perf/mfu"] for r in rows if "perf/mfu" in r]
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else None
    lines.append(f"| {s} | {_fmt(done.get('wall_s'), 1)} | {_fmt(done.get('compile_s'), 1)} | "
                 f"{_fmt(done.get('steps'))} | {_fmt(med(tps), 0)} | "
                 f"{_fmt(None if not mfu else 100 * med(mfu), 2)}{'%' if mfu else ''} |")
  lines.append("")
  path = os.path.join(run_dir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


if __name__ == "__main__":
  print(write(sys.argv[1]))
