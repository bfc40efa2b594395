"""Safetensors <-> gptjax parameters: which HF tensor feeds which parameter, and how it is laid out.

A `Source` says how one of our parameters (one layer of it, for the stacked `blocks`) is read
from a stored tensor: take `offset` along a stored dimension (GPT-2 keeps q, k and v in one
`c_attn`), split each stored dimension into view dimensions (`[H·K, D]` -> `[H, K, D]`), and
transpose the view into our layout (`[D, H, K]`). Reading only the block a device owns follows the
same recipe on index ranges, so `load_params` gives every device its slice through
`safe_open(...).get_slice` and never holds a whole model on the host.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from gptjax.hf.configs import HFError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some checkpoints carry that are not parameters (GPT-2's causal mask, cached RoPE tables).
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


@dataclasses.dataclass(frozen=True)
class Source:
  name: str                              # HF tensor name; "{i}" stands for the layer
  groups: tuple[tuple[int, ...], ...]    # per stored dimension, the view dimensions it splits into
  perm: tuple[int, ...]                  # ours = view.transpose(perm)
  offset: tuple[int, int] | None = None  # (stored dim, start): a window of a fused tensor

  def stored_shape(self) -> tuple[int, ...]:
    return tuple(int(np.prod(g)) for g in self.groups)


def param_sources(cfg, family: str, head: str, prefix: str) -> dict[tuple, Source]:
  """Our parameter path -> its Source, for a resolved ModelConfig."""
  d, h, n, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  f, v = cfg.mlp_dim, cfg.vocab_size
  out = {}

  if family == "gpt2":
    p, layer = prefix, prefix + "h.{i}."
    out[("embed", "embedding")] = Source(p + "wte.weight", ((v,), (d,)), (0, 1))
    out[("pos_embed", "embedding")] = Source(p + "wpe.weight", ((cfg.max_len,), (d,)), (0, 1))
    for i, ours in enumerate(("query", "key", "value")):
      out[("blocks", "attn", ours, "kernel")] = Source(
          layer + "attn.c_attn.weight", ((d,), (h, k)), (0, 1, 2), offset=(1, i * d))
      out[("blocks", "attn", ours, "bias")] = Source(
          layer + "attn.c_attn.bias", ((h, k),), (0, 1), offset=(0, i * d))
    out[("blocks", "attn", "out", "kernel")] = Source(layer + "attn.c_proj.weight",
                                                      ((h, k), (d,)), (0, 1, 2))
    out[("blocks", "attn", "out", "bias")] = Source(layer + "attn.c_proj.bias", ((d,),), (0,))
    out[("blocks", "mlp", "fc", "kernel")] = Source(layer + "mlp.c_fc.weight", ((d,), (f,)), (0, 1))
    out[("blocks", "mlp", "fc", "bias")] = Source(layer + "mlp.c_fc.bias", ((f,),), (0,))
    out[("blocks", "mlp", "proj", "kernel")] = Source(layer + "mlp.c_proj.weight", ((f,), (d,)),
                                                      (0, 1))
    out[("blocks", "mlp", "proj", "bias")] = Source(layer + "mlp.c_proj.bias", ((d,),), (0,))
    norms = {"ln_attn": layer + "ln_1", "ln_mlp": layer + "ln_2", "ln_final": p + "ln_f"}
  else:
    p, layer = prefix, prefix + "layers.{i}."
    att = layer + "self_attn."
    out[("embed", "embedding")] = Source(p + "embed_tokens.weight", ((v,), (d,)), (0, 1))
    for ours, hf, heads in (("query", "q_proj", h), ("key", "k_proj", n), ("value", "v_proj", n)):
      out[("blocks", "attn", ours, "kernel")] = Source(att + hf + ".weight", ((heads, k), (d,)),
                                                       (2, 0, 1))
      out[("blocks", "attn", ours, "bias")] = Source(att + hf + ".bias", ((heads, k),), (0, 1))
    out[("blocks", "attn", "out", "kernel")] = Source(att + "o_proj.weight", ((d,), (h, k)),
                                                      (1, 2, 0))
    out[("blocks", "attn", "out", "bias")] = Source(att + "o_proj.bias", ((d,),), (0,))
    for ours, hf, shape, perm in (("gate", "gate_proj", ((f,), (d,)), (1, 0)),
                                  ("up", "up_proj", ((f,), (d,)), (1, 0)),
                                  ("proj", "down_proj", ((d,), (f,)), (1, 0))):
      out[("blocks", "mlp", ours, "kernel")] = Source(layer + f"mlp.{hf}.weight", shape, perm)
      out[("blocks", "mlp", ours, "bias")] = Source(layer + f"mlp.{hf}.bias",
                                                    ((d if ours == "proj" else f,),), (0,))
    out[("blocks", "attn", "query_norm", "scale")] = Source(att + "q_norm.weight", ((k,),), (0,))
    out[("blocks", "attn", "key_norm", "scale")] = Source(att + "k_norm.weight", ((k,),), (0,))
    norms = {"ln_attn": layer + "input_layernorm", "ln_final": p + "norm"}
    if cfg.post_norms:
      norms.update(ln_attn_out=layer + "post_attention_layernorm",
                   ln_mlp=layer + "pre_feedforward_layernorm",
                   ln_mlp_out=layer + "post_feedforward_layernorm")
    else:
      norms["ln_mlp"] = layer + "post_attention_layernorm"
  for ours, name in norms.items():
    path = ("blocks", ours) if "{i}" in name else (ours,)
    out[path + ("scale",)] = Source(name + ".weight", ((d,),), (0,))
    out[path + ("bias",)] = Source(name + ".bias", ((d,),), (0,))
  if head == "score":
    out[("scalar_head", "kernel")] = Source("score.weight", ((1,), (d,)), (1, 0))
  else:
    out[("lm_head", "kernel")] = Source("lm_head.weight", ((v,), (d,)), (1, 0))
  return out


class Checkpoint:
  """The safetensors of a model directory: one `model.safetensors`, or shards listed in
  `model.safetensors.index.json`. Files are opened lazily and read by slices."""

  def __init__(self, directory: str):
    from safetensors import safe_open
    self._open = safe_open
    self.directory = directory
    self._handles = {}
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise HFError(f"{INDEX_FILE}: expected a JSON object with a 'weight_map' ({e})") from None
      for name, shard in weight_map.items():
        if not os.path.exists(os.path.join(directory, shard)):
          raise HFError(f"{INDEX_FILE}: field 'weight_map.{name}' names shard {shard!r}, which "
                        f"is not in {directory}")
      self.where = dict(weight_map)
    elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
      self.where = {name: SINGLE_FILE for name in self._handle(SINGLE_FILE).keys()}
    else:
      raise HFError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}; gptjax reads safetensors "
                    "weights only (convert a pytorch_model.bin with transformers first)")

  def _handle(self, file):
    if file not in self._handles:
      try:
        self._handles[file] = self._open(os.path.join(self.directory, file), framework="numpy")
      except Exception as e:  # safetensors raises its own error type for a damaged header
        raise HFError(f"{file}: not a readable safetensors file ({e})") from None
    return self._handles[file]

  def names(self):
    return set(self.where)

  def slice(self, name: str):
    return self._handle(self.where[name]).get_slice(name)

  def file_of(self, name: str) -> str:
    return self.where[name]

  def release(self) -> None:
    """Drops the open files. Pages of a memory-mapped file that were read count in this
    process's RSS until it is unmapped; releasing after each read keeps them from adding up to
    a second copy of the model (reopening costs one header parse)."""
    self._handles.clear()


def _read_block(ckpt: Checkpoint, src: Source, name: str, index: tuple) -> np.ndarray:
  """Our-layout block `index` (slices over our dims) of one layer's tensor `name`."""
  view_shape = [s for g in src.groups for s in g]
  view_index = [slice(None)] * len(view_shape)
  for ours_dim, view_dim in enumerate(src.perm):
    view_index[view_dim] = index[ours_dim]
  stored, rest, pos = [], [], 0
  for dim, group in enumerate(src.groups):
    first = view_index[pos].indices(group[0])
    inner = int(np.prod(group[1:]))
    start, stop = first[0] * inner, first[1] * inner
    if src.offset and src.offset[0] == dim:
      start, stop = start + src.offset[1], stop + src.offset[1]
    stored.append(slice(start, stop))
    rest.append((first[1] - first[0],) + tuple(group[1:]))
    pos += len(group)
  block = ckpt.slice(name)[tuple(stored)]
  ckpt.release()        # the mapped pages just read would otherwise stay in RSS beside the copy
  block = block.reshape([s for r in rest for s in r])
  # The stored read took whole rows of the trailing view dims; cut them to the asked block.
  trailing, pos = [], 0
  for group in src.groups:
    trailing.append(slice(None))
    trailing.extend(view_index[pos + 1:pos + len(group)])
    pos += len(group)
  return np.transpose(block[tuple(trailing)], src.perm)


def check_shapes(ckpt: Checkpoint, sources: dict, num_layers: int) -> None:
  """Every tensor we will read exists with the shape config.json implies, and every tensor in
  the checkpoint is used; the message names the file and the tensor."""
  used = set()
  for src in sources.values():
    for name in _layer_names(src, num_layers):
      if name not in ckpt.where:
        raise HFError(f"{_weights_file(ckpt)}: no tensor {name!r}, which config.json implies")
      shape = tuple(ckpt.slice(name).get_shape())
      want = src.stored_shape()
      if src.offset:
        want = tuple(3 * w if i == src.offset[0] else w for i, w in enumerate(want))
      if shape != want:
        raise HFError(f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(shape)} but "
                      f"config.json implies {list(want)}")
      used.add(name)
  extra = sorted(n for n in ckpt.names() - used
                 if not n.endswith(BUFFER_SUFFIXES) and n != "lm_head.weight")
  if extra:
    raise HFError(f"{ckpt.file_of(extra[0])}: tensor {extra[0]!r} is not part of the model "
                  f"config.json describes ({len(extra)} such tensor(s))")


def _weights_file(ckpt):
  return INDEX_FILE if os.path.exists(os.path.join(ckpt.directory, INDEX_FILE)) else SINGLE_FILE


def _layer_names(src: Source, num_layers: int) -> list[str]:
  if "{i}" in src.name:
    return [src.name.format(i=i) for i in range(num_layers)]
  return [src.name]


def _aligned_empty(shape, dtype) -> np.ndarray:
  """An uninitialised array at a 64-byte boundary: XLA:CPU then adopts its memory as a device
  buffer (`device_put(may_alias=True)`) instead of copying it."""
  size = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(size + 64, np.uint8)
  start = (-raw.ctypes.data) % 64
  return raw[start:start + size].view(dtype).reshape(shape)


def load_params(ckpt: Checkpoint, sources: dict, targets: dict) -> dict:
  """{path: jax.Array}: each parameter read slice by slice into `targets[path]`
  (a ShapeDtypeStruct with a sharding). Each local device gets the block its shard covers;
  stacked [L, ...] parameters are read one layer at a time into that block. On CPU the block
  becomes the device buffer without a copy, so the host holds each parameter once."""
  out = {}
  for path, target in targets.items():
    src = sources[path]
    dtype = np.dtype(target.dtype)
    read = {}                 # replicas on several local devices read the file once
    arrays = []
    for device, index in target.sharding.addressable_devices_indices_map(target.shape).items():
      index = tuple(index) + (slice(None),) * (len(target.shape) - len(index))
      key = tuple(s.indices(n) for s, n in zip(index, target.shape))
      if key in read:
        arrays.append(jax.device_put(read[key], device))
        continue
      shape = tuple(len(range(*k)) for k in key)
      value = _aligned_empty(shape, dtype)
      if "{i}" in src.name:
        for j, i in enumerate(range(*key[0])):
          value[j] = _read_block(ckpt, src, src.name.format(i=i), index[1:])
      else:
        # In pieces of about 32 MB along the first axis, so the embedding (the largest tensor)
        # is never held twice.
        start, stop, _ = key[0]
        rows = max(1, (32 << 20) // max(1, value[:1].nbytes))
        for a in range(start, stop, rows):
          b = min(a + rows, stop)
          value[a - start:b - start] = _read_block(ckpt, src, src.name, (slice(a, b),) + index[1:])
      read[key] = value
      arrays.append(jax.device_put(value, device, may_alias=True))
    out[path] = jax.make_array_from_single_device_arrays(target.shape, target.sharding, arrays)
  return out


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------

def to_hf_tensors(params_by_path: dict, sources: dict, num_layers: int):
  """Yields (hf_name, numpy array) from our host arrays; fused GPT-2 q/k/v are put together."""
  fused: dict[str, np.ndarray] = {}
  for path, value in params_by_path.items():
    src = sources[path]
    inverse = np.argsort(src.perm)
    layers = range(num_layers) if "{i}" in src.name else [None]
    for i in layers:
      x = value[i] if i is not None else value
      stored = np.ascontiguousarray(np.transpose(x, inverse)).reshape(src.stored_shape())
      name = src.name.format(i=i) if i is not None else src.name
      if src.offset is None:
        yield name, stored
        continue
      dim, start = src.offset
      if name not in fused:
        shape = list(stored.shape)
        shape[dim] *= 3
        fused[name] = np.zeros(shape, stored.dtype)
      where = [slice(None)] * stored.ndim
      where[dim] = slice(start, start + stored.shape[dim])
      fused[name][tuple(where)] = stored
  yield from fused.items()


def write_safetensors(tensors, out_dir: str, *, max_shard_bytes: int) -> list[str]:
  """Writes tensors as one model.safetensors, or as shards plus an index above the limit."""
  from safetensors.numpy import save_file
  shards, current, size = [], {}, 0
  for name, x in tensors:
    if current and size + x.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = x
    size += x.nbytes
  if current or not shards:
    shards.append(current)
  meta = {"format": "pt"}
  if len(shards) == 1:
    save_file(shards[0], os.path.join(out_dir, SINGLE_FILE), metadata=meta)
    return [SINGLE_FILE]
  files, weight_map, total = [], {}, 0
  for j, shard in enumerate(shards):
    file = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(out_dir, file), metadata=meta)
    files.append(file)
    for name, x in shard.items():
      weight_map[name] = file
      total += x.nbytes
  with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return files + [INDEX_FILE]
