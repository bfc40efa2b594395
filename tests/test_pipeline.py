"""The pipeline command end to end on the micro preset: completion, skipping, exact resume."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import PIPELINE_STAGES, REPO, child_env, pipeline_cmd


def _last(path, key):
  rows = [json.loads(l) for l in open(path) if l.strip()]
  vals = [r[key] for r in rows if key in r]
  assert vals, f"{key} never logged in {path}"
  return vals[-1]


def test_pipeline_produces_every_stage_and_the_report_card(micro_pipeline):
  run = micro_pipeline
  for stage in ("tokenizer", "pretrain", "sft", "rm_data", "reward", "ppo", "grpo", "dpo",
                "ppo_beta0", "compare"):
    assert os.path.exists(os.path.join(run, stage, "done.json")), stage
  cmp = json.load(open(os.path.join(run, "compare.json")))
  assert set(cmp["policies"]) == {"base", "sft", "best-of-16", "ppo", "grpo", "dpo", "ppo_beta0"}
  assert cmp["policies"]["sft"]["kl_to_sft"] == 0.0
  # Every row carries the RM's (proxy) score beside the gold; best-of-16 picks the RM's favourite
  # of 16 SFT replies, so its proxy beats a single SFT reply's on the same prompts.
  for name, p in cmp["policies"].items():
    assert isinstance(p["proxy_mean"], float), name
  assert cmp["policies"]["best-of-16"]["proxy_mean"] > cmp["policies"]["sft"]["proxy_mean"]
  assert cmp["samples"] and set(cmp["samples"][0]["replies"]) >= {"base", "sft", "ppo"}
  # The over-optimisation stage is PPO without the KL penalty, and logs the gold beside the proxy.
  beta0 = [json.loads(l) for l in open(os.path.join(run, "ppo_beta0", "rl_iterations.jsonl"))]
  assert beta0 and all(r["rl/beta"] == 0.0 and "rl/gold_score" in r for r in beta0)
  report = open(os.path.join(run, "report.md")).read()
  for png in ("losses.png", "gold_by_stage.png", "best_of_n.png", "gold_vs_kl.png", "rl.png",
              "overopt.png"):
    assert f"({png})" in report, png
    with open(os.path.join(run, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
  # Each stage starts from the previous one: SFT's first training loss is already below the
  # loss of a fresh model (log V), because it starts from the pretrained weights.
  vocab = json.load(open(os.path.join(run, "tokenizer", "done.json")))["vocab_size"]
  first_sft = [json.loads(l) for l in open(os.path.join(run, "sft", "metrics.jsonl"))][0]
  assert first_sft["train/loss"] < __import__("math").log(vocab)


def test_report_plots_the_held_out_curves_beside_the_training_ones(micro_pipeline):
  from gptjax import report
  # The metric names the plots ask for must be the ones the stages log, or a curve silently
  # disappears from the report card.
  assert report.plotted_series(micro_pipeline, ["reward"], report.rm_keys) == [
      ("reward", "rm/accuracy"), ("reward", "eval/rm_accuracy")]
  # (The micro DPO stage runs no evaluation, so only these three have held-out losses.)
  losses = report.plotted_series(micro_pipeline, ["pretrain", "sft", "reward"], report.loss_keys)
  for stage in ("pretrain", "sft", "reward"):
    assert {(stage, "train/loss"), (stage, next(k for k in report.loss_keys(stage)
                                                if k.startswith("eval/")))} <= set(losses), stage


def test_second_run_skips_completed_stages(micro_pipeline):
  t = time.time()
  proc = subprocess.run(pipeline_cmd(micro_pipeline), env=child_env(), cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for stage in ("tokenizer", "pretrain", "sft", "rm_data", "reward", "ppo", "grpo", "dpo",
                "compare"):
    assert f"[pipeline] {stage}: complete, skipping" in proc.stdout, stage
  assert "running" not in proc.stdout.replace("[pipeline] report: running", "")
  assert time.time() - t < 120


def test_a_finished_stage_under_another_config_is_an_error_and_is_kept(micro_pipeline):
  ppo_files = sorted(os.listdir(os.path.join(micro_pipeline, "ppo", "checkpoints")))
  cmd = pipeline_cmd(micro_pipeline) + ["--config.ppo.rl.kl_coef=0.5"]
  proc = subprocess.run(cmd, env=child_env(), cwd=REPO, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode != 0
  assert "[pipeline] reward: complete, skipping" in proc.stdout   # stages before it are fine
  err = proc.stderr
  assert "pipeline stage 'ppo'" in err and "different config" in err, err[-2000:]
  assert "ppo.rl.kl_coef: 0.01 then, 0.5 now" in err, err[-2000:]
  assert "Traceback" not in err
  assert sorted(os.listdir(os.path.join(micro_pipeline, "ppo", "checkpoints"))) == ppo_files
  assert os.path.exists(os.path.join(micro_pipeline, "ppo", "done.json"))


def test_comparison_runs_again_when_the_compared_stages_change(micro_pipeline, tmp_path):
  run = str(tmp_path / "run")
  shutil.copytree(micro_pipeline, run)
  stages = [s for s in PIPELINE_STAGES if s != "dpo"]
  proc = subprocess.run(pipeline_cmd(run, stages), env=child_env(), cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[pipeline] compare: config changed" in proc.stdout
  assert "[pipeline] ppo: complete, skipping" in proc.stdout
  cmp = json.load(open(os.path.join(run, "compare.json")))
  assert "dpo" not in cmp["policies"] and {"ppo", "grpo"} <= set(cmp["policies"])


def test_killed_pipeline_resumes_to_the_same_result(micro_pipeline, tmp_path):
  """SIGTERM in the middle of pretraining, then the same command again: the final metrics equal
  those of the uninterrupted run exactly (every stage is deterministic and resumes exactly)."""
  run = str(tmp_path / "run")
  stages = ("tokenizer", "pretrain", "sft", "rm_data", "reward", "ppo")
  proc = subprocess.Popen(pipeline_cmd(run, stages), env=child_env(), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # Signal at the first logged step (5 of 20), not at the first checkpoint (10): the micro steps
  # take milliseconds, and from step 10 a loaded host sometimes finished the stage first.
  metrics = os.path.join(run, "pretrain", "metrics.jsonl")
  deadline = time.time() + 600
  while proc.poll() is None and time.time() < deadline and not (
      os.path.exists(metrics) and os.path.getsize(metrics) > 0):
    time.sleep(0.02)
  assert proc.poll() is None, "the pipeline ended before it could be interrupted"
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  assert "pretrain: interrupted" in out
  assert not os.path.exists(os.path.join(run, "pretrain", "done.json"))

  proc = subprocess.run(pipeline_cmd(run, stages), env=child_env(), cwd=REPO,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from step" in proc.stdout + proc.stderr
  ref = micro_pipeline
  for stage, key in (("pretrain", "eval/loss"), ("sft", "train/loss"), ("reward", "train/loss"),
                     ("ppo", "train/loss"), ("ppo", "rl/score")):
    a = _last(os.path.join(run, stage, "metrics.jsonl"), key)
    b = _last(os.path.join(ref, stage, "metrics.jsonl"), key)
    assert a == b, (stage, key, a, b)


def test_a_signal_after_a_stages_last_step_stops_the_pipeline_before_the_next(tmp_path,
                                                                               monkeypatch,
                                                                               capsys):
  """SIGTERM while pretraining writes its final checkpoint: the stage completes and is kept (the
  checkpoint is whole), and the pipeline exits 143 instead of starting SFT. It used to swallow
  such a signal and run on."""
  from conftest import PIPELINE_MICRO
  from gptjax import checkpoint as ckpt_lib
  from gptjax import config as config_lib
  from gptjax import pipeline
  cfg = config_lib.load(PIPELINE_MICRO, ["pipeline.stages=('tokenizer','pretrain','sft')"])
  last = cfg.pretrain.train.steps
  save = ckpt_lib.Checkpointer.save

  def save_then_signal(self, step, *a, **kw):
    save(self, step, *a, **kw)
    if step == last:
      os.kill(os.getpid(), signal.SIGTERM)      # lands after the loop's last check

  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save_then_signal)
  run = str(tmp_path / "run")
  assert pipeline.run(cfg, run, progress=False) == 143
  out = capsys.readouterr().out
  assert "[pipeline] stopping after pretrain, as a signal asked" in out
  assert "pretrain: interrupted" not in out
  assert os.path.exists(os.path.join(run, "pretrain", "done.json"))
  assert os.path.exists(os.path.join(run, "pretrain", "checkpoints", str(last),
                                     "commit_success.txt"))
  assert not os.path.exists(os.path.join(run, "sft"))
  # The default SIGTERM action is back once the stage is over.
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_the_console_sums_up_each_stage_and_ends_with_the_report(micro_pipeline):
  """One summary line per stage with its figures, an ETA from the measured speeds, the report
  card's path last, and none of the library messages that mislead (a download that does not
  happen; a reuse announced seconds after the data were made)."""
  import re
  console = open(os.path.join(os.path.dirname(micro_pipeline), "console.txt")).read()
  stderr = open(os.path.join(os.path.dirname(micro_pipeline), "console_stderr.txt")).read()
  for stage in ("tokenizer", "pretrain", "sft", "rm_data", "reward", "ppo", "grpo", "dpo",
                "ppo_beta0", "compare"):
    line = re.search(rf"^\[pipeline\] {stage}: done in [0-9.]+s; (.*)$", console, re.M)
    assert line and re.search(r"\d", line.group(1)), (stage, console[-3000:])
  ppo = re.search(r"^\[pipeline\] ppo: done in .*$", console, re.M).group(0)
  assert "RM score" in ppo and "KL" in ppo and "held-out gold" in ppo, ppo
  etas = re.findall(r"^\[pipeline\] ETA: about (\d+) min", console, re.M)
  assert etas, console[-3000:]
  assert console.rstrip().splitlines()[-1] == (
      f"[pipeline] finished; the report card is {os.path.join(micro_pipeline, 'report.md')}")
  for text in (console, stderr):
    assert "Downloading and preparing" not in text and "already generated" not in text


def test_best_of_n_has_one_definition_stated_in_the_report(micro_pipeline):
  """The table's best-of-16 row is the N = 16 point of the curve (same replies, same picks),
  whose KL is the analytic log N − (N−1)/N; the report states the definition and draws gold
  against KL."""
  import math
  from gptjax import report
  cmp = json.load(open(os.path.join(micro_pipeline, "compare.json")))
  curve, row = cmp["best_of_n"], cmp["policies"]["best-of-16"]
  i = curve["n"].index(16)
  assert (curve["gold_mean"][i], curve["gold_se"][i], curve["proxy_mean"][i]) == (
      row["gold_mean"], row["gold_se"], row["proxy_mean"])
  for n, kl in zip(curve["n"], curve["kl"]):
    assert kl == math.log(n) - (n - 1) / n
  # The RM's pick gains proxy with N (paired replies: a prefix's max can only grow).
  assert curve["proxy_mean"] == sorted(curve["proxy_mean"])
  assert all(o >= g for o, g in zip(curve["oracle_gold"], curve["gold_mean"]))
  text = open(os.path.join(micro_pipeline, "report.md")).read()
  assert report.BEST_OF_N_DEFINITION in text and "(gold_vs_kl.png)" in text


def test_seeds_rerun_the_post_training_stages_and_the_report_gives_intervals(micro_pipeline,
                                                                               tmp_path):
  """--seeds 0,1 with DPO per seed: the main run (seed 0) is reused whole, seed 1 trains its
  own DPO from the same SFT model, and the report's figures are means with 95% intervals."""
  run = str(tmp_path / "run")
  shutil.copytree(micro_pipeline, run, symlinks=True)
  cmd = pipeline_cmd(run) + ["--seeds", "0,1", "--config.pipeline.seeded_stages=('dpo','compare')"]
  proc = subprocess.run(cmd, env=child_env(), cwd=REPO, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "compare"):
    assert f"[pipeline] {stage}: complete, skipping" in proc.stdout, stage
  seed1 = os.path.join(run, "seeds", "1")
  assert os.path.islink(os.path.join(seed1, "sft")) and not os.path.islink(
      os.path.join(seed1, "dpo"))
  assert os.path.realpath(os.path.join(seed1, "sft")) == os.path.realpath(os.path.join(run, "sft"))
  assert json.load(open(os.path.join(seed1, "dpo", "config.json")))["seed"] == 1
  first = lambda d: json.loads(open(os.path.join(d, "dpo", "metrics.jsonl")).readline())
  # Another data order: the first batch's replies differ. (Not the first loss: DPO starts at
  # exactly log 2 for any batch, the policy being its own reference.)
  assert first(seed1)["dpo/chosen_logp"] != first(run)["dpo/chosen_logp"]
  agg = json.load(open(os.path.join(run, "results_seeds.json")))
  assert agg["seeds"] == [0, 1]
  golds = [json.load(open(os.path.join(d, "compare.json")))["policies"]["dpo"]["gold_mean"]
           for d in (run, seed1)]
  mean, half, n = agg["policies"]["dpo"]["gold_mean"]
  assert n == 2 and abs(mean - sum(golds) / 2) < 1e-12
  # Two values: t(0.975, 1) = 12.706 times the standard error |a − b| / 2.
  assert abs(half - 12.7062 * abs(golds[0] - golds[1]) / 2) < 1e-3 * max(half, 1e-9)
  assert agg["policies"]["ppo"]["gold_mean"][2] == 1       # PPO ran for seed 0 only
  report = open(os.path.join(run, "report.md")).read()
  assert "seeds 0, 1" in report and "95% Student-t interval" in report
  assert proc.stdout.rstrip().splitlines()[-1].endswith(os.path.join(run, "report.md"))


@pytest.mark.parametrize("flag, message", [
    (["--seeds", "0,x"], "--seeds: expected comma-separated integers"),
    (["--seeds", "0,0"], "pipeline.seeds: (0, 0) repeats a seed"),
    (["--seeds", "0,1", "--config.pipeline.seeded_stages=('report',)"],
     "pipeline.seeded_stages: 'report' cannot run per seed")])
def test_bad_seed_settings_are_one_line_errors(flag, message, tmp_path):
  proc = subprocess.run(pipeline_cmd(str(tmp_path / "run")) + flag, env=child_env(), cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_a_run_keeps_its_compiled_programs_where_seeds_do_not_link_them(tmp_path):
  """With no compilation cache configured (the suite configures one), a pipeline keeps its
  compiled programs in <run>/xla_cache; the cache is not a stage, so a seed's directory does not
  link it (the seed's stages read it through the process's setting)."""
  from conftest import reasoning_cmd
  env = child_env()
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  run = str(tmp_path / "run")
  proc = subprocess.run(
      reasoning_cmd(run, "--config.pipeline.stages=('task_data','tokenizer','pretrain')",
                    "--config.pipeline.seeded_stages=('pretrain',)", "--seeds", "0,1"),
      env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert os.listdir(os.path.join(run, "xla_cache"))
  seed_dir = os.path.join(run, "seeds", "1")
  assert os.path.exists(os.path.join(seed_dir, "pretrain", "done.json"))
  assert os.path.islink(os.path.join(seed_dir, "task_data"))
  assert not os.path.lexists(os.path.join(seed_dir, "xla_cache"))
