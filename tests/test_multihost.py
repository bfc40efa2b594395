"""Two real JAX processes on localhost (gloo CPU collectives) train like one process with the
whole batch. Each child holds one CPU device; the (2, 1, 1) mesh spans both processes, and each
process feeds only its own half of every batch through `sharding.to_global`."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from conftest import HELPERS, child_env
import tiny_training
from gptjax import sharding as shd

STEPS = 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process_with_the_whole_batch():
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(HELPERS, "multihost_step.py"), str(port), str(i), str(STEPS)],
      env=child_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=300)
      assert p.returncode == 0, f"process exited with {p.returncode}\n{out[-3000:]}\n{err[-3000:]}"
      outs.append(json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][7:]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert sorted(o["process"] for o in outs) == [0, 1]
  # The loss is a global value: both processes see the same one.
  np.testing.assert_array_equal(outs[0]["losses"], outs[1]["losses"])
  single, _ = tiny_training.train(shd.make_mesh((1, 1, 1)), tiny_training.global_batches(STEPS))
  np.testing.assert_allclose(outs[0]["losses"], single, rtol=1e-5)
  assert single[-1] < single[0]
