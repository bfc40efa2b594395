"""The pretraining stage end to end on the micro preset: it learns, and its workdir holds
everything a run needs to be read back or resumed."""

import glob
import json
import math
import os
import struct

from gptjax import metrics as metrics_lib


def test_micro_run_learns(micro_run):
  workdir, result = micro_run
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
  assert len(evals) == 2                              # at steps 10 and 20
  assert evals[-1] < evals[0] - 0.05, evals
  train = [r["train/loss"] for r in rows if "train/loss" in r]
  vocab = json.load(open(os.path.join(workdir, "config.json")))["model"]["vocab_size"]
  assert train[-1] < train[0] < math.log(vocab) + 0.5, train
  assert result.step == 20 and not result.interrupted
  last = [r for r in rows if "perf/mfu" in r][-1]
  assert last["perf/tokens_per_sec"] > 0 and 0 < last["perf/mfu"] < 1


def test_workdir_holds_config_tokenizer_metrics_events_and_checkpoints(micro_run):
  workdir, _ = micro_run
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  assert cfg["train"]["steps"] == 20 and cfg["model"]["vocab_size"] > 0
  assert os.path.exists(os.path.join(workdir, "tokenizer.json"))
  ckpts = sorted(int(os.path.basename(d)) for d in glob.glob(
      os.path.join(workdir, "checkpoints", "[0-9]*")))
  assert ckpts == [10, 20]
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows if "train/loss" in r] == [5, 10, 15, 20]
  # The TensorBoard event file reads back with the same scalars as metrics.jsonl.
  events = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert events
  scalars = {}
  for path in events:
    for step, tag, value in _read_scalars(path):
      scalars[(step, tag)] = value
  for r in rows:
    for k, v in r.items():
      if k != "step":
        assert abs(scalars[(r["step"], k)] - v) <= 1e-6 * max(1.0, abs(v)), (r["step"], k)


def _read_scalars(path):
  """(step, tag, value) of every scalar in a TensorBoard event file.

  Neither tensorflow nor tensorboard is a dependency, so this reads the TFRecord framing by hand
  (length, its CRC, the record, its CRC) and parses each record with tensorboardX's Event proto.
  """
  from tensorboardX.proto import event_pb2
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    record = data[pos + 12:pos + 12 + length]
    pos += 12 + length + 4
    event = event_pb2.Event()
    event.ParseFromString(record)
    for v in event.summary.value:
      if v.HasField("simple_value"):
        yield event.step, v.tag, v.simple_value
      elif v.HasField("tensor") and v.tensor.float_val:
        yield event.step, v.tag, v.tensor.float_val[0]
  assert pos == len(data), "truncated event file"
