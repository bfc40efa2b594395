"""Meshes, logical-axis rules and multi-host input.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism with
parameters and optimizer state sharded too) and `tensor` (model parallelism inside a layer).
Parameters carry logical axis names (model.py); the config's rules table maps each to a mesh axis.

We build the mesh with `AxisType.Auto` on purpose. JAX 0.10 defaults `make_mesh` to Explicit axes
(sharding in types), which asks every op whose output sharding is ambiguous to name one. Our model
is written once for 1 device up to a pod, so we let the partitioner propagate shardings from the
annotated parameters and batches instead.
"""

from __future__ import annotations

import functools
import logging
import os

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis. Kernels shard their `embed` side over fsdp and their head/mlp/vocab
# side over tensor (Megatron-style); the scanned `layers` axis and small vectors stay replicated.
DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("pos", None),
    ("norm", None),
)

log = logging.getLogger(__name__)


def mesh_shape(shape, num_devices: int) -> tuple[int, ...]:
  """Resolves a (data, fsdp, tensor) shape with at most one -1 against the device count."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(AXES):
    raise ValueError(f"mesh.shape: expected {len(AXES)} sizes for axes {AXES}, got {shape}")
  if sum(s == -1 for s in shape) > 1:
    raise ValueError(f"mesh.shape: at most one axis may be -1, got {shape}")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh.shape: sizes must be positive or -1, got {shape}")
  known = int(np.prod([s for s in shape if s != -1]))
  if num_devices % known:
    raise ValueError(f"mesh.shape: {shape} does not divide the {num_devices} available devices")
  shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f"mesh.shape: {shape} uses {int(np.prod(shape))} devices, "
                     f"but {num_devices} are available")
  return shape


def make_mesh(shape=(-1, 1, 1), devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(shape, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def rules_from_config(rules) -> tuple:
  out = []
  for i, item in enumerate(rules):
    if len(item) != 2:
      raise ValueError(f"mesh.rules[{i}]: expected (logical_axis, mesh_axis), got {item!r}")
    logical, target = item
    targets = target if isinstance(target, (tuple, list)) else (target,)
    for t in targets:
      if t is not None and t not in AXES:
        raise ValueError(f"mesh.rules[{i}]: mesh axis {t!r} for {logical!r} is not one of {AXES}")
    out.append((logical, tuple(target) if isinstance(target, list) else target))
  return tuple(out)


def fit_spec(spec: P, shape, mesh: Mesh) -> P:
  """Drops mesh axes that do not divide a dimension (e.g. a 65-character vocabulary over tensor=2);
  that dimension is replicated instead, and we say so."""
  parts = []
  for dim, part in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = part if isinstance(part, tuple) else ((part,) if part else ())
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if size > 1 and dim % size:
      log.info("replicating a dimension of size %d instead of sharding it over %s", dim, axes)
      part = None
    parts.append(part)
  return P(*parts)


def logical_to_sharding(abstract_tree, mesh: Mesh, rules):
  """NamedShardings for a tree of (possibly boxed) abstract values with logical axis metadata."""
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  unboxed = nn.meta.unbox(abstract_tree)
  return jax.tree.map(lambda s, x: NamedSharding(mesh, fit_spec(s, x.shape, mesh)), mesh_specs,
                      unboxed, is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def to_global(local_batch, mesh: Mesh):
  """Assembles host-local numpy batches [B/num_processes, ...] into global arrays sharded over the
  batch axes. Each process passes only the rows it loaded."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def to_host(x) -> np.ndarray:
  """The whole value of a (possibly multi-process) global array on this host: the inverse of
  `to_global`. An array spanning several processes is gathered from all of them (every process
  must call this together); any other array is simply copied to the host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier of this name (nothing on one process). Used
  where process 0 writes a file that the other processes read next."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def process_zero_decides(flag: bool) -> bool:
  """Process 0's `flag`, on every process: for a decision read from the file system, which a
  process that looks later could see differently (e.g. after process 0 wrote the file)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))


def is_process_local(tree) -> bool:
  """Whether every array leaf of `tree` is whole on this process: its own (fully addressable), or
  replicated over a multi-process mesh. False when some leaf is split across processes."""
  return all(x.is_fully_addressable or x.is_fully_replicated
             for x in jax.tree.leaves(tree) if isinstance(x, jax.Array))


def process_local(tree):
  """`tree` as arrays this process can compute with alone (see `is_process_local`). Leaves already
  on this process are kept; a replicated leaf of a multi-process mesh becomes its copy on this
  process's first device (no communication)."""
  if not is_process_local(tree):
    raise ValueError("process_local: some arrays are split across processes")
  return jax.tree.map(lambda x: x if not isinstance(x, jax.Array) or x.is_fully_addressable
                      else x.addressable_data(0), tree)


def split_over_processes(fn, n: int) -> list:
  """[fn(0), ..., fn(n-1)], each item computed by one process (round-robin) and gathered to all.

  For host-driven loops over independent items, e.g. sampling batches with process-local
  parameters: every process used to compute every item. `fn` may not call collectives, and its
  results must be numpy pytrees of one structure and shape, since they travel as one stacked
  array. Every process must call this together, with the same `n`."""
  p, me = jax.process_count(), jax.process_index()
  if p == 1 or n == 0:
    return [fn(b) for b in range(n)]
  mine = [fn(b) for b in range(me, n, p)]
  per = -(-n // p)
  # A process with fewer items (or none, when n < p) pads with a copy, so all send one shape.
  filler = mine[0] if mine else fn(0)
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *(mine + [filler] * (per - len(mine))))
  gathered = multihost_utils.process_allgather(stacked)          # leaves [p, per, ...]
  return [jax.tree.map(lambda x: np.asarray(x[b % p, b // p]), gathered) for b in range(n)]


def map_batches(fn, n: int, networks, *, splittable: bool = True) -> list:
  """[fn(networks, 0), ..., fn(networks, n-1)] for a host-driven loop over batches.

  When every array in `networks` is whole on each process (and `splittable`), the batches are
  split over the processes (`split_over_processes`) and `fn` gets this process's copies
  (`process_local`). Otherwise the networks are split across processes, the programs that use
  them span all of them, and every process runs every batch together. `fn`'s results follow
  `split_over_processes`'s rules either way."""
  if splittable and is_process_local(networks):
    return split_over_processes(functools.partial(fn, process_local(networks)), n)
  return [fn(networks, b) for b in range(n)]


def init_distributed(cfg) -> None:
  """Initialises jax.distributed from the config, or from the environment on a TPU pod / SLURM.

  Must run before any other JAX call. Single-process runs skip it.
  """
  if getattr(cfg, "cpu_collectives", ""):
    # CPU multi-process runs need a collectives backend; gloo ships with jaxlib.
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
  addr = cfg.coordinator_address or os.environ.get("GPTJAX_COORDINATOR", "")
  if addr:
    num = cfg.num_processes or int(os.environ.get("GPTJAX_NUM_PROCESSES", "0"))
    pid = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get("GPTJAX_PROCESS_ID", "-1"))
    if num <= 0 or pid < 0:
      raise ValueError("distributed.coordinator_address is set, so distributed.num_processes and "
                       "distributed.process_id (or GPTJAX_NUM_PROCESSES / GPTJAX_PROCESS_ID) "
                       "must be set too")
    jax.distributed.initialize(coordinator_address=addr, num_processes=num, process_id=pid)
  elif cfg.auto:
    # On Cloud TPU pods and SLURM clusters JAX discovers the coordinator by itself.
    jax.distributed.initialize()
