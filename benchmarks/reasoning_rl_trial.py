"""Which RL settings for the arithmetic recipe: GRPO (or PPO) trials on *validation* problems.

    python benchmarks/reasoning_rl_trial.py --source runs/reason --out runs/rl_trial \
        --trial lr1e-4: --trial lr1e-5:grpo_cot.optim.lr=1e-5 [--stage grpo_cot] \
        [--per_band 24] [--samples 8]

Each `--trial NAME:OVERRIDE[,OVERRIDE...]` runs the RL stage of a finished tiny run (`--source`:
its task data, tokenizer, CoT SFT model and outcome RM are read, never written) again with the
overrides, in `<out>/<NAME>/`, then measures the policy on the run's validation problems (drawn
from the training split with another seed and kept apart from the training problems; the held-out
set is never read): greedy accuracy, and pass@1 as the mean over `--samples` chains at the recipe's
temperature, by band, with Wilson 95% intervals. The first row is the SFT model itself, the
starting point every trial must beat. A trial with no overrides (`NAME:`) is the preset.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# The source run's stages a trial reads; linked into the trial's directory, never copied.
SHARED = ("task_data", "tokenizer", "sft_cot", "orm")


def _measure(policy_dir, problems, *, samples, temperature, max_new_tokens):
  from gptjax import reasoning
  from gptjax.tasks import arithmetic as ar
  policy = reasoning.load_policy(policy_dir)
  qs = [q.question for q in problems]
  greedy = reasoning.sample(policy, qs, n=1, temperature=0.0, max_new_tokens=max_new_tokens,
                            seed=0, batch_size=256)
  drawn = reasoning.sample(policy, qs, n=samples, temperature=temperature,
                           max_new_tokens=max_new_tokens, seed=1, batch_size=256)
  g = [float(ar.is_correct(t[0], q.answer)) for t, q in zip(greedy["texts"], problems)]
  p1 = [sum(ar.is_correct(x, q.answer) for x in t) / samples
        for t, q in zip(drawn["texts"], problems)]
  return g, p1


def _cell(values):
  from gptjax.tasks import arithmetic as ar
  lo, hi = ar.wilson_interval(sum(values), len(values))
  return f"{sum(values) / len(values):.3f} [{lo:.2f}, {hi:.2f}]"


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--source", required=True, help="a finished tiny run of the recipe")
  p.add_argument("--out", required=True)
  p.add_argument("--trial", action="append", required=True, metavar="NAME:OVERRIDES")
  p.add_argument("--stage", default="grpo_cot")
  p.add_argument("--config", default=os.path.join(REPO, "experiments/arithmetic_reasoning.py:tiny"))
  p.add_argument("--per_band", type=int, default=24)
  p.add_argument("--samples", type=int, default=8)
  args = p.parse_args(argv)
  trials = []
  for t in args.trial:
    name, sep, rest = t.partition(":")
    if not sep or not name:
      p.error(f"--trial: expected NAME:OVERRIDE[,OVERRIDE...], got {t!r}")
    trials.append((name, [x for x in rest.split(",") if x]))
  for s in SHARED:
    if not os.path.isdir(os.path.join(args.source, s)):
      p.error(f"--source: {args.source}/{s} is missing; run the recipe's earlier stages first")
  from gptjax import config, pipeline, reasoning
  probs = reasoning.read_problems(os.path.join(args.source, "task_data",
                                               "problems_validation.jsonl"))
  by_band = {}
  for q in probs:
    if len(by_band.setdefault(q.band, [])) < args.per_band:
      by_band[q.band].append(q)
  chosen = [q for g in by_band.values() for q in g]
  base = config.load(args.config, [])
  ev = base.reason_eval
  kw = dict(samples=args.samples, temperature=float(ev.temperature),
            max_new_tokens=int(ev.max_new_tokens))
  rows = [("SFT (sft_cot)", 0.0, *_measure(os.path.join(args.source, "sft_cot"), chosen, **kw))]
  for name, overrides in trials:
    run = os.path.join(args.out, name)
    os.makedirs(run, exist_ok=True)
    for s in SHARED:
      link = os.path.join(run, s)
      if not os.path.lexists(link):
        os.symlink(os.path.abspath(os.path.join(args.source, s)), link)
    cfg = config.load(args.config, [f"pipeline.stages=('{args.stage}',)",
                                    "pipeline.seeds=()", *overrides])
    t0 = time.time()
    if pipeline.run(cfg, run, progress=False) != 0:
      raise SystemExit(f"trial {name}: the {args.stage} stage did not finish")
    wall = time.time() - t0
    rows.append((f"{name} ({', '.join(overrides) or 'the preset'})", wall,
                 *_measure(os.path.join(run, args.stage), chosen, **kw)))
  bands = list(by_band)
  print(f"{len(chosen)} validation problems ({args.per_band} a band); pass@1 = mean over "
        f"{args.samples} chains at temperature {kw['temperature']}")
  print("| policy | greedy, all | pass@1, all | " + " | ".join(f"pass@1 {b}" for b in bands)
        + " | RL wall s |")
  print("|---|---|---|" + "---|" * len(bands) + "---|")
  for label, wall, g, p1 in rows:
    per = [_cell([v for v, q in zip(p1, chosen) if q.band == b]) for b in bands]
    print(f"| {label} | {_cell(g)} | {_cell(p1)} | " + " | ".join(per) + f" | {wall:.0f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
