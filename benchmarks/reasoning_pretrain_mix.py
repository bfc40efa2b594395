"""Which base for the arithmetic recipe: pretrain on the task's text alone, or mixed with Shakespeare?

    python benchmarks/reasoning_pretrain_mix.py --out runs/mix [--fractions 0.0 0.5] \
        [--pretrain_steps 200] [--sft_steps 100] [--per_band 24] [--existing 0=runs/reason]

For each Shakespeare fraction of the pretraining characters, runs the tiny recipe's first stages
(task_data, tokenizer, pretrain, sft_cot) with the given steps, then measures the CoT model's
greedy accuracy on *validation* problems (drawn from the training split, never the held-out set)
per band, with Wilson 95% intervals. Equal steps means equal compute: the mixed base sees fewer
task tokens, which is the trade the choice is about.

`--existing FRACTION=RUN` measures a finished run of the recipe (its `sft_cot`) in the same table
instead of training that fraction again: the tiny pipeline's own run is the fraction-0 arm at the
preset's length, so only the other arm costs training. Its validation problems must be the
trial's (the generator is seeded; checked).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5])
  p.add_argument("--pretrain_steps", type=int, default=200)
  p.add_argument("--sft_steps", type=int, default=100)
  p.add_argument("--per_band", type=int, default=24)
  p.add_argument("--set", action="append", default=[],
                 help="a further override of the tiny preset, e.g. pretrain.model.num_layers=6")
  p.add_argument("--existing", action="append", default=[], metavar="FRACTION=RUN",
                 help="a finished run of the recipe measured as that fraction's arm")
  args = p.parse_args(argv)
  existing = {}
  for item in args.existing:
    frac, sep, run = item.partition("=")
    if not sep or not os.path.isdir(os.path.join(run, "sft_cot")):
      p.error(f"--existing: expected FRACTION=RUN with RUN/sft_cot a finished stage, got {item!r}")
    existing[float(frac)] = run
  from gptjax import config, pipeline, reasoning
  from gptjax.tasks import arithmetic as ar
  rows = []
  questions = None
  for frac in sorted(set(args.fractions) | set(existing)):
    run = existing.get(frac) or os.path.join(args.out, f"shakespeare_{frac:g}")
    cfg = config.load(os.path.join(REPO, "experiments/arithmetic_reasoning.py:tiny"), [
        "pipeline.stages=('task_data','tokenizer','pretrain','sft_cot')",
        f"task_data.shakespeare_fraction={frac}",
        f"pretrain.train.steps={args.pretrain_steps}",
        f"pretrain.train.eval_every={args.pretrain_steps}",
        f"pretrain.train.checkpoint_every={args.pretrain_steps}",
        f"sft_cot.train.steps={args.sft_steps}",
        f"sft_cot.train.eval_every={args.sft_steps}",
        f"sft_cot.train.checkpoint_every={args.sft_steps}",
        "sft_cot.sft.eval_prompts=0"] + args.set)
    t0 = time.time()
    if frac not in existing:
      assert pipeline.run(cfg, run, progress=False) == 0
    probs = reasoning.read_problems(os.path.join(run, "task_data", "problems_validation.jsonl"))
    by_band = {}
    for q in probs:
      if len(by_band.setdefault(q.band, [])) < args.per_band:
        by_band[q.band].append(q)
    chosen = [q for g in by_band.values() for q in g]
    # Every arm on the same problems, or the table compares nothing.
    if questions is None:
      questions = [q.question for q in chosen]
    elif questions != [q.question for q in chosen]:
      raise SystemExit(f"{run}: its validation problems differ from the first arm's")
    s = reasoning.sample(reasoning.load_policy(os.path.join(run, "sft_cot")),
                         [q.question for q in chosen], n=1, temperature=0.0,
                         max_new_tokens=80, seed=0, batch_size=256)
    ok = [ar.is_correct(t[0], q.answer) for t, q in zip(s["texts"], chosen)]
    res = {"fraction": frac, "all": (sum(ok), len(ok)), "wall_s": time.time() - t0,
           "run": run}
    for band in by_band:
      sel = [o for o, q in zip(ok, chosen) if q.band == band]
      res[band] = (sum(sel), len(sel))
    rows.append(res)
  bands = list(by_band)
  print("| Shakespeare fraction | run | all | " + " | ".join(bands) + " | wall s |")
  print("|---|---|---|" + "---|" * len(bands) + "---|")
  for r in rows:
    cells = []
    for key in ["all"] + bands:
      k, n = r[key]
      lo, hi = ar.wilson_interval(k, n)
      cells.append(f"{k / n:.2f} [{lo:.2f}, {hi:.2f}]")
    print(f"| {r['fraction']:g} | {r['run']} | " + " | ".join(cells) + f" | {r['wall_s']:.0f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
