"""Reward model: the score position, the pairwise loss by hand, a learnable synthetic preference,
the labeler, and pretrain -> SFT -> preference data -> RM end to end with exact resume."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import batches, config as config_lib, labeler, reward_model, rm_data, trainer
from gptjax.data import dialogue, in_memory
from gptjax.losses import reward as reward_loss
from gptjax.model import GPT, ModelConfig, ModelOutput
from gptjax.stages import common, pretrain, reward, sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name, *overrides):
  return config_lib.load(os.path.join(ROOT, "experiments", name), overrides)


# --------------------------------------------------------------------------------------------
# The score is read at the last real token.
# --------------------------------------------------------------------------------------------

def test_score_at_last_real_token_whatever_the_padding():
  model = GPT(ModelConfig(vocab_size=20, num_layers=1, num_heads=2, d_model=16, max_len=16,
                          scalar_head=True))
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  seq = np.array([5, 9, 3, 7, 11], np.int32)
  direct = model.apply({"params": params}, seq[None]).values[0, -1]
  score = reward_model.make_score_fn(model)

  def padded(width, left, pad_id):
    tokens = np.full((1, width), pad_id, np.int32)
    mask = np.zeros((1, width), np.float32)
    start = width - len(seq) if left else 0
    tokens[0, start:start + len(seq)] = seq
    mask[0, start:start + len(seq)] = 1
    return tokens, mask

  for width, left, pad_id in [(5, False, 0), (9, False, 0), (12, False, 7), (9, True, 0)]:
    tokens, mask = padded(width, left, pad_id)
    # Left padding needs positions that start at the first real token.
    pos = np.clip(np.arange(width) - (width - len(seq) if left else 0), 0, None)[None]
    batch = batches.RewardBatch(tokens=tokens[:, None], positions=pos[:, None].astype(np.int32),
                                mask=mask[:, None], rank=np.zeros((1, 1), np.int32))
    got = reward_loss.sequence_rewards(params, batch, model=model)[0, 0]
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-6)
    if not left:
      np.testing.assert_allclose(score(params, tokens, mask)[0], direct, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The pairwise loss by hand.
# --------------------------------------------------------------------------------------------

class LastTokenValue:
  """A stand-in model whose value at each position is token id × 0.5."""

  def apply(self, variables, tokens, **kw):
    return ModelOutput(logits=None, hidden=None, values=tokens.astype(jnp.float32) * 0.5)


def reward_batch(last_ids, rank, t=4):
  """One sequence per reply; the last real token (at a varying index) decides its reward."""
  b, k = np.shape(last_ids)
  tokens = np.zeros((b, k, t), np.int32)
  mask = np.zeros((b, k, t), np.float32)
  for i in range(b):
    for j in range(k):
      n = 1 + (i + j) % t
      tokens[i, j, :n] = 1
      tokens[i, j, n - 1] = last_ids[i][j]
      mask[i, j, :n] = 1
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), tokens.shape)
  return batches.RewardBatch(tokens=jnp.asarray(tokens), positions=jnp.asarray(pos),
                             mask=jnp.asarray(mask), rank=jnp.asarray(rank, jnp.int32))


def nls(x):
  return -math.log(1 / (1 + math.exp(-x)))


def test_pairwise_loss_k2_by_hand():
  batch = reward_batch([[6, 2], [1, 5]], [[1, 0], [1, 0]])
  loss, m = reward_loss.reward_loss(None, batch, model=LastTokenValue(), margin=0.5,
                                    center_coef=0.1)
  r = [(3.0, 1.0), (0.5, 2.5)]
  bt = (nls(3.0 - 1.0 - 0.5) + nls(0.5 - 2.5 - 0.5)) / 2
  centre = ((3.0 + 1.0) ** 2 + (0.5 + 2.5) ** 2) / 2
  np.testing.assert_allclose(m["rm/bt_loss"], bt, rtol=1e-5)
  np.testing.assert_allclose(loss, bt + 0.1 * centre, rtol=1e-5)
  np.testing.assert_allclose(m["rm/accuracy"], 0.5)
  np.testing.assert_allclose(m["rm/margin"], ((3 - 1) + (0.5 - 2.5)) / 2, rtol=1e-6)
  assert float(m["rm/pairs"]) == 2
  del r


def test_pairwise_loss_k3_by_hand_with_tie_and_missing_reply():
  # Row 0: ranks (2, 0, 1) -> pairs 0>1, 0>2, 2>1. Row 1: ranks (1, 1, 0) -> 0>2, 1>2 (tie
  # between 0 and 1 gives no pair). Row 2: only two replies (the third is empty) -> one pair.
  batch = reward_batch([[4, 2, 6], [2, 4, 6], [8, 2, 0]], [[2, 0, 1], [1, 1, 0], [0, 1, 5]])
  mask = np.asarray(batch.mask).copy()
  mask[2, 2] = 0
  batch = batch.replace(mask=jnp.asarray(mask))
  loss, m = reward_loss.reward_loss(None, batch, model=LastTokenValue())
  r = np.array([[2, 1, 3], [1, 2, 3], [4, 1, 0]], float)
  diffs = [[r[0, 0] - r[0, 1], r[0, 0] - r[0, 2], r[0, 2] - r[0, 1]],
           [r[1, 0] - r[1, 2], r[1, 1] - r[1, 2]],
           [r[2, 1] - r[2, 0]]]
  expected = np.mean([sum(nls(d) for d in row) / 3 for row in diffs])    # 1/C(3,2) per prompt
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  flat = [d for row in diffs for d in row]
  np.testing.assert_allclose(m["rm/accuracy"], np.mean([d > 0 for d in flat]), rtol=1e-6)
  np.testing.assert_allclose(m["rm/margin"], np.mean(flat), rtol=1e-5)
  assert float(m["rm/pairs"]) == 6


def test_davidson_ties_by_hand():
  """tie_nu > 0: the same batch as above, now with the tie (row 1, replies 0 and 1) trained under
  Davidson's model, and a margin on the strict pairs."""
  batch = reward_batch([[4, 2, 6], [2, 4, 6], [8, 2, 0]], [[2, 0, 1], [1, 1, 0], [0, 1, 5]])
  mask = np.asarray(batch.mask).copy()
  mask[2, 2] = 0
  batch = batch.replace(mask=jnp.asarray(mask))
  nu, margin = 0.7, 0.25
  loss, m = reward_loss.reward_loss(None, batch, model=LastTokenValue(), tie_nu=nu, margin=margin)
  r = np.array([[2, 1, 3], [1, 2, 3], [4, 1, 0]], float)
  z = lambda d: math.exp(d / 2) + math.exp(-d / 2) + nu
  win = lambda d: -math.log(math.exp((d - margin) / 2) / z(d - margin))
  tie = lambda d: -math.log(nu / z(d))
  rows = [win(r[0, 0] - r[0, 1]) + win(r[0, 0] - r[0, 2]) + win(r[0, 2] - r[0, 1]),
          win(r[1, 0] - r[1, 2]) + win(r[1, 1] - r[1, 2]) + tie(r[1, 0] - r[1, 1]),
          win(r[2, 1] - r[2, 0])]
  np.testing.assert_allclose(loss, np.mean([x / 3 for x in rows]), rtol=1e-5)
  np.testing.assert_allclose(m["rm/tie_loss"], tie(r[1, 0] - r[1, 1]) / 3 / 3, rtol=1e-5)
  assert float(m["rm/tie_pairs"]) == 1 and float(m["rm/pairs"]) == 6
  # As ν → 0 the strict pairs' terms become plain Bradley–Terry's (which ignores the tie).
  bt, _ = reward_loss.reward_loss(None, batch, model=LastTokenValue(), margin=margin)
  small, ms = reward_loss.reward_loss(None, batch, model=LastTokenValue(), margin=margin,
                                      tie_nu=1e-6)
  np.testing.assert_allclose(float(small) - float(ms["rm/tie_loss"]), bt, rtol=1e-5)
  with pytest.raises(ValueError, match="tie_nu"):
    reward_loss.reward_loss(None, batch, model=LastTokenValue(), tie_nu=-1.0)


def test_empty_rows_do_not_count():
  batch = reward_batch([[6, 2], [1, 5]], [[1, 0], [1, 0]])
  mask = np.asarray(batch.mask).copy()
  mask[1] = 0
  loss, _ = reward_loss.reward_loss(None, batch.replace(mask=jnp.asarray(mask)),
                                    model=LastTokenValue())
  np.testing.assert_allclose(loss, nls(3.0 - 1.0), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# The labeler.
# --------------------------------------------------------------------------------------------

def test_labeler():
  s = labeler.gold_score(["I love this, wonderful!", "This is terrible and sad.", "table"])
  assert s[0] > 0.5 and s[1] < -0.5 and s[2] == 0
  a, b = np.full(20000, 0.3), np.zeros(20000)
  p = labeler.noisy_preference(a, b, temperature=0.2, rng=0).mean()
  assert abs(p - 1 / (1 + math.exp(-1.5))) < 0.01
  assert labeler.noisy_preference(a, b, temperature=0, rng=0).all()
  # K = 2 Plackett–Luce ranking is the same Bradley–Terry preference.
  ranks = labeler.noisy_ranking(np.stack([a, b], -1), temperature=0.2, rng=1)
  assert abs((ranks[:, 0] > ranks[:, 1]).mean() - p) < 0.015
  clean = labeler.noisy_ranking(np.array([[0.1, 0.5, -0.2]]), temperature=0, rng=0)
  assert clean.tolist() == [[1, 2, 0]]
  tied = labeler.noisy_ranking(np.array([[0.0, 0.5, 0.0, -0.3]]), temperature=0, rng=0, ties=True)
  assert tied.tolist() == [[1, 3, 1, 0]]


# --------------------------------------------------------------------------------------------
# A rule the model can learn: replies containing a marker token win.
# --------------------------------------------------------------------------------------------

MARKER = 3


def synthetic_pairs(n, seed, t=12):
  rng = np.random.default_rng(seed)
  tokens = np.zeros((n, 2, t), np.int32)
  mask = np.zeros((n, 2, t), np.float32)
  for i in range(n):
    prompt = rng.integers(4, 16, size=4)
    for j in range(2):
      reply = rng.integers(4, 16, size=rng.integers(3, t - 4 + 1))
      if j == 0:
        reply[rng.integers(len(reply))] = MARKER
      seq = np.concatenate([prompt, reply])
      tokens[i, j, :len(seq)] = seq
      mask[i, j, :len(seq)] = 1
  rank = np.tile(np.array([[1, 0]], np.int32), (n, 1))
  flip = rng.random(n) < 0.5                     # the winner is not always in slot 0
  tokens[flip], mask[flip] = tokens[flip][:, ::-1], mask[flip][:, ::-1]
  rank[flip] = rank[flip][:, ::-1]
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), tokens.shape).copy()
  return {"tokens": tokens, "positions": pos, "mask": mask, "rank": rank}


def test_reward_model_learns_a_marker_rule(tmp_path):
  cfg = load("reward.py:micro", "train.steps=150", "train.batch_size=32", "train.log_every=50",
             "train.eval_every=0", "train.checkpoint_every=0", "optim.lr=3e-3",
             "optim.warmup_steps=10", "data.seq_len=12")
  with cfg.unlocked():
    cfg.model.update(vocab_size=16, num_layers=1, d_model=32, max_len=12, scalar_head=True)
  env = common.make_env(cfg, scalar_head=True)
  source = in_memory.InMemorySource(synthetic_pairs(512, 0), wrap=lambda a: batches.RewardBatch(**a),
                                    mesh=env.mesh, global_batch=32, seed=0)
  result = trainer.train(cfg, trainer.Job(
      model=env.model, loss_fn=common.bind_loss(cfg), source=source, mesh=env.mesh,
      init_params=common.init_params_fn(env.model)), workdir=str(tmp_path), progress=False)
  held_out = synthetic_pairs(256, 1)
  eval_step = trainer.make_eval_step(common.bind_loss(cfg), env.model)
  m = eval_step(result.state.params, batches.RewardBatch(**held_out), None)
  assert float(m["rm/accuracy"]) >= 0.95, float(m["rm/accuracy"])


# --------------------------------------------------------------------------------------------
# Pretrain -> SFT -> preference data -> reward model, end to end.
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
  pre = str(tmp_path_factory.mktemp("pre"))
  pretrain.run(load("shakespeare_char.py:micro", "train.steps=4", "train.eval_every=0",
                    "train.checkpoint_every=0"), pre, progress=False)
  wd = str(tmp_path_factory.mktemp("sft"))
  sft.run(load("sft.py:micro", f"train.init_from={pre}", "train.steps=4", "train.eval_every=0",
               "sft.eval_prompts=0"), wd, progress=False)
  return wd


def rm_cfg(sft_wd, prefs, *overrides):
  return load("reward.py:micro", f"train.init_from={sft_wd}", f"rm_data.out_dir={prefs}",
              "optim.decay_steps=8", "train.eval_every=0", *overrides)


def test_preference_data_is_generated_once(sft_workdir, tmp_path):
  cfg = rm_cfg(sft_workdir, str(tmp_path))
  paths = rm_data.generate(cfg, sft_workdir=sft_workdir, out_dir=str(tmp_path))
  recs = [json.loads(l) for l in open(paths["train"])]
  assert len(recs) == cfg.rm_data.train_prompts
  r = recs[0]
  assert len(r["responses"]) == len(r["ranks"]) == len(r["scores"]) == 3
  for x in recs:       # equal gold scores tie (labeler_ties), different ones never do
    for i in range(3):
      for j in range(3):
        assert (x["ranks"][i] == x["ranks"][j]) == (x["scores"][i] == x["scores"][j])
  assert r["chosen"] == r["responses"][int(np.argmax(r["ranks"]))]
  stamp = os.path.getmtime(paths["train"])
  assert rm_data.generate(cfg, sft_workdir=sft_workdir, out_dir=str(tmp_path)) == paths
  assert os.path.getmtime(paths["train"]) == stamp           # skipped: already complete
  # Training and held-out prompts come from different plays, so they do not overlap.
  val = [json.loads(l) for l in open(paths["validation"])]
  assert not {json.dumps(x["prompt"]) for x in recs} & {json.dumps(x["prompt"]) for x in val}


def test_asking_for_more_prompts_than_a_split_has_is_an_error_not_a_shorter_set():
  cfg = load("reward.py:micro")
  n = len(dialogue.dialogue_examples("validation", val_fraction=cfg.data.val_fraction))
  assert len(rm_data.prompt_set(cfg, "validation", n, field="x")) == n
  with pytest.raises(config_lib.ConfigError,
                     match=rf"rm_data\.validation_prompts: {n + 1} asked for, but "
                           rf"shakespeare:dialogue has only {n} validation prompts"):
    rm_data.prompt_set(cfg, "validation", n + 1, field="rm_data.validation_prompts")


def test_reward_end_to_end_exact_resume_and_scorer(sft_workdir, tmp_path):
  prefs = str(tmp_path / "prefs")
  straight = reward.run(rm_cfg(sft_workdir, prefs, "train.steps=8", "reward.best_of_n_prompts=0"),
                        str(tmp_path / "a"), progress=False)
  half = str(tmp_path / "b")
  reward.run(rm_cfg(sft_workdir, prefs, "train.steps=4", "reward.best_of_n_prompts=0"), half,
             progress=False)
  resumed = reward.run(rm_cfg(sft_workdir, prefs, "train.steps=8"), half, progress=False)
  for a, b in zip(jax.tree.leaves(jax.device_get(straight.state.params)),
                  jax.tree.leaves(jax.device_get(resumed.state.params))):
    np.testing.assert_array_equal(a, b)
  report = json.load(open(os.path.join(half, "eval.json")))
  assert report["step"] == 8
  for key in ("accuracy_noisy", "spearman_gold", "normalization"):
    assert key in report
  assert set(report["best_of_n"]["mean_gold"]) == {"1", "2", "4", "8", "16"}

  # The scorer for RL: normalised so the training replies score mean 0, any padding.
  scorer = reward_model.load_reward_model(half)
  recs = reward.read_preferences(os.path.join(prefs, "train.jsonl"))
  tok = scorer.tokenizer
  from gptjax.data import chat
  prompts, comps = [], []
  for r in recs:
    p = chat.render_prompt(r["prompt"], tok)
    for c in reward_model.completions(r, tok):
      prompts.append(p)
      comps.append(c)
  scores = scorer(prompts, comps)
  assert scores.shape == (len(comps),)
  assert abs(float(np.mean(scores))) < 1e-4
  width = max(len(p) for p in prompts)
  padded = np.full((len(prompts), width), tok.pad_id, np.int32)
  for i, p in enumerate(prompts):
    padded[i, :len(p)] = p
  np.testing.assert_allclose(scorer(padded, comps), scores, rtol=1e-5, atol=1e-5)
