"""The quantized frozen base of QLoRA (`model.lora.base_quant = "int8" | "nf4"`).

    base = qlora.quantize_base(base, spec)     # targeted kernels -> codes + scales
    w = qlora.dequantize_base(base)            # the float tree the quantized one stands for

What lives here: the two storage formats and their codecs, the tree functions that swap the
targeted layer kernels for their quantized form, and the qwix provider mixin that dequantizes a
stored kernel when its module reads it. Wrapping models and the trainer's split live in
`gptjax/lora.py`.

Formats (one layer's kernel; the scanned stack adds its leading [L] to codes and scales):
- int8: symmetric, one scale per output channel, `scale = max|w| / 127` over the contracting
  dims; codes int8 of the kernel's shape. 1 byte/param plus 4 bytes per output channel.
- nf4: the kernel flattened in row-major order and cut into blocks of 64 (QLoRA's block size);
  each block keeps its absmax (float32) and each weight the nearest of the 16 NormalFloat levels
  of w / absmax, two codes packed in a byte. 0.5 byte/param plus 4 bytes per 64 params
  (0.5625 in all: the absmax is not itself quantized, i.e. no "double quantization").

How the dequantized weight reaches the matmul: a stored kernel is a `QuantizedKernel` inside
qwix's `WithAux` box. qwix intercepts `Module.param`; our override (`DequantizeStored.nn_param`)
returns the dequantized array to the Dense layer, inside the layer scan, so one layer's float
kernel exists at a time. qwix's LoRA then has to recognise that array as the layer's `kernel`
to attach its adapters: its `find_param` lists a module's params that are arrays or `WithAux`
(hence the box) and, the dequantized array being a new value, walks back from it through
single-input ops and then matches by shape, which the box reports as the kernel's
(`QuantizedKernel.shape`); so `dequantize` ends in a kernel-shaped multiply. Without the box, or
with a reshape after that multiply, the adapters silently drop out of the forward (nf4 did,
before); tests/test_lora.py checks they do not.
"""

from __future__ import annotations

import functools
import re
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

BASE_QUANTS = ("int8", "nf4")
NF4_BLOCK = 64
# Per module: (contracting dims, output dims) of one layer's kernel. Every GPT kernel lists its
# contracting dims first (gptjax/model.py); attention's `out` contracts heads and head_dim.
KERNEL_DIMS = {"query": (1, 2), "key": (1, 2), "value": (1, 2), "out": (2, 1),
               "fc": (1, 1), "proj": (1, 1), "gate": (1, 1), "up": (1, 1)}


def nf4_levels() -> np.ndarray:
  """The 16 NormalFloat-4 levels (QLoRA, Dettmers et al. 2023, section 3 and appendix E).

  Quantiles of N(0, 1) scaled to [-1, 1], asymmetric so that 0 is a level: 8 positive levels at
  quantiles evenly spaced from 1/2 to `offset`, 7 negative ones from 1/2 to `offset` mirrored,
  and 0. The outermost quantile `offset` is the mean of 1 - 1/(2*15) and 1 - 1/(2*16), so the
  extreme levels sit where the paper's estimator puts them for 15 and 16 bins.
  """
  offset = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
  ppf = statistics.NormalDist().inv_cdf
  positive = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  negative = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  levels = np.sort(np.asarray(positive + [0.0] + negative))
  return (levels / levels.max()).astype(np.float32)


NF4_LEVELS = nf4_levels()
# Decision boundaries between neighbouring levels: the code of x is the number it exceeds.
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


@struct.dataclass
class QuantizedKernel:
  """One kernel (or a scanned stack of them) stored as codes and scales; see the module doc."""
  codes: jax.Array            # int8 [..., *kernel_shape] | uint8 [..., blocks, 32]
  scales: jax.Array           # float32 [..., *out_shape] | float32 [..., blocks]
  kind: str = struct.field(pytree_node=False)           # "int8" | "nf4"
  kernel_shape: tuple = struct.field(pytree_node=False)  # one layer's kernel
  contracting: int = struct.field(pytree_node=False)     # leading contracting dims of it
  dtype_name: str = struct.field(pytree_node=False)      # the dtype it dequantizes to

  @property
  def lead(self) -> tuple:
    tail = len(self.kernel_shape) if self.kind == "int8" else 2
    return tuple(self.codes.shape[:self.codes.ndim - tail])

  @property
  def shape(self) -> tuple:
    return self.lead + tuple(self.kernel_shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def dtype(self):
    return jnp.dtype(self.dtype_name)

  @property
  def nbytes(self) -> int:
    return int(self.codes.nbytes) + int(self.scales.nbytes)

  def dequantize(self) -> jax.Array:
    # The last operation is the multiply, at the kernel's shape: qwix's find_param walks back
    # through single-input ops (reshape, slice, cast) before comparing shapes, so a reshape of
    # a flat [blocks, 64] product after it would hide the kernel from qwix's LoRA.
    if self.kind == "int8":
      scales = self.scales.reshape(self.lead + (1,) * self.contracting
                                   + self.scales.shape[len(self.lead):])
      w = self.codes.astype(jnp.float32) * scales
    else:
      n = int(np.prod(self.kernel_shape))
      per_block = self.codes.shape[:-1] + (NF4_BLOCK,)                       # [..., nb, 64]
      to_kernel = lambda a: a.reshape(self.lead + (-1,))[..., :n].reshape(self.shape)
      codes = jnp.stack([self.codes & 15, self.codes >> 4], axis=-1).reshape(per_block)
      levels = jnp.asarray(NF4_LEVELS)[to_kernel(codes).astype(jnp.int32)]
      absmax = to_kernel(jnp.broadcast_to(self.scales[..., None], per_block))
      w = levels * absmax
    return w.astype(self.dtype)


def quantize_kernel(w, kind: str, *, contracting: int, output: int) -> QuantizedKernel:
  """`w` [..., *in, *out] (leading dims: the layer stack) in the `kind` format."""
  kernel_ndim = contracting + output
  lead = w.shape[:w.ndim - kernel_ndim]
  kernel_shape = tuple(w.shape[w.ndim - kernel_ndim:])
  w32 = w.astype(jnp.float32)
  if kind == "int8":
    axes = tuple(range(len(lead), len(lead) + contracting))
    scale = jnp.max(jnp.abs(w32), axis=axes, keepdims=True) / 127.0
    # An all-zero channel has scale 0; its codes are 0 whatever the divisor, so divide by 1.
    codes = jnp.round(w32 / jnp.where(scale > 0, scale, 1.0))
    codes = jnp.clip(codes, -127, 127).astype(jnp.int8)
    scales = scale.reshape(lead + kernel_shape[contracting:])
  elif kind == "nf4":
    n = int(np.prod(kernel_shape))
    blocks = -(-n // NF4_BLOCK)
    flat = w32.reshape(lead + (n,))
    # The tail block is padded with zeros (code of 0.0), cut off again when dequantizing.
    flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, blocks * NF4_BLOCK - n)])
    flat = flat.reshape(lead + (blocks, NF4_BLOCK))
    scales = jnp.max(jnp.abs(flat), axis=-1)                                   # [..., nb]
    normed = flat / jnp.where(scales > 0, scales, 1.0)[..., None]
    codes = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), normed).astype(jnp.uint8)
    codes = codes[..., 0::2] | (codes[..., 1::2] << 4)                         # [..., nb, 32]
  else:
    raise ValueError(f"base_quant: expected one of {BASE_QUANTS}, got {kind!r}")
  return QuantizedKernel(codes=codes, scales=scales, kind=kind, kernel_shape=kernel_shape,
                         contracting=contracting, dtype_name=jnp.dtype(w.dtype).name)


# --------------------------------------------------------------------------------------------
# Trees: the frozen base with its targeted kernels stored quantized
# --------------------------------------------------------------------------------------------

def _box(q: QuantizedKernel):
  # qwix's WithAux: the one non-array type qwix's LoRA lists among a module's weights.
  from qwix._src.providers import ptq
  return ptq.WithAux(array=q, how=None)


def is_quantized(x) -> bool:
  return isinstance(getattr(x, "array", None), QuantizedKernel)


def _paths(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict) or (hasattr(v, "items") and not hasattr(v, "shape")):
      yield from _paths(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _set(tree, path, value):
  """A copy of the nested dict `tree` with `path` replaced (untouched branches shared)."""
  out = dict(tree)
  out[path[0]] = value if len(path) == 1 else _set(tree[path[0]], path[1:], value)
  return out


@functools.partial(jax.jit, static_argnames=("kind", "contracting", "output", "placement"))
def _quantize_jit(w, *, kind, contracting, output, placement=None):
  q = quantize_kernel(w, kind, contracting=contracting, output=output)
  if placement is not None:
    # Constrained inside the program, so no device ever holds more than its part of the codes.
    q = q.replace(codes=jax.lax.with_sharding_constraint(q.codes, placement[0]),
                  scales=jax.lax.with_sharding_constraint(q.scales, placement[1]))
  return q


def stored_shardings(w, kind: str, *, contracting: int, output: int):
  """(codes, scales) NamedShardings that split a quantized kernel over the devices its float
  kernel `w` [..., *in, *out] is split over; None when `w` carries no NamedSharding.

  int8 codes have the kernel's shape and take its spec; the per-channel scales take the spec of
  the layer stack and output dims. nf4 blocks run through the kernel in row-major order, so no
  block index stands for one kernel axis: its blocks are split over every mesh axis the kernel's
  own dims use (each device then stores its share, as with the float kernel), and the layer
  stack keeps its spec. A dimension the axes do not divide is replicated (`sharding.fit_spec`)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from gptjax import sharding as shd
  sh = getattr(w, "sharding", None)
  if not isinstance(sh, NamedSharding):
    return None
  spec = tuple(sh.spec) + (None,) * (w.ndim - len(sh.spec))
  lead = w.ndim - contracting - output
  if kind == "int8":
    codes, scales = spec, spec[:lead] + spec[lead + contracting:]
  else:
    axes = tuple(a for part in spec[lead:]
                 for a in (part if isinstance(part, tuple) else (part,)) if a)
    blocks = None if not axes else axes[0] if len(axes) == 1 else axes
    codes, scales = spec[:lead] + (blocks, None), spec[:lead] + (blocks,)
  shapes = jax.eval_shape(functools.partial(quantize_kernel, kind=kind, contracting=contracting,
                                            output=output),
                          jax.ShapeDtypeStruct(w.shape, w.dtype))
  return tuple(NamedSharding(sh.mesh, shd.fit_spec(P(*s), x.shape, sh.mesh))
               for s, x in ((codes, shapes.codes), (scales, shapes.scales)))


def targeted(path, module_regex: str) -> bool:
  """Whether the leaf at `path` is a layer kernel the spec's targets name."""
  return (len(path) >= 2 and path[-1] == "kernel" and path[-2] in KERNEL_DIMS
          and re.fullmatch(module_regex, "/".join(str(p) for p in path[:-1])) is not None)


def quantize_base(tree, spec):
  """`tree` with every kernel the spec targets stored as `spec.base_quant` (already quantized
  kernels are kept, so calling it twice is the same as once). Each kernel is quantized by its
  own jitted call, so the float original of one kernel at a time is alive beside the codes."""
  if spec is None or spec.base_quant is None:
    return tree
  regex = spec.module_regex()
  out = tree
  for path, leaf in list(_paths(tree)):
    if is_quantized(leaf) or not targeted(path, regex):
      continue
    contracting, output = KERNEL_DIMS[path[-2]]
    kw = dict(kind=spec.base_quant, contracting=contracting, output=output)
    # A shapes-only tree (the memory plan's) gets the quantized kernel's shapes, not arrays.
    kw["placement"] = stored_shardings(leaf, spec.base_quant, contracting=contracting,
                                       output=output)
    if isinstance(leaf, jax.ShapeDtypeStruct):
      q = jax.eval_shape(functools.partial(_quantize_jit, **kw), leaf)
      if kw["placement"] is not None:
        # eval_shape drops shardings; the plan counts each device's part of a sharded leaf.
        placed = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
        codes_sh, scales_sh = kw["placement"]
        q = q.replace(codes=placed(q.codes, codes_sh), scales=placed(q.scales, scales_sh))
    else:
      q = _quantize_jit(leaf, **kw)
    out = _set(out, path, _box(q))
  return out


def dequantize_base(tree):
  """`tree` with every quantized kernel replaced by its dequantized float array."""
  out = tree
  for path, leaf in list(_paths(tree)):
    if is_quantized(leaf):
      out = _set(out, path, leaf.array.dequantize())
  return out


def round_trip(tree, spec):
  """What a QLoRA run's base computes with: quantized, then dequantized (float leaves)."""
  return dequantize_base(quantize_base(tree, spec))


def quantized_nbytes(tree) -> tuple[int, int]:
  """(bytes of the quantized kernels' codes and scales, bytes of their float32 originals)."""
  stored = full = 0
  for _, leaf in _paths(tree):
    if is_quantized(leaf):
      stored += leaf.array.nbytes
      full += 4 * int(np.prod(leaf.array.shape))
  return stored, full


# --------------------------------------------------------------------------------------------
# Reading a stored kernel inside the model
# --------------------------------------------------------------------------------------------

class DequantizeStored:
  """qwix provider mixin: a module reading a quantized kernel gets it dequantized."""

  def nn_param(self, module, name, *args, **kwargs):
    stored = module.get_variable("params", name)
    if is_quantized(stored):
      return stored.array.dequantize()
    return super().nn_param(module, name, *args, **kwargs)


def lora_provider(rules, mixins=()):
  """qwix's LoRA over a quantized base: adapters on the dequantized kernels. `mixins` come
  first in the provider's bases (lora.wrap adds the one that keeps the compute dtype)."""
  import qwix

  class QLoraProvider(*mixins, DequantizeStored, qwix.LoraProvider):
    pass

  return QLoraProvider(rules)


def base_provider(module_regex: str):
  """The quantized base alone (the reference policy): plain matmuls on dequantized kernels."""
  import qwix

  class QuantizedBaseProvider(DequantizeStored, qwix.PtqProvider):
    pass

  # weight_qtype None: qwix's PTQ leaves these matmuls as they are (no quantized dot_general).
  return QuantizedBaseProvider([qwix.QuantizationRule(module_path=module_regex)])
