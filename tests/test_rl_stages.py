"""End to end on micro configs (random-init model, char tokenizer, a verifiable reward): PPO and
GRPO raise the reward with bounded KL, the RL loop resumes bitwise (params, KL controller,
rollout PRNG), DPO trains on preference_jsonl, and eval.json is written."""

import json
import os

import jax
import numpy as np
import pytest

from gptjax import checkpoint as ckpt_lib
from gptjax import config as config_lib
from gptjax.stages import run_stage

CONFIG = os.path.join(os.path.dirname(__file__), "..", "experiments", "rl.py")


def _run(preset, workdir, *overrides, progress=False):
  cfg = config_lib.load(f"{CONFIG}:{preset}", list(overrides))
  return run_stage(cfg, str(workdir), progress=progress)


def _iterations(workdir):
  with open(os.path.join(workdir, "rl_iterations.jsonl")) as f:
    return [json.loads(l) for l in f]


PPO = ("rl.iterations=6", "optim.lr=0.01", "rl.kl_adaptive=True", "rl.kl_target=1.0",
       "rl.kl_horizon=100.0")


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("ppo")
  res = _run("ppo_micro", wd, *PPO)
  return wd, res


def test_ppo_raises_reward_with_bounded_kl(ppo_run):
  wd, res = ppo_run
  its = _iterations(wd)
  assert len(its) == 6 and its[0]["rl/kl"] == 0.0
  first = its[0]["rl/score"]
  last = np.mean([i["rl/score"] for i in its[-2:]])
  assert last > first + 0.05, [i["rl/score"] for i in its]
  assert max(i["rl/kl"] for i in its) < 20.0
  for k in ("rl/approx_kl", "rl/clipfrac", "rl/ratio_mean", "rl/entropy", "rl/value_loss"):
    assert k in res.last_metrics
  for k in ("rl/score", "rl/kl", "rl/rlhf_reward", "rl/eos_fraction", "rl/explained_variance"):
    assert k in its[0]
  assert its[-1]["rl/beta"] != its[0]["rl/beta"]        # the adaptive controller moved


def test_ppo_resume_is_exact(ppo_run, tmp_path):
  wd, res = ppo_run
  _run("ppo_micro", tmp_path, *PPO[:-3], "rl.kl_adaptive=True", "rl.kl_target=1.0",
       "rl.kl_horizon=100.0", "rl.iterations=3")
  resumed = _run("ppo_micro", tmp_path, *PPO)
  assert resumed.step == res.step
  a, b = jax.device_get((res.state.params, resumed.state.params))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  # The iteration log of the resumed run continues the same rollouts (PRNG, β) bitwise.
  want, got = _iterations(wd), _iterations(tmp_path)
  assert [i["rl/score"] for i in got] == [i["rl/score"] for i in want]
  assert [i["rl/beta"] for i in got] == [i["rl/beta"] for i in want]
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  assert ck.all_steps()[-1] == res.step
  ck.close()


def test_grpo_raises_reward_and_writes_eval(tmp_path, capsys):
  res = _run("grpo_micro", tmp_path, "rl.iterations=6", "optim.lr=0.01", "rl.eval_prompts=8",
             "rl.eval_split=train", "rl.log_gold=True", progress=True)
  # The bar shows what RL is for: the RM's score, the gold and the KL, beside the loss.
  bar = capsys.readouterr().err
  for shown in ("loss=", "score=", "gold=", "kl="):
    assert shown in bar, bar[-2000:]
  its = _iterations(tmp_path)
  first = its[0]["rl/score"]
  last = np.mean([i["rl/score"] for i in its[-2:]])
  assert last > first + 0.05, [i["rl/score"] for i in its]
  assert max(i["rl/kl"] for i in its) < 20.0
  assert "rl/filtered_fraction" in its[0] and "rl/kl_loss" in res.last_metrics
  with open(tmp_path / "eval.json") as f:
    ev = json.load(f)
  for k in ("gold_mean", "gold_se", "kl_to_ref", "distinct_2", "samples"):
    assert k in ev
  assert ev["n"] == 8 and ev["kl_to_ref"] > 0
  # The held-out replies are scored by the run's own reward too (the proxy beside the gold).
  replies = [json.loads(l)["reply"] for l in open(tmp_path / "eval_samples.jsonl")]
  assert len(replies) == 8
  expect = [r.count("e") / max(len(r), 1) for r in replies]
  assert ev["proxy_mean"] == pytest.approx(float(np.mean(expect)), abs=1e-6)


@pytest.mark.parametrize("loss", ["dpo"])
def test_dpo_learns_preferences(tmp_path, loss):
  rng = np.random.default_rng(0)
  path = tmp_path / "pairs.jsonl"
  with open(path, "w") as f:
    for i in range(32):
      p = ["hi", "say", "well", "now"][i % 4]
      good, bad = ("i love it", "i hate it") if rng.random() < 0.5 else ("love you", "go away")
      f.write(json.dumps({"prompt": p, "chosen": good, "rejected": bad}) + "\n")
  res = _run(f"{loss}_micro", tmp_path / "run", f"data.train_source=preference_jsonl:{path}",
             f"data.eval_source=preference_jsonl:{path}", "train.steps=12", "optim.lr=0.003",
             "train.eval_every=12", "rl.eval_prompts=4", "rl.prompt_len=8",
             "rl.max_new_tokens=8", "train.log_every=12")
  m = res.last_metrics
  assert m["eval/accuracy"] > 0.9 and m["eval/margin"] > 0
  assert os.path.exists(tmp_path / "run" / "eval.json")
