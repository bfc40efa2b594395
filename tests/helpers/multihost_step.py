"""Child of test_multihost.py: one of two real processes (gloo collectives over localhost) that
train the tiny model on a (2, 1, 1) mesh, each feeding only its half of every batch.

    multihost_step.py PORT PROCESS_ID NUM_STEPS

Prints one JSON line with this process's view of the losses (they are global values, so both
processes must print the same ones).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ml_collections  # noqa: E402

from gptjax import sharding as shd  # noqa: E402


def main():
  port, pid, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
  # The library's own entry point, configured as a config file would configure it.
  shd.init_distributed(ml_collections.ConfigDict(dict(
      coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
      cpu_collectives="gloo", auto=False)))
  import jax
  import tiny_training
  assert jax.process_count() == 2 and jax.device_count() == 2 and jax.local_device_count() == 1
  mesh = shd.make_mesh((2, 1, 1))
  half = tiny_training.BATCH // 2
  rows = slice(pid * half, (pid + 1) * half)
  local = [{k: v[rows] for k, v in b.items()} for b in tiny_training.global_batches(steps)]
  losses, _ = tiny_training.train(mesh, local)
  print("RESULT " + json.dumps({"process": jax.process_index(), "losses": losses}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
