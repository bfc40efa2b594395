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


def qlora_placement(params):
  """QLoRA's quantized base on the (2, 2, 2) mesh: for each format, each targeted kernel's codes
  and scales as (global shape, one device's shard shape), and the largest difference between the
  dequantized sharded base and the same base quantized whole on the host."""
  from gptjax import lora, qlora
  whole = jax.device_get(params)
  res = {}
  for kind in qlora.BASE_QUANTS:
    spec = lora.LoraSpec(rank=4, targets=("q", "k", "v", "o", "mlp"), base_quant=kind)
    placed, host = qlora.quantize_base(params, spec), qlora.quantize_base(whole, spec)
    # The memory plan's shapes-only tree: the same placement, so it counts each device's part.
    abstract = qlora.quantize_base(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params), spec)
    shards, diff, same = {}, 0.0, True
    for (path, q), (_, h), (_, a) in zip(qlora._paths(placed), qlora._paths(host),
                                         qlora._paths(abstract)):
      if not qlora.is_quantized(q):
        continue
      q = q.array
      same &= all(x.sharding.is_equivalent_to(y.sharding, y.ndim) for x, y in
                  ((a.array.codes, q.codes), (a.array.scales, q.scales)))
      shards["/".join(path)] = {
          name: [list(x.shape), list(x.addressable_shards[0].data.shape)]
          for name, x in (("codes", q.codes), ("scales", q.scales))}
      diff = max(diff, float(np.max(np.abs(np.asarray(q.dequantize())
                                            - np.asarray(h.array.dequantize())))))
    res[kind] = {"shards": shards, "max_diff": diff, "abstract_same": bool(same)}
  return res


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
      out["qlora"] = qlora_placement(state.params)
  # Gradient accumulation on a sharded mesh: the micro-batch split has to keep rows on devices.
  mesh = shd.make_mesh((2, 2, 2))
  out["accum2_losses"], _ = tiny_training.train(mesh, data[:2], grad_accum=2)
  print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
