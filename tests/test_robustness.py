"""What gptjax does when things go wrong: non-finite steps, bad input and config, broken
checkpoints and full disks. Each failure ends in one line that names the problem, never in a
traceback or a silent restart; see the README's "When things go wrong"."""

import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import MICRO, REPO, child_env, run_micro
from gptjax import batches
from gptjax import checkpoint as ckpt_lib
from gptjax import sharding as shd
from gptjax import step as step_lib
from gptjax import trainer
from gptjax.losses import lm
import tiny_training


def gptjax_cli(*args, timeout=300, **env):
  return subprocess.run([sys.executable, "-m", "gptjax.main", *args], env=child_env(**env),
                        cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _steps(workdir):
  return sorted(int(os.path.basename(d))
                for d in glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*")))


def _all_finite(tree):
  return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------ non-finite --

def test_a_nonfinite_step_changes_nothing_but_the_step_counter():
  mesh = shd.make_mesh((1, 1, 1))
  optimizer = optax.adam(0.1)
  model, state, state_sh = tiny_training.init_on_mesh(mesh, optimizer)
  batch = batches.LMBatch.from_dict(shd.to_global(tiny_training.global_batches(1)[0], mesh))

  def loss_fn(params, batch, *, frozen, rng, model):
    loss, metrics = lm.lm(params, batch, frozen=None, rng=rng, model=model)
    return loss * frozen["scale"], metrics

  step = step_lib.make_train_step(loss_fn, optimizer, model=model, state_sharding=state_sh,
                                  mesh=mesh, donate=False)
  before = jax.device_get(state)
  for bad in (jnp.nan, jnp.inf):
    state, m = step(state, batch, {"scale": jnp.asarray(bad, jnp.float32)})
    assert int(m["train/nonfinite"]) == 1
    after = jax.device_get(state)
    for a, b in zip(jax.tree.leaves((after.params, after.opt_state)),
                    jax.tree.leaves((before.params, before.opt_state))):
      np.testing.assert_array_equal(a, b)
  assert int(state.step) == 2
  state, m = step(state, batch, {"scale": jnp.ones((), jnp.float32)})
  assert int(m["train/nonfinite"]) == 0
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                                                    jax.tree.leaves(before.params))]
  assert any(moved)


def test_a_nonfinite_loss_halts_the_run_and_keeps_the_good_checkpoints(tmp_path, cached_corpus):
  # lr=1e6 makes the loss NaN within a few steps (it trained on to the end and saved NaN
  # checkpoints before). The run stops at the first such step and names it.
  workdir = str(tmp_path / "w")
  with pytest.raises(trainer.NonFiniteError) as info:
    run_micro(workdir, "optim.lr=1e6", "train.steps=40", "train.checkpoint_every=2",
              "train.log_every=0", "train.eval_every=0")
  msg = str(info.value)
  at = int(msg.split(" at step ")[1].split()[0])
  assert "train/loss=nan" in msg and "nan_policy" in msg, msg
  assert 1 < at < 40
  steps = _steps(workdir)
  assert steps and max(steps) < at, (steps, at)
  assert f"checkpoints kept: steps {', '.join(map(str, steps[-3:]))}" in msg
  for s in steps:
    _, params, _, _ = ckpt_lib.load_for_inference(workdir, s)
    assert _all_finite(params), s


def test_nan_policy_skip_counts_skipped_steps_and_finishes_finite(tmp_path, cached_corpus):
  workdir = str(tmp_path / "w")
  res = run_micro(workdir, "optim.lr=1e6", "train.steps=12", "train.checkpoint_every=6",
                  "train.log_every=3", "train.eval_every=0", "train.nan_policy=skip")
  assert res.step == 12 and _steps(workdir) == [6, 12]
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  counts = [r["train/skipped_steps"] for r in rows if "train/skipped_steps" in r]
  assert counts == sorted(counts) and counts[-1] > 0, counts
  # The count is the number of steps whose flag was up (every step is logged here).
  _, params, _, _ = ckpt_lib.load_for_inference(workdir, 12)
  assert _all_finite(params)


# ----------------------------------------------------------------------------- checkpoints --

def _damage(checkpoint_dir):
  for path in glob.glob(os.path.join(checkpoint_dir, "state", "**"), recursive=True):
    if os.path.isfile(path):
      with open(path, "wb") as f:
        f.write(b"not a checkpoint")


def test_no_readable_checkpoint_stops_instead_of_restarting(micro_run, tmp_path, cached_corpus):
  from gptjax.errors import CheckpointError
  src, _ = micro_run
  workdir = str(tmp_path / "copy")
  shutil.copytree(src, workdir)
  for s in (10, 20):
    _damage(os.path.join(workdir, "checkpoints", str(s)))
  with pytest.raises(CheckpointError) as info:
    run_micro(workdir, "train.steps=20", "train.eval_every=10", "train.checkpoint_every=10")
  msg = str(info.value)
  aside = sorted(glob.glob(os.path.join(workdir, "checkpoints", "unreadable-*")))
  assert len(aside) == 2 and all(a in msg for a in aside), msg
  assert "move" in msg and "step 0" in msg
  # Nothing was trained or saved from scratch, and nothing was deleted.
  assert _steps(workdir) == []
  assert all(os.path.exists(os.path.join(a, "commit_success.txt")) for a in aside)


def test_partial_checkpoints_are_removed_and_keep_is_honoured(tmp_path, cached_corpus, capsys):
  workdir = str(tmp_path / "w")
  run_micro(workdir, "train.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=4",
            "train.eval_every=0", "train.log_every=0")
  assert _steps(workdir) == [2, 4, 6, 8]
  # What a kill during a save leaves: a half-written step directory.
  partial = os.path.join(workdir, "checkpoints", "10.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(partial, "state"))
  capsys.readouterr()
  # Four checkpoints with keep=3 (a kill between a save and orbax's pruning leaves one too many):
  # the resumed run trims to three even though it saves nothing new.
  res = run_micro(workdir, "train.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=3",
                  "train.eval_every=0", "train.log_every=0")
  assert res.step == 8
  assert "removed the partial checkpoint" in capsys.readouterr().out
  assert not os.path.exists(partial)
  assert _steps(workdir) == [4, 6, 8]


def _can_mount_tmpfs(path):
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0:
    return False
  return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", path],
                        capture_output=True).returncode == 0


def test_a_full_disk_is_one_message_and_the_run_resumes_after(tmp_path):
  """A real full disk: a 1.2 MB tmpfs holds two micro checkpoints, not three."""
  disk = str(tmp_path / "disk")
  if not _can_mount_tmpfs(disk):
    pytest.skip("needs root to mount a small tmpfs (a real full disk)")
  try:
    workdir = os.path.join(disk, "w")
    args = ("train", "--config", MICRO, "--workdir", workdir, "--no_progress",
            "--config.train.steps=12", "--config.train.checkpoint_every=2",
            "--config.train.eval_every=0", "--config.train.log_every=0")
    proc = gptjax_cli(*args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [l for l in proc.stderr.splitlines() if l.startswith("gptjax:")]
    assert len(errors) == 1 and "checkpoint error" in errors[0], proc.stderr[-3000:]
    assert workdir in errors[0] and "no space left" in errors[0] and "MiB free" in errors[0]
    assert not glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*"))
    kept = _steps(workdir)
    assert kept and kept[-1] < 12
    subprocess.run(["mount", "-o", "remount,size=8m", disk], check=True)
    proc = gptjax_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step {kept[-1]}" in proc.stdout
    assert _steps(workdir)[-1] == 12
    subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
    proc = gptjax_cli(*args[:-4], "--config.train.steps=14")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Read-only file system" in proc.stderr
  finally:
    subprocess.run(["umount", disk], capture_output=True)


def test_fallback_from_a_damaged_checkpoint_prints_no_stray_traceback(micro_run, tmp_path):
  # Without its manifest, orbax's reads fail while TensorStore still completes others; their
  # callbacks used to print "RuntimeError: Event loop is closed" tracebacks.
  src, _ = micro_run
  workdir = str(tmp_path / "copy")
  shutil.copytree(src, workdir)
  for path in glob.glob(os.path.join(workdir, "checkpoints", "20", "state", "**", "manifest*"),
                        recursive=True):
    os.remove(path)
  proc = gptjax_cli("train", "--config", MICRO, "--workdir", workdir, "--no_progress",
                    "--config.train.steps=20", "--config.train.eval_every=0",
                    "--config.train.checkpoint_every=10", "--config.train.log_every=5")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from step 10" in proc.stdout
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, \
      proc.stderr[-3000:]


# ------------------------------------------------------------------------------ config gaps --

@pytest.mark.parametrize("override, field", [
    ("optim.lr=-0.001", "optim.lr"), ("model.dropout_rate=1.0", "model.dropout_rate"),
    ("model.dropout_rate=-0.1", "model.dropout_rate"), ("data.val_fraction=1.0", "data.val_fraction"),
    ("data.val_fraction=-0.5", "data.val_fraction"), ("data.loader=shuffled", "data.loader"),
    ("train.grad_accum=3", "train.grad_accum"), ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.checkpoint_every=-1", "train.checkpoint_every"), ("optim.b2=1.0", "optim.b2"),
    ("train.nan_policy=ignore", "train.nan_policy"),
])
def test_config_values_training_cannot_use_are_named(override, field):
  from gptjax import config as config_lib
  cfg = config_lib.load(MICRO, [override, "model.vocab_size=65"])
  with pytest.raises(config_lib.ConfigError, match=rf"^{re.escape(field)}: "):
    config_lib.validate(cfg, num_devices=1)


def test_every_command_ends_in_one_line_and_its_exit_status(tmp_path):
  """One subprocess per command family; each prints one `gptjax: ...` line and no traceback."""
  cases = [
      (2, ": config error: ", ("train", "--config", MICRO.replace(":micro", ":huge"),
                             "--workdir", str(tmp_path / "a"))),
      (2, "sample: --temperature", ("sample", "--workdir", str(tmp_path), "--temperature", "-1")),
      (2, "chat: --workdir", ("chat", "--workdir", str(tmp_path / "nothing"))),
      (2, ": config error: gptjax tokenizer train: vocab_size=100 is too small",
       ("tokenizer", "train", "--source", "shakespeare", "--vocab_size", "100", "--out",
        str(tmp_path / "tok"))),
      (2, ": config error: pipeline.stages", ("pipeline", "--config", MICRO.replace(
          "shakespeare_char.py:micro", "shakespeare_assistant.py:micro"), "--workdir",
          str(tmp_path / "p"), "--config.pipeline.stages=('nope',)")),
      (3, ": non-finite value: train/loss=nan", ("train", "--config", MICRO, "--workdir",
                                                str(tmp_path / "nan"), "--no_progress",
                                                "--config.optim.lr=1e6",
                                                "--config.train.steps=40")),
  ]
  for code, text, args in cases:
    proc = gptjax_cli(*args)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("gptjax")]
    assert proc.returncode == code, (args, proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith(f"gptjax{text}") or \
        lines[0].startswith(f"gptjax {text}"), (args, proc.stderr[-2000:])
  # For debugging, the traceback on request.
  proc = gptjax_cli(*cases[0][2], GPTJAX_TRACEBACK="1")
  assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


# ---------------------------------------------------------------------------- determinism --

def test_rm_data_asks_for_the_same_data_from_either_stage_and_any_directory(tmp_path):
  """The cause of the reward stage's resume difference: the pipeline's rm_data stage sampled
  prompts cut to the reward preset's context (max_len 32), while the reward stage, after adopting
  SFT's architecture (max_len 64), asked for prompts cut to another length; and the request named
  the SFT directory's absolute path. So in a moved or copied run the reward stage regenerated the
  data, with other prompts, and trained another model. Both stages now ask for one request, and
  no request names a location."""
  import copy
  from conftest import PIPELINE_MICRO
  from gptjax import config as config_lib
  from gptjax import rm_data
  from gptjax.data import dialogue, tokenizers
  from gptjax.stages import common
  full = config_lib.load(PIPELINE_MICRO)
  sft_dirs = [str(tmp_path / "a" / "sft"), str(tmp_path / "b" / "sft")]
  sft_cfg = copy.deepcopy(full.sft)
  with sft_cfg.unlocked():
    sft_cfg.model.max_len = full.pretrain.model.max_len     # what SFT adopts from pretraining
  for d in sft_dirs:
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "w") as f:
      f.write(config_lib.to_json(sft_cfg))
    tokenizers.CharTokenizer.from_text("abcdefgh ?!\n").save(d)
  # The rm_data stage's config, as the pipeline builds it (no architecture adopted) ...
  as_rm_data = copy.deepcopy(full.reward)
  # ... and the reward stage's, after adopting SFT's architecture.
  as_reward = copy.deepcopy(full.reward)
  with as_reward.unlocked():
    as_reward.train.init_from = sft_dirs[1]
  common.start_from_previous(as_reward, str(tmp_path / "reward"), scalar_head=True)
  assert dialogue.prompt_char_budget(as_rm_data) != dialogue.prompt_char_budget(as_reward)

  requests, prompts = [], []
  for cfg, d in ((as_rm_data, sft_dirs[0]), (as_reward, sft_dirs[1])):
    eff, seen = rm_data._as_sampled(cfg, d)
    requests.append(rm_data._request(eff, d, seen))
    prompts.append(rm_data.prompt_set(eff, "train", 8, field="n", seed_offset=1))
  assert requests[0] == requests[1]
  assert prompts[0] == prompts[1]
  assert not any(str(tmp_path) in json.dumps(r) for r in requests)


def test_sigterm_during_start_up_says_so(tmp_path):
  import signal
  import time
  proc = subprocess.Popen([sys.executable, "-m", "gptjax.main", "train", "--config", MICRO,
                           "--workdir", str(tmp_path / "w"), "--no_progress"],
                          env=child_env(), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  time.sleep(1.0)                 # importing jax and building the data take longer than this
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  assert "Traceback" not in err
  assert "gptjax: stopped: SIGTERM arrived before training started" in err, err[-2000:]


KILLED_STAGES = ("rm_data", "reward", "ppo", "grpo", "dpo", "compare")
REDONE = ("rm_data", "reward", "ppo", "grpo", "dpo", "ppo_beta0", "compare", "report")


def _params(workdir):
  _, params, _, _ = ckpt_lib.load_for_inference(workdir)
  return jax.tree.leaves(jax.device_get(params))


def test_a_pipeline_killed_inside_every_stage_in_a_moved_directory_ends_bitwise_equal(
    micro_pipeline, tmp_path):
  """The session's straight micro pipeline, copied elsewhere with every stage from rm_data on
  removed, then run again with a SIGKILL at a random moment inside each of rm_data, reward, ppo,
  grpo, dpo and compare, and once more to the end: every final checkpoint is bitwise the straight
  run's, and so are the evaluations and the comparison. One copy and one kill per stage, in
  order, so the extra cost is about one post-SFT pipeline."""
  import random
  import signal
  import time
  from conftest import pipeline_cmd
  seed = int(os.environ.get("GPTJAX_KILL_SEED", time.time_ns() % 10_000))
  print(f"kill seed {seed} (GPTJAX_KILL_SEED={seed} repeats these kill times)")
  rng = random.Random(seed)
  run = str(tmp_path / "elsewhere" / "run")
  shutil.copytree(micro_pipeline, run, symlinks=True)
  for name in REDONE:
    shutil.rmtree(os.path.join(run, name), ignore_errors=True)
  for name in os.listdir(run):
    if os.path.isfile(os.path.join(run, name)) and name.startswith(("compare", "report")):
      os.remove(os.path.join(run, name))
  killed = []
  for stage in KILLED_STAGES:
    proc = subprocess.Popen(pipeline_cmd(run), env=child_env(), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
      for line in proc.stdout:
        if line.startswith(f"[pipeline] {stage}: running"):
          break
      time.sleep(rng.uniform(0.5, 6.0))
      inside = not os.path.exists(os.path.join(run, stage, "done.json"))
      proc.send_signal(signal.SIGKILL)
      proc.communicate(timeout=60)
      killed.append((stage, inside))
    finally:
      if proc.poll() is None:
        proc.kill()
  assert any(inside for _, inside in killed), killed
  proc = subprocess.run(pipeline_cmd(run), env=child_env(), cwd=REPO, capture_output=True,
                        text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for stage in ("reward", "ppo", "grpo", "dpo", "ppo_beta0"):
    for a, b in zip(_params(os.path.join(run, stage)),
                    _params(os.path.join(micro_pipeline, stage))):
      np.testing.assert_array_equal(a, b, err_msg=f"{stage} (kills: {killed}, seed {seed})")
  for rel in ("rm_data/train.jsonl", "rm_data/validation.jsonl", "reward/eval.json",
              "ppo/eval.json", "grpo/eval.json", "dpo/eval.json", "compare.json"):
    mine, straight = os.path.join(run, rel), os.path.join(micro_pipeline, rel)
    if not os.path.exists(straight):
      continue
    a, b = _comparable(mine), _comparable(straight)
    assert a == b, (rel, killed, seed)


def _comparable(path):
  """A result file's content, with what legitimately names the run's own directory made
  relative to it."""
  text = open(path).read()
  run = os.path.dirname(path)
  while run and not os.path.exists(os.path.join(run, "pipeline_config.json")):
    run = os.path.dirname(run)
  return text.replace(run, "<run>")
