"""Child of test_multihost.py: one of two real processes (gloo collectives over localhost) that
share a host-driven loop with `sharding.split_over_processes` and check `process_local`.

    multihost_split.py PORT PROCESS_ID

Prints one JSON line: the items this process computed and every item it got back.
"""

import json
import sys

import ml_collections
import numpy as np

from gptjax import sharding as shd


def main():
  port, pid = int(sys.argv[1]), int(sys.argv[2])
  shd.init_distributed(ml_collections.ConfigDict(dict(
      coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
      cpu_collectives="gloo", auto=False)))
  import jax
  computed = []

  def item(b):
    computed.append(b)
    return {"block": np.full((2, 3), b, np.int32), "tag": np.array([10.0 * b], np.float32)}

  got = {}
  for n in (5, 1):      # more items than processes, and fewer
    computed.clear()
    out = shd.split_over_processes(item, n)
    got[n] = {"computed": list(computed),
              "blocks": [int(o["block"][0, 0]) for o in out],
              "whole": all((o["block"] == i).all() and o["tag"][0] == 10.0 * i
                           for i, o in enumerate(out))}

  mesh = shd.make_mesh((2, 1, 1))
  rep = jax.device_put(np.arange(6.0), shd.replicated(mesh))
  split = jax.device_put(np.arange(6.0), shd.batch_sharding(mesh))
  local = shd.process_local({"w": rep})["w"]
  got["process_local"] = {"replicated_is_local": bool(local.is_fully_addressable),
                          "values": np.asarray(local).tolist(),
                          "split_is_not_local": not shd.is_process_local({"w": split})}
  print("RESULT " + json.dumps({"process": jax.process_index(), **{str(k): v for k, v in
                                                                  got.items()}}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
