"""Two real JAX processes on localhost (gloo CPU collectives) train like one process with the
whole batch. Each child holds one CPU device; the (2, 1, 1) mesh spans both processes, and each
process feeds only its own half of every batch through `sharding.to_global`. The RL stage runs
through the real CLI on two processes, rollouts sharded across them, and matches one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from conftest import HELPERS, REPO, child_env
import tiny_training
from gptjax import sharding as shd

STEPS = 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(argv_of, *, cwd=None) -> list[str]:
  """Runs `argv_of(port, process_id)` as two processes of one run on localhost (one CPU device
  each); returns their stdouts in process order, failing with the output of one that did not
  exit 0."""
  port = _free_port()
  procs = [subprocess.Popen(argv_of(port, i), env=child_env(1), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=300)
      assert p.returncode == 0, f"process exited with {p.returncode}\n{out[-3000:]}\n{err[-3000:]}"
      outs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return outs


def _result(stdout: str) -> str:
  """The JSON a helper printed on its last `RESULT ` line."""
  return [l for l in stdout.splitlines() if l.startswith("RESULT ")][-1][7:]


def test_two_processes_match_one_process_with_the_whole_batch():
  script = os.path.join(HELPERS, "multihost_step.py")
  outs = [json.loads(_result(o)) for o in _two_processes(
      lambda port, i: [sys.executable, script, str(port), str(i), str(STEPS)])]
  assert sorted(o["process"] for o in outs) == [0, 1]
  # The loss is a global value: both processes see the same one.
  np.testing.assert_array_equal(outs[0]["losses"], outs[1]["losses"])
  single, _ = tiny_training.train(shd.make_mesh((1, 1, 1)), tiny_training.global_batches(STEPS))
  np.testing.assert_allclose(outs[0]["losses"], single, rtol=1e-5)
  assert single[-1] < single[0]


def test_host_loops_are_split_over_processes_not_repeated():
  """`split_over_processes` gives every process all items while each computes only its own
  (round-robin; with fewer items than processes, the idle one computes a filler it discards), and
  `process_local` hands out a replicated array's local copy, while a split one is not local."""
  script = os.path.join(HELPERS, "multihost_split.py")
  outs = {r["process"]: r for r in (json.loads(_result(o)) for o in _two_processes(
      lambda port, i: [sys.executable, script, str(port), str(i)]))}
  assert outs[0]["5"]["computed"] == [0, 2, 4] and outs[1]["5"]["computed"] == [1, 3]
  assert outs[0]["1"]["computed"] == [0] and outs[1]["1"]["computed"] == [0]    # the filler
  for r in outs.values():
    assert r["5"]["blocks"] == [0, 1, 2, 3, 4] and r["5"]["whole"]
    assert r["1"]["blocks"] == [0] and r["1"]["whole"]
    assert r["process_local"] == {"replicated_is_local": True, "values": [0, 1, 2, 3, 4, 5],
                                  "split_is_not_local": True}


def test_held_out_evaluation_split_over_two_processes_equals_one(micro_pipeline):
  """`evaluate_policy` with whole networks on each process splits its prompt batches over the
  processes (with a reference, with best-of-N reranked by the RM, and with a partial last batch);
  both processes get exactly the one-process result."""
  script = os.path.join(HELPERS, "multihost_eval.py")
  one = subprocess.run([sys.executable, script, micro_pipeline], env=child_env(1),
                       capture_output=True, text=True, timeout=300)
  assert one.returncode == 0, one.stderr[-3000:]
  outs = [_result(o) for o in _two_processes(
      lambda port, i: [sys.executable, script, micro_pipeline, str(port), str(i)])]
  expected = _result(one.stdout)
  assert outs[0] == outs[1] == expected
  results = json.loads(expected)
  assert [r["n"] for r in results] == [24, 24, 24] and results[0]["kl_to_ref"] is not None


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def _cli_on_two_processes_and_one(args, tmp_path):
  """Runs `python <args> --workdir DIR` on two gloo processes and on one; returns both workdirs."""
  multi, single = str(tmp_path / "two"), str(tmp_path / "one")
  _two_processes(lambda port, i: [
      sys.executable, *args, "--workdir", multi,
      f"--config.distributed.coordinator_address=127.0.0.1:{port}",
      "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
      "--config.distributed.cpu_collectives=gloo"], cwd=REPO)
  one = subprocess.run([sys.executable, *args, "--workdir", single], env=child_env(1), cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert one.returncode == 0, one.stderr[-3000:]
  return multi, single


def test_rl_stage_on_two_processes_matches_one_process(tmp_path):
  """`gptjax train` with PPO (value head, GAE, the held-out evaluation) on two gloo processes:
  each process generates its half of every iteration's rollouts, and the samples, losses and
  evaluation equal a one-process run's."""
  ppo = ["-m", "gptjax.main", "train", "--config",
         os.path.join(REPO, "experiments", "rl.py") + ":ppo_micro", "--no_progress",
         "--config.rl.eval_prompts=8"]
  multi, single = _cli_on_two_processes_and_one(ppo, tmp_path)

  with open(os.path.join(multi, "rl_iterations.jsonl")) as f:
    two_its = [json.loads(line) for line in f]
  with open(os.path.join(single, "rl_iterations.jsonl")) as f:
    one_its = [json.loads(line) for line in f]
  assert len(two_its) == len(one_its) == 4          # process 0 alone logs each iteration once
  assert [r["sample"] for r in two_its] == [r["sample"] for r in one_its]
  np.testing.assert_allclose([r["rl/score"] for r in two_its], [r["rl/score"] for r in one_its],
                             rtol=1e-6)
  two, one_ = _metrics(multi), _metrics(single)
  assert [s for s, _ in two] == [s for s, _ in one_] and len(two) == 16
  np.testing.assert_allclose([l for _, l in two], [l for _, l in one_], rtol=1e-4, atol=1e-6)
  with open(os.path.join(multi, "eval.json")) as f:
    ev2 = json.load(f)
  with open(os.path.join(single, "eval.json")) as f:
    ev1 = json.load(f)
  assert [s["reply"] for s in ev2["samples"]] == [s["reply"] for s in ev1["samples"]]
  np.testing.assert_allclose(ev2["kl_to_ref"], ev1["kl_to_ref"], rtol=1e-4)


def test_reward_stage_on_two_processes_matches_one_process(micro_pipeline, tmp_path):
  """The reward stage through the CLI on two gloo processes, from the micro pipeline's SFT run:
  the preference data (each process samples a share of the batches, gathered; process 0 writes
  the files behind a barrier), the training losses and the held-out report (accuracy, Spearman,
  normalisation, best-of-N) equal a one-process run's."""
  rm = ["-m", "gptjax.main", "train", "--config",
        os.path.join(REPO, "experiments", "reward.py") + ":micro", "--no_progress",
        f"--config.train.init_from={os.path.join(micro_pipeline, 'sft')}",
        "--config.train.steps=6", "--config.train.log_every=1", "--config.train.eval_every=0",
        "--config.optim.decay_steps=6"]
  multi, single = _cli_on_two_processes_and_one(rm, tmp_path)

  for split in ("train", "validation"):
    with open(os.path.join(multi, "preferences", f"{split}.jsonl")) as f:
      two_prefs = f.read()
    with open(os.path.join(single, "preferences", f"{split}.jsonl")) as f:
      assert two_prefs == f.read() and two_prefs
  two, one_ = _metrics(multi), _metrics(single)
  assert [s for s, _ in two] == [s for s, _ in one_] == list(range(1, 7))
  np.testing.assert_allclose([l for _, l in two], [l for _, l in one_], rtol=1e-4, atol=1e-6)
  with open(os.path.join(multi, "eval.json")) as f:
    ev2 = json.load(f)
  with open(os.path.join(single, "eval.json")) as f:
    ev1 = json.load(f)
  for key in ("accuracy_noisy", "accuracy_noiseless", "spearman_gold", "eval/rm_loss"):
    np.testing.assert_allclose(ev2[key], ev1[key], rtol=1e-4, err_msg=key)
  np.testing.assert_allclose(ev2["normalization"]["bias"], ev1["normalization"]["bias"],
                             rtol=1e-4, atol=1e-6)
  assert ev2["best_of_n"]["mean_gold"] == ev1["best_of_n"]["mean_gold"]
