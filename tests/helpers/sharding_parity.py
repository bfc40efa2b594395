"""Child of test_sharding.py: trains the tiny model five steps on several meshes over 8 simulated
CPU devices (XLA_FLAGS set by the parent) and prints one JSON line of losses and parameters.

One child loops over every mesh, since starting JAX once is much cheaper than once per mesh.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gptjax import sharding as shd  # noqa: E402
import tiny_training  # noqa: E402

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]


def main():
  assert jax.device_count() == 8, jax.devices()
  data = tiny_training.global_batches(5)
  out = {}
  for shape in MESHES:
    n = int(np.prod(shape))
    mesh = shd.make_mesh(shape, devices=jax.devices()[:n])
    losses, params = tiny_training.train(mesh, data)
    out[str(shape)] = {"losses": losses, "param_norm": sum(
        float(np.sum(np.square(x, dtype=np.float64))) for x in jax.tree.leaves(params))}
    if shape == (2, 2, 2):
      # The sharding really happened: a kernel is split over fsdp and tensor, not replicated.
      _, state, _ = tiny_training.init_on_mesh(mesh, tiny_training.default_optimizer())
      spec = state.params["blocks"]["mlp"]["fc"]["kernel"].sharding.spec
      out["fc_kernel_spec"] = [None if s is None else str(s) for s in spec]
  # Gradient accumulation on a sharded mesh: the micro-batch split has to keep rows on devices.
  mesh = shd.make_mesh((2, 2, 2))
  out["accum2_losses"], _ = tiny_training.train(mesh, data[:2], grad_accum=2)
  print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
