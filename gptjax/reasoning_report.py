"""The reasoning report card: `report.md` and its plots, from one or more runs' reason_eval.json.

    python -m gptjax.reasoning_report runs/reason                       # one run
    python -m gptjax.reasoning_report runs/reason runs/reason_s1 --out docs/report_reasoning

Every row of the method table is shown, whatever method made it, so a new method (tools,
constrained decoding, search, retrieval) is a new row with no change here. With one run a cell is
the accuracy over the band's held-out problems with its Wilson 95% interval; with several runs
(training seeds) it is the mean over runs with a 95% t-interval of the run means. The findings
are computed from the intervals, so the report says where a claim holds, where it does not, and
where the data cannot tell.
"""

from __future__ import annotations

import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gptjax.tasks import arithmetic as ar  # noqa: E402

RESULTS_FILE = "reason_eval.json"

# Two-sided 95% Student t quantiles for n-1 degrees of freedom (n runs).
_T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306,
        10: 2.262}


def load(run_dirs) -> list[dict]:
  out = []
  for d in run_dirs:
    path = os.path.join(d, RESULTS_FILE)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no reasoning evaluation here; run the reason_eval stage")
    with open(path) as f:
      out.append(json.load(f))
  return out


def _metric(row) -> str:
  return row.get("metric", "accuracy")


def _cell_values(results, method, band, metric="accuracy"):
  vals = []
  for r in results:
    for row in r["rows"]:
      if row["method"] == method and _metric(row) == metric:
        c = row["overall"] if band == "all" else row["per_band"].get(band)
        if c and c["n"]:
          vals.append(c)
  return vals


def summarise(cells) -> dict | None:
  """One table cell from the cells of several runs (or one)."""
  if not cells:
    return None
  if len(cells) == 1:
    c = cells[0]
    return {"acc": c["acc"], "lo": c["lo"], "hi": c["hi"], "n": c["n"], "runs": 1}
  accs = np.asarray([c["acc"] for c in cells], np.float64)
  half = _T95.get(len(accs), 1.96) * accs.std(ddof=1) / math.sqrt(len(accs))
  return {"acc": float(accs.mean()), "lo": max(0.0, float(accs.mean() - half)),
          "hi": min(1.0, float(accs.mean() + half)), "n": cells[0]["n"], "runs": len(accs)}


def methods(results, metric="accuracy") -> list[tuple[str, int]]:
  """(method, budget) of the rows measuring `metric`, in table order."""
  seen = {}
  for r in results:
    for row in r["rows"]:
      if _metric(row) == metric:
        seen.setdefault(row["method"], row["budget"])
  return list(seen.items())


def other_metrics(results) -> list[str]:
  """Metrics other than accuracy that some row measures (e.g. 'format errors')."""
  return list(dict.fromkeys(_metric(row) for r in results for row in r["rows"]
                            if _metric(row) != "accuracy"))


def _fmt(c):
  if c is None:
    return "–"
  return f"{c['acc']:.2f} [{c['lo']:.2f}, {c['hi']:.2f}]"


def table_markdown(results, bands, metric="accuracy") -> str:
  cols = ["all"] + bands
  lines = ["| method | budget | " + " | ".join(cols) + " |",
           "|---|---|" + "---|" * len(cols)]
  for m, budget in methods(results, metric):
    cells = [_fmt(summarise(_cell_values(results, m, b, metric))) for b in cols]
    lines.append(f"| {m} | {budget} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def row_claims(results) -> dict:
  """method -> {'against': method, 'text': claim} of the rows that carry a claim."""
  out = {}
  for r in results:
    for row in r["rows"]:
      if row.get("claim"):
        out.setdefault(row["method"], row["claim"])
  return out


def row_notes(results) -> list[str]:
  """The notes rows carry (how a budget was matched, what a ceiling means), one line each."""
  seen = {}
  for r in results:
    for row in r["rows"]:
      if row.get("note"):
        seen.setdefault(row["method"], row["note"])
  return [f"- *{m}*: {note}" for m, note in seen.items()]


def compare(results, a: str, b: str, band: str) -> str | None:
  """'better', 'worse' or 'no clear difference' for method a against b on a band (intervals)."""
  ca, cb = summarise(_cell_values(results, a, band)), summarise(_cell_values(results, b, band))
  if ca is None or cb is None:
    return None
  if ca["lo"] > cb["hi"]:
    return "better"
  if ca["hi"] < cb["lo"]:
    return "worse"
  return "no clear difference"


def findings(results, bands, train_bands) -> list[str]:
  """The talk's claims, band by band, as the intervals support them."""
  names = [m for m, _ in methods(results)]
  claims = [("CoT, greedy", "direct, greedy", "chain-of-thought beats a direct answer")]
  sc = sorted((m for m in names if m.startswith("self-consistency@")),
              key=lambda m: int(m.split("@")[1]))
  if sc:
    claims.append((sc[-1], "CoT, 1 sample", "a majority vote over sampled chains beats one chain"))
  orm = sorted((m for m in names if m.startswith("best-of-") and m.endswith("ORM")),
               key=lambda m: int(m.split("-")[2].split(",")[0]))
  if orm:
    claims.append((orm[-1], "CoT, 1 sample", "reranking by the outcome RM beats one chain"))
  if "grpo_cot, 1 sample" in names:
    claims.append(("grpo_cot, 1 sample", "CoT, 1 sample", "GRPO on the verifier's reward raises "
                   "one sample's accuracy"))
  if "tool, greedy" in names:
    claims.append(("tool, greedy", "CoT, greedy", "a calculator in the decode loop beats "
                   "chain-of-thought without it"))
  if "ppo_orm, 1 sample" in names:
    claims.append(("ppo_orm, 1 sample", "CoT, 1 sample", "PPO against the outcome RM raises one "
                   "sample's accuracy"))
  # A row may carry its own claim against another row (a stage that adds rows says what its
  # method should beat, e.g. tree search against self-consistency at equal tokens).
  for m, claim in row_claims(results).items():
    if claim.get("against") in names:
      claims.append((m, claim["against"], claim["text"]))
  out = []
  for a, b, claim in claims:
    verdict = {band: compare(results, a, b, band) for band in ["all"] + bands}
    holds = [k for k, v in verdict.items() if v == "better"]
    fails = [k for k, v in verdict.items() if v == "worse"]
    unclear = [k for k, v in verdict.items() if v == "no clear difference"]
    beyond = [k for k in bands if k not in train_bands]
    s = f"- **{claim}** ({a} vs {b}): "
    parts = []
    if holds:
      parts.append("holds on " + ", ".join(holds))
    if fails:
      parts.append("is reversed on " + ", ".join(fails))
    if unclear:
      parts.append("cannot be told apart on " + ", ".join(unclear))
    s += "; ".join(parts) + "."
    if beyond and any(b in holds for b in beyond):
      s += " It carries to bands beyond training (" + ", ".join(
          b for b in beyond if b in holds) + ")."
    out.append(s)
  return out


def budget_table(results) -> str:
  """Methods side by side at equal sampling budgets (completions drawn per problem)."""
  by_budget = {}
  for m, budget in methods(results):
    by_budget.setdefault(budget, []).append(m)
  lines = ["| samples per problem | method | accuracy (all bands) |", "|---|---|---|"]
  for budget in sorted(by_budget):
    for m in by_budget[budget]:
      lines.append(f"| {budget} | {m} | {_fmt(summarise(_cell_values(results, m, 'all')))} |")
  return "\n".join(lines)


def _curve_plot(results, bands, train_bands, path) -> None:
  groups = [("all bands", None), ("training bands", [b for b in bands if b in train_bands]),
            ("beyond training", [b for b in bands if b not in train_bands])]
  groups = [(t, g) for t, g in groups if g is None or g]
  fig, axes = plt.subplots(1, len(groups), figsize=(4.4 * len(groups), 3.4), squeeze=False)
  styles = {"self_consistency": ("self-consistency (vote)", "o-"),
            "orm": ("best-of-k, outcome RM", "s-"), "oracle": ("best-of-k, oracle (pass@k)", "^--")}
  for ax, (title, group) in zip(axes[0], groups):
    for what, (label, style) in styles.items():
      per_run = []
      for r in results:
        cur = r["curves"].get("cot_sampling", {})
        if not cur.get(what):
          continue
        ks = cur["k"]
        vals = []
        for k in ks:
          row = cur[what][str(k)]
          cells = [row["overall"]] if group is None else [row["per_band"][b] for b in group
                                                         if b in row["per_band"]]
          n = sum(c["n"] for c in cells)
          pooled_n = n
          vals.append(sum(c["acc"] * c["n"] for c in cells) / n if n else np.nan)
        per_run.append(vals)
      if not per_run:
        continue
      arr = np.asarray(per_run)
      mean = arr.mean(0)
      line, = ax.plot(ks, mean, style, label=label, markersize=4)
      if len(per_run) > 1:
        half = _T95.get(len(per_run), 1.96) * arr.std(0, ddof=1) / math.sqrt(len(per_run))
        lo, hi = mean - half, mean + half
      else:
        # One run: the Wilson interval over the problems pooled in the panel.
        lo, hi = zip(*[ar.wilson_interval(a * pooled_n, pooled_n) for a in mean])
      ax.fill_between(ks, lo, hi, alpha=0.15, color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k sampled chains")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _rl_plot(results, path) -> bool:
  stages = sorted({name for r in results for name in r["curves"] if name != "cot_sampling"})
  if not stages:
    return False
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
  for name in stages:
    for i, r in enumerate(results):
      pts = r["curves"].get(name)
      if not pts:
        continue
      steps = [p["step"] for p in pts]
      k = [key for key in pts[0] if key.startswith("pass@") and key != "pass@1"]
      k = [key for key in k if not key.endswith("_se")]
      label = name if i == 0 else None
      # Error bars: ±1.96 standard errors over the subset's problems.
      err = lambda key: [1.96 * p.get(key + "_se", 0.0) for p in pts]
      line = axes[0].errorbar(steps, [p["pass@1"] for p in pts], yerr=err("pass@1"), fmt="o-",
                              label=label, markersize=3, capsize=2).lines[0]
      if k:
        axes[1].errorbar(steps, [p[k[0]] for p in pts], yerr=err(k[0]), fmt="o-",
                         color=line.get_color(), label=f"{name} {k[0]}" if i == 0 else None,
                         markersize=3, capsize=2)
      axes[2].plot(steps, [p["mean_tokens"] for p in pts], "o-", color=line.get_color(),
                   label=label, markersize=3)
  for ax, title in zip(axes, ("pass@1 (held-out subset)", "pass@k (held-out subset)",
                              "mean response length (tokens)")):
    ax.set_title(title)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def write(run_dirs, out_dir: str) -> str:
  """Writes `<out_dir>/report.md` (and its PNGs) from the runs' reason_eval.json."""
  results = load(run_dirs)
  os.makedirs(out_dir, exist_ok=True)
  bands = results[0]["bands"]
  train_bands = results[0].get("train_bands", [])
  beyond = [b for b in bands if b not in train_bands]
  lines = ["# Reasoning report card: arithmetic with a verifier", "",
           f"Runs: {', '.join(os.path.basename(os.path.abspath(d)) for d in run_dirs)} "
           f"({len(results)} training seed{'s' if len(results) > 1 else ''}). "
           f"{results[0]['problems']} held-out problems; training bands "
           f"{', '.join(train_bands)}; beyond training: {', '.join(beyond) or 'none'}. "
           f"Sampled methods draw {results[0]['samples']} chains per problem at temperature "
           f"{results[0]['temperature']} from the CoT SFT model; every sampled row reads those "
           "same chains. A cell is accuracy [95% interval]: "
           + ("Wilson over the band's problems." if len(results) == 1 else
              "the mean over runs, t-interval of the run means."), "",
           "## Methods on the same held-out problems", "", table_markdown(results, bands), ""]
  notes = row_notes(results)
  if notes:
    lines += ["Notes on rows:", "", *notes, ""]
  for metric in other_metrics(results):
    lines += [f"## {metric.capitalize()} (rate of replies, lower is better)", "",
              table_markdown(results, bands, metric), ""]
  lines += ["## What holds at this scale", ""]
  lines += findings(results, bands, train_bands)
  lines += ["", "## At equal sampling budget", "", budget_table(results), ""]
  _curve_plot(results, bands, train_bands, os.path.join(out_dir, "self_consistency.png"))
  lines += ["## Self-consistency and best-of-k against k", "",
            "![self-consistency](self_consistency.png)", ""]
  if _rl_plot(results, os.path.join(out_dir, "rl_curves.png")):
    lines += ["## RL over training", "",
              "pass@1, pass@k and response length of each RL policy at its checkpoints (step 0 "
              "is the CoT SFT model), on a fixed subset of the held-out problems.", "",
              "![rl curves](rl_curves.png)", ""]
    for name, pts in results[0]["curves"].items():
      if name == "cot_sampling":
        continue
      keys = [k for k in pts[0] if k != "problems" and not k.endswith("_se")]
      lines += [f"**{name}**", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
      for p in pts:
        lines.append("| " + " | ".join(f"{p[k]:.3f}" if isinstance(p.get(k), float) else
                                       str(p.get(k, "–")) for k in keys) + " |")
      lines.append("")
  lines += ["## Traces", ""]
  for method, traces in results[0]["traces"].items():
    lines += [f"### {method}", ""]
    for t in traces:
      mark = "correct" if t["correct"] else f"wrong (answer {t['answer']})"
      lines += [f"*{t['band']}*, {mark}: {t['question']}", "", "```", t["output"] or "(empty)",
                "```", ""]
  timings = results[0].get("timings", {})
  if timings:
    lines += ["## Evaluation time", "", ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
              ""]
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def main(argv) -> int:
  import argparse
  p = argparse.ArgumentParser(prog="python -m gptjax.reasoning_report")
  p.add_argument("runs", nargs="+", help="run directories with reason_eval.json")
  p.add_argument("--out", default=None, help="output directory (default: the first run)")
  args = p.parse_args(argv)
  try:
    print(write(args.runs, args.out or args.runs[0]))
  except FileNotFoundError as e:
    print(f"gptjax: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
