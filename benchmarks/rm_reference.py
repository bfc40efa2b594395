"""How well can the preference data rank replies? A yardstick for the reward model's Spearman.

    python benchmarks/rm_reference.py --train runs/demo/rm_data/train.jsonl \
        --validation runs/demo/rm_data/validation.jsonl [--prompts 1024 2048 4096] [--rm runs/demo/reward]

Fits a bag-of-words Bradley–Terry model to the training file's ranked pairs: a reply's score is
w · (word counts), and each pair the labeler ranked gives the loss −log σ(s_better − s_worse),
with an L2 penalty, minimised by L-BFGS. Ties are skipped, as the reward model's default loss does.
It then reports, on the validation file's replies:
- the Spearman correlation of that score with the gold score, for each training-set size
  (the first N prompts of the file), the figure the RM's `spearman_gold` is measured against;
- the ceiling a perfect scorer reaches when its order inside the gold ties is arbitrary
  (gold plus a tiny random jitter), since most SFT replies score exactly 0;
- with --rm, the trained reward model's own Spearman on the same replies.

The gold labeler (VADER) is itself a weighted word count, so this linear model is close to the
right family: it says what the data supports, not what a transformer must reach.
"""

from __future__ import annotations

import argparse
import collections
import json
import re

import numpy as np
from scipy import optimize, sparse, stats

_WORD = re.compile(r"[a-z']+|[!?]")


def read(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def words(text: str) -> list[str]:
  return _WORD.findall(text.lower())


def fit_bag_of_words(records: list[dict], *, l2: float) -> tuple[dict, np.ndarray]:
  """(vocabulary, weights) of the Bradley–Terry bag-of-words model on the records' ranked pairs."""
  vocab: dict[str, int] = {}
  for r in records:
    for text in r["responses"]:
      for w in words(text):
        vocab.setdefault(w, len(vocab))
  rows, cols, vals = [], [], []
  n_pairs = 0
  for r in records:
    counts = [collections.Counter(vocab[w] for w in words(t)) for t in r["responses"]]
    for i, ri in enumerate(r["ranks"]):
      for j, rj in enumerate(r["ranks"]):
        if ri <= rj:
          continue                         # each ranked pair once, better minus worse; no ties
        diff = collections.Counter(counts[i])
        diff.subtract(counts[j])
        for k, v in diff.items():
          if v:
            rows.append(n_pairs)
            cols.append(k)
            vals.append(float(v))
        n_pairs += 1
  d = sparse.csr_matrix((vals, (rows, cols)), shape=(n_pairs, len(vocab)))

  def loss_and_grad(w):
    z = d @ w
    loss = np.mean(np.logaddexp(0.0, -z)) + 0.5 * l2 * w @ w
    grad = -(d.T @ (1.0 / (1.0 + np.exp(z)))) / n_pairs + l2 * w
    return loss, grad

  res = optimize.minimize(loss_and_grad, np.zeros(len(vocab)), jac=True, method="L-BFGS-B",
                          options={"maxiter": 2000})
  return vocab, res.x


def bow_scores(vocab: dict, w: np.ndarray, texts: list[str]) -> np.ndarray:
  return np.array([sum(w[vocab[t]] for t in words(x) if t in vocab) for x in texts])


def rm_scores(workdir: str, records: list[dict]) -> np.ndarray:
  from gptjax import reward_model
  return reward_model.load_reward_model(workdir).score_records(records)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--train", required=True, help="preference_jsonl with ranks (rm_data output)")
  ap.add_argument("--validation", required=True, help="held-out preference_jsonl with scores")
  ap.add_argument("--prompts", type=int, nargs="*", default=[],
                  help="training-set sizes (first N prompts); default: the whole file")
  ap.add_argument("--l2", type=float, default=1e-4)
  ap.add_argument("--rm", default="", help="a reward workdir to score the same replies")
  args = ap.parse_args()

  train, val = read(args.train), read(args.validation)
  if any(r.get("scores") is None for r in val):
    raise SystemExit(f"{args.validation}: every record needs gold 'scores' (rm_data writes them)")
  texts = [t for r in val for t in r["responses"]]
  gold = np.array([s for r in val for s in r["scores"]], np.float64)
  rng = np.random.default_rng(0)
  ceiling = np.median([stats.spearmanr(gold + 1e-9 * rng.standard_normal(len(gold)), gold)
                       .statistic for _ in range(21)])
  print(f"validation: {len(val)} prompts, {len(gold)} replies, {np.mean(gold == 0):.1%} with gold "
        f"exactly 0; ceiling with arbitrary order inside ties: Spearman {ceiling:.3f}")
  for n in args.prompts or [len(train)]:
    if n > len(train):
      raise SystemExit(f"--prompts {n}: {args.train} has only {len(train)} records")
    vocab, w = fit_bag_of_words(train[:n], l2=args.l2)
    rho = stats.spearmanr(bow_scores(vocab, w, texts), gold).statistic
    print(f"bag-of-words Bradley–Terry on {n} prompts ({len(vocab)} words): Spearman {rho:.3f}")
  if args.rm:
    rho = stats.spearmanr(rm_scores(args.rm, val), gold).statistic
    print(f"reward model {args.rm}: Spearman {rho:.3f}")


if __name__ == "__main__":
  main()
