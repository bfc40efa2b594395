"""The simulated human labeler of the embedded reward-model recipe, and the gold score behind it.

    gold_score(texts) -> np.ndarray [N] float32       VADER compound sentiment, in [-1, 1]
    noisy_preference(score_a, score_b, *, temperature, rng) -> np.ndarray bool   True: a preferred
    noisy_ranking(scores [..., K], *, temperature, rng) -> np.ndarray int32 ranks (K-1 = best)

The "human" prefers the more positive reply, but not reliably: with gold scores s_a and s_b it
prefers a with probability σ((s_a − s_b) / temperature), the Bradley–Terry model the reward model
itself assumes. Temperature 0 is the noiseless labeler (ties broken at random). A ranking of K
replies draws Plackett–Luce noise (Gumbel(0, temperature) added to each score, then sorted), which
for K = 2 is exactly the Bradley–Terry pair above, because the difference of two independent
Gumbel variables is logistic.

The RL stage uses `gold_score` as its ground-truth reward, so the reward model is judged (and the
RL policy is scored) against the same labeler that produced the preference data.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np


@functools.lru_cache(maxsize=1)
def _analyzer():
  # The lexicon takes ~0.1 s to load; one analyzer serves every call in the process.
  from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
  return SentimentIntensityAnalyzer()


def gold_score(texts: Sequence[str]) -> np.ndarray:
  """VADER compound score of each text: −1 (most negative) to 1 (most positive), 0 for none."""
  analyzer = _analyzer()
  return np.asarray([analyzer.polarity_scores(t)["compound"] for t in texts], np.float32)


def _generator(rng) -> np.random.Generator:
  return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def noisy_preference(score_a, score_b, *, temperature: float, rng) -> np.ndarray:
  """True where the labeler prefers a over b: P(a) = σ((score_a − score_b) / temperature)."""
  if temperature < 0:
    raise ValueError(f"labeler temperature must be >= 0 (0 = noiseless), got {temperature}")
  a = np.asarray(score_a, np.float64)
  b = np.asarray(score_b, np.float64)
  u = _generator(rng).random(np.broadcast_shapes(a.shape, b.shape))
  if temperature == 0:
    return np.where(a == b, u < 0.5, a > b)
  p = 1.0 / (1.0 + np.exp(-(a - b) / temperature))
  return u < p


def noisy_ranking(scores, *, temperature: float, rng, ties: bool = False) -> np.ndarray:
  """Ranks of K replies along the last axis (0 = worst, higher = better) from a noisy labeler.

  Plackett–Luce: rank by score + Gumbel noise of scale `temperature`. Temperature 0 ranks by the
  score itself. Replies with equal scores are ordered at random, or with `ties=True` share one
  noise draw and one rank: the labeler says "equally good", and the loss trains no pair between
  them. (VADER gives most short replies exactly 0; coin-flip orders among those would be most of
  the pairs and carry no signal.)
  """
  if temperature < 0:
    raise ValueError(f"labeler temperature must be >= 0 (0 = noiseless), got {temperature}")
  s = np.asarray(scores, np.float64)
  gen = _generator(rng)
  noise = gen.gumbel(size=s.shape) * temperature if temperature else gen.random(s.shape) * 1e-9
  if ties:
    # Every reply takes the noise of the first reply with the same score in its row.
    first = np.argmax(s[..., :, None] == s[..., None, :], axis=-1)
    noise = np.take_along_axis(noise, first, axis=-1)
    noisy = s + noise
    return np.sum(noisy[..., None, :] < noisy[..., :, None], axis=-1).astype(np.int32)
  noisy = s + noise
  return np.argsort(np.argsort(noisy, axis=-1), axis=-1).astype(np.int32)
