"""The trained reward model as a library: load it from a workdir and score token sequences.

    scorer = load_reward_model(workdir)
    scores = scorer(prompt_ids, completion_ids)     # -> np.ndarray [B] float32

`prompt_ids` and `completion_ids` are B token sequences each (lists, or right-padded 2-D arrays:
trailing pad ids are dropped). A prompt is what the sampler continued from (the chat template's
generation prompt, ending at `<|assistant|>`); a completion is what it sampled, its `<|end|>`
included when it stopped. The score is read at the last real token, with the normalisation bias
of `<workdir>/reward_normalization.json` already added, so SFT samples on the training prompts
score 0 on average. `scorer.score_tokens(tokens [B,T], mask [B,T])` scores fixed-shape arrays
without leaving the device; `scorer.params`, `scorer.model` and `scorer.tokenizer` are there for
anything else.

`make_scorer(spec, reward_workdir)` turns the RL config's `rl.reward` into the rollouts' scorer
interface: the RM (through `rollout.TokenScorer`) or a Python function of text. The reward stage
(`stages/reward.py`) trains the model and writes the normalisation; everything here only reads.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import batches as batches_lib
from gptjax import checkpoint as ckpt_lib
from gptjax.data import chat
from gptjax.losses import reward as reward_loss

NORMALIZATION_FILE = "reward_normalization.json"


def sequence_ids(prompt_ids, completion_ids, *, seq_len: int) -> list[int]:
  """prompt + completion, cut from the left when longer than `seq_len` so the end is scored."""
  ids = list(prompt_ids) + list(completion_ids)
  return ids[-seq_len:]


def completions(rec: dict, tok) -> list[list[int]]:
  """The token ids of a record's replies: the sampled ids when the generator stored them (text
  does not round-trip when a sample holds special tokens), else the text with `<|end|>` after
  each reply that ended."""
  if rec.get("response_ids"):
    return [list(x) for x in rec["response_ids"]]
  return [chat.reply_ids(tok, rec["prompt"], t, ended=e)
          for t, e in zip(rec["responses"], rec["ended"])]


def make_score_fn(model):
  """Jitted params, tokens [B,T], mask [B,T] -> rewards [B] at the last real token."""
  @jax.jit
  def score(params, tokens, mask):
    batch = batches_lib.RewardBatch(
        tokens=tokens[:, None], positions=jnp.broadcast_to(
            jnp.arange(tokens.shape[-1], dtype=jnp.int32), tokens.shape)[:, None],
        mask=mask[:, None], rank=jnp.zeros(tokens.shape[:1] + (1,), jnp.int32))
    return reward_loss.sequence_rewards(params, batch, model=model)[:, 0]
  return score


def score_sequences(score_fn, params, seqs: list[list[int]], *, seq_len: int, pad_id: int,
                    batch: int = 256) -> np.ndarray:
  """Rewards of token sequences (each already cut to `seq_len`), in fixed-shape batches."""
  out = []
  for start in range(0, len(seqs), batch):
    chunk = seqs[start:start + batch]
    tokens = np.full((batch, seq_len), pad_id, np.int32)
    mask = np.zeros((batch, seq_len), np.float32)
    for i, s in enumerate(chunk):
      tokens[i, :len(s)] = s
      mask[i, :len(s)] = 1
    out.append(np.asarray(jax.device_get(score_fn(params, tokens, mask)))[:len(chunk)])
  return np.concatenate(out) if out else np.zeros(0, np.float32)


def score_records(score_fn, params, recs: list[dict], tok, *, seq_len: int) -> np.ndarray:
  """Rewards of every reply of every preference record, flat in record order."""
  seqs = []
  for r in recs:
    prompt = chat.render_prompt(r["prompt"], tok)
    seqs += [sequence_ids(prompt, c, seq_len=seq_len) for c in completions(r, tok)]
  return score_sequences(score_fn, params, seqs, seq_len=seq_len, pad_id=tok.pad_id)


class RewardScorer:
  """`scorer(prompt_ids, completion_ids) -> scores [B]`; see the module docstring."""

  def __init__(self, model, params, tokenizer, *, seq_len: int, bias: float = 0.0):
    self.model, self.tokenizer, self.seq_len, self.bias = model, tokenizer, seq_len, bias
    self.params = add_head_bias(params, bias)
    self._score = make_score_fn(model)

  def score_tokens(self, tokens, mask):
    return self._score(self.params, tokens, mask)

  def score_records(self, recs: list[dict]) -> np.ndarray:
    """Normalised rewards of every reply of preference records, flat in record order."""
    return score_records(self._score, self.params, recs, self.tokenizer, seq_len=self.seq_len)

  def __call__(self, prompt_ids, completion_ids) -> np.ndarray:
    pad = self.tokenizer.pad_id
    seqs = [sequence_ids(_strip_right(p, pad), _strip_right(c, pad), seq_len=self.seq_len)
            for p, c in zip(prompt_ids, completion_ids)]
    # Round the width up to a multiple of 16, so a few shapes serve every call.
    width = min(self.seq_len, -(-max(len(s) for s in seqs) // 16) * 16)
    return score_sequences(self._score, self.params, seqs, seq_len=width, pad_id=pad,
                           batch=max(8, 1 << (len(seqs) - 1).bit_length()))


def _strip_right(ids, pad: int) -> list[int]:
  """Drops right padding only: a pad id a sampler drew inside a reply stays, as it was scored."""
  ids = [int(t) for t in ids]
  while ids and ids[-1] == pad:
    ids.pop()
  return ids


def add_head_bias(params, bias: float):
  if not bias:
    return params
  params = dict(params)
  head = dict(params["scalar_head"])
  head["bias"] = head["bias"] + jnp.asarray(bias, head["bias"].dtype)
  params["scalar_head"] = head
  return params


def load_reward_model(workdir: str, step: int | None = None) -> RewardScorer:
  """The trained reward model of `workdir`, normalised; see the module docstring."""
  model, params, tok, cfg = ckpt_lib.load_for_inference(workdir, step)
  bias = 0.0
  path = os.path.join(workdir, NORMALIZATION_FILE)
  if os.path.exists(path):
    with open(path) as f:
      bias = float(json.load(f)["bias"])
  return RewardScorer(model, params, tok, seq_len=int(cfg.model.max_len), bias=bias)


def make_scorer(spec: str, reward_workdir: str = ""):
  """The rollouts' scorer for `rl.reward`: 'rm' (the reward model of `reward_workdir`) or any
  `rollout.make_reward_fn` spec."""
  from gptjax.rl import rollout as rollout_lib
  if spec == "rm":
    if not reward_workdir:
      from gptjax.config import ConfigError
      raise ConfigError("rl.reward='rm' needs rl.reward_workdir (the reward stage)")
    # The scorer reads the score at the last real token and adds the normalisation bias, exactly
    # as the RM was evaluated.
    return rollout_lib.TokenScorer(load_reward_model(reward_workdir))
  return rollout_lib.TextScorer(rollout_lib.make_reward_fn(spec))
