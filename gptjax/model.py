"""A decoder-only transformer in flax.linen, GPT-2 or LLaMA style, chosen by config fields.

    model = GPT(ModelConfig(...))
    out = model.apply({"params": params}, inputs, positions=..., segment_ids=...)
    out.logits [B,T,V] float32, out.hidden [B,T,D] (after the final norm), out.values [B,T] or None

Decoding passes a KV cache (see `init_cache`) and the slot to write at. Training scans one `Block`
over the stacked layer parameters; with a cache the same `Block` runs once per layer on its slice
of those parameters and its own cache buffers, so cached logits equal full-forward logits.

Attention masks come from segment ids: a query attends to a key when the key is not in its future
and both belong to the same segment. Packed documents never see each other, and padding (segment
0) only sees padding. Every parameter carries logical axis names; `sharding.py` maps them to mesh
axes through the config's rules table.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 256
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int | None = None   # None: same as num_heads; fewer gives grouped-query attention
  d_model: int = 128
  mlp_dim: int | None = None        # None: 4·D (gelu/relu) or the LLaMA rule 8/3·D rounded (swiglu)
  max_len: int = 256
  variant: str = "gpt2"             # defaults for the fields below when they are left as None
  norm: str | None = None           # layernorm | rmsnorm
  activation: str | None = None     # gelu_tanh | gelu | relu | swiglu
  positional: str | None = None     # learned | rope
  tie_embeddings: bool | None = None
  use_bias: bool | None = None
  qk_norm: bool = False
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  # Fields that imported Hugging Face models need (gptjax/hf/); the defaults leave a model as above.
  explicit_head_dim: int | None = None  # None: d_model // num_heads (Qwen3 and Gemma set their own)
  qkv_bias: bool | None = None      # None: use_bias (Qwen2 has q/k/v biases and no other bias)
  out_bias: bool | None = None      # None: use_bias; the attention output projection
  mlp_bias: bool | None = None      # None: use_bias
  post_norms: bool = False          # Gemma: also normalise each branch's output before the residual
  embed_scale: bool = False         # Gemma: embeddings multiplied by sqrt(D)
  attn_scale: float | None = None   # None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
  rope_type: str = "default"        # default | linear | llama3 (how the frequencies are stretched)
  rope_factor: float = 1.0          # linear and llama3: context extension factor
  rope_low_freq_factor: float = 1.0     # llama3
  rope_high_freq_factor: float = 4.0    # llama3
  rope_original_max_len: int = 8192     # llama3: the pre-extension context length
  sliding_window: int | None = None  # a query sees the last `sliding_window` slots on local layers
  layer_types: str = ""             # one letter per layer, "l" local (sliding) or "g" global;
                                    # "": all local when sliding_window is set, else all global
  rope_local_theta: float | None = None  # Gemma 3: RoPE base of local layers (unscaled); None: same
  final_logit_softcap: float | None = None   # logits = cap * tanh(logits / cap)
  hf_family: str = ""               # the HF model_type it was imported from (export writes it
                                    # back; no effect on the math)
  dtype: str = "float32"            # compute dtype; parameters stay float32
  param_dtype: str = "float32"
  remat: str = "none"               # none | full | dots (save matmul outputs, recompute the rest)
  dropout_rate: float = 0.0
  scalar_head: bool = False         # a D→1 head on the final hidden states (reward / value)
  attention_impl: str | None = None  # None: "einsum" on CPU, else JAX's choice; "cudnn" forces
                                     # the fused GPU kernel; "einsum" is hand-written softmax
                                     # attention (measured faster on CPU: benchmarks/RESULTS.md)
  scan_unroll: int = 0              # layers per iteration of the scan over layers; 0 unrolls all
                                    # (measured ~10% faster on CPU than a rolled loop)

  def resolved(self) -> "ModelConfig":
    """Fills variant defaults, so the rest of the code reads concrete values."""
    gpt2 = dict(norm="layernorm", activation="gelu_tanh", positional="learned",
                tie_embeddings=True, use_bias=True)
    llama = dict(norm="rmsnorm", activation="swiglu", positional="rope",
                 tie_embeddings=False, use_bias=False)
    if self.variant not in ("gpt2", "llama"):
      raise ValueError(f"model.variant must be 'gpt2' or 'llama', got {self.variant!r}")
    defaults = gpt2 if self.variant == "gpt2" else llama
    kw = {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in defaults.items()}
    c = dataclasses.replace(self, **kw)
    if not c.layer_types:
      c = dataclasses.replace(c, layer_types=("l" if c.sliding_window else "g") * c.num_layers)
    if c.num_kv_heads is None:
      c = dataclasses.replace(c, num_kv_heads=c.num_heads)
    if c.mlp_dim is None:
      if c.activation in ("swiglu", "geglu"):
        m = int(8 * c.d_model / 3)
        c = dataclasses.replace(c, mlp_dim=((m + 63) // 64) * 64)
      else:
        c = dataclasses.replace(c, mlp_dim=4 * c.d_model)
    c.validate()
    return c

  def validate(self):
    def bad(field, msg):
      raise ValueError(f"model.{field}: {msg}")
    if self.explicit_head_dim is None and self.d_model % self.num_heads:
      bad("d_model", f"{self.d_model} is not divisible by num_heads={self.num_heads}")
    if self.num_kv_heads and self.num_heads % self.num_kv_heads:
      bad("num_kv_heads", f"{self.num_kv_heads} does not divide num_heads={self.num_heads}")
    if self.norm not in (None, "layernorm", "rmsnorm", "gemma_rmsnorm"):
      bad("norm", f"expected layernorm, rmsnorm or gemma_rmsnorm, got {self.norm!r}")
    if self.activation not in (None, "gelu_tanh", "gelu", "relu", "swiglu", "geglu"):
      bad("activation", f"expected gelu_tanh, gelu, relu, swiglu or geglu, got {self.activation!r}")
    if self.rope_type not in ("default", "linear", "llama3"):
      bad("rope_type", f"expected default, linear or llama3, got {self.rope_type!r}")
    if self.layer_types and (len(self.layer_types) != self.num_layers
                             or set(self.layer_types) - set("lg")):
      bad("layer_types", f"expected {self.num_layers} letters 'l' or 'g', got {self.layer_types!r}")
    if "l" in self.layer_types and not self.sliding_window:
      bad("layer_types", "has local layers ('l') but sliding_window is not set")
    if self.positional not in (None, "learned", "rope"):
      bad("positional", f"expected learned or rope, got {self.positional!r}")
    if self.positional == "rope" and self.head_dim % 2:
      bad("d_model", "RoPE needs an even head dimension")
    if self.dtype not in _DTYPES:
      bad("dtype", f"expected one of {sorted(_DTYPES)}, got {self.dtype!r}")
    if self.param_dtype not in _DTYPES:
      bad("param_dtype", f"expected one of {sorted(_DTYPES)}, got {self.param_dtype!r}")
    if self.attention_impl not in (None, "xla", "cudnn", "einsum"):
      bad("attention_impl", f"expected None, xla, cudnn or einsum, got {self.attention_impl!r}")
    if self.scan_unroll < 0:
      bad("scan_unroll", f"must be >= 0 (0 unrolls every layer), got {self.scan_unroll}")
    if self.remat not in ("none", "full", "dots"):
      bad("remat", f"expected none, full or dots, got {self.remat!r}")
    for f in ("vocab_size", "num_layers", "num_heads", "d_model", "max_len"):
      if getattr(self, f) <= 0:
        bad(f, f"must be positive, got {getattr(self, f)}")

  @property
  def head_dim(self) -> int:
    return self.explicit_head_dim or self.d_model // self.num_heads


@struct.dataclass
class ModelOutput:
  logits: Any          # [B,T,V] float32, or None when the caller asked for hidden states only
  hidden: Any          # [B,T,D] after the final norm
  values: Any = None   # [B,T] float32 from the scalar head, when the config has one
  cache: Any = None    # the updated KV cache, when one was passed


def attention_mask(q_slots, q_segments, kv_segments, window=None):
  """[B,T,S] bool: query slot t sees key slot s when s <= t and both hold the same segment id,
  and, with a `window`, when t - s < window (sliding-window attention, as Mistral and Gemma).
  q_slots [T] (the queries' slot numbers), q_segments [B,T], kv_segments [B,S]."""
  kv_slots = jnp.arange(kv_segments.shape[1])[None, :]
  causal = kv_slots <= q_slots[:, None]                                            # [T,S]
  if window is not None:
    causal = causal & (q_slots[:, None] - kv_slots < window)
  return causal[None] & (q_segments[:, :, None] == kv_segments[:, None, :])


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None):
  """An empty KV cache: per-layer tuples of k [B,N,K,S] and v [B,N,S,K] (N KV heads, S slots),
  and the segment id of each slot [B,S] (0 = empty).

  One buffer per layer, not one [L,...] array: a decode step then writes one slot of each layer in
  place, where a stacked cache fed through the layer scan is sliced out and stacked back every
  step. The layouts are the ones the attention matmuls read directly (see `cached_attention`).
  """
  cfg = cfg.resolved()
  dt = _DTYPES[cfg.dtype] if dtype is None else dtype
  m, k = cfg.num_kv_heads, cfg.head_dim
  layers = range(cfg.num_layers)
  return {"k": tuple(jnp.zeros((batch, m, k, length), dt) for _ in layers),
          "v": tuple(jnp.zeros((batch, m, length, k), dt) for _ in layers),
          "segment_ids": jnp.zeros((batch, length), jnp.int32)}


def grow_cache(cache, length: int):
  """Pads a cache from `init_cache` with empty slots (segment id 0, so masked) up to `length`."""
  extra = length - cache["segment_ids"].shape[1]
  if extra == 0:
    return cache
  pad = lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])
  return {"k": tuple(pad(k, 3) for k in cache["k"]),            # [B,N,K,S]
          "v": tuple(pad(v, 2) for v in cache["v"]),            # [B,N,S,K]
          "segment_ids": pad(cache["segment_ids"], 1)}          # [B,S]


def _init(names, fn):
  return nn.with_logical_partitioning(fn, names)


class RMSNorm(nn.Module):
  """x / rms(x) · scale; with `offset` (Gemma) the stored parameter is scale − 1, initialised 0."""
  eps: float = 1e-5
  dtype: Any = jnp.float32
  offset: bool = False

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    scale = self.param("scale", _init(("norm",), init), (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + scale if self.offset else scale)).astype(self.dtype)


def make_norm(cfg: ModelConfig, name: str):
  if cfg.norm in ("rmsnorm", "gemma_rmsnorm"):
    return RMSNorm(eps=cfg.norm_eps, dtype=_DTYPES[cfg.dtype], offset=cfg.norm == "gemma_rmsnorm",
                   name=name)
  return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=_DTYPES[cfg.dtype], name=name,
                      scale_init=_init(("norm",), nn.initializers.ones),
                      bias_init=_init(("norm",), nn.initializers.zeros))


def rope_frequencies(cfg: ModelConfig, *, local: bool = False):
  """[K/2] float32 inverse frequencies. Local (sliding-window) layers of Gemma 3 use their own
  base and no scaling; `linear` divides every frequency by the factor; `llama3` divides only the
  low frequencies (wavelengths beyond the original context) and blends the band in between."""
  k = cfg.head_dim
  theta = cfg.rope_local_theta if local and cfg.rope_local_theta else cfg.rope_theta
  freqs = 1.0 / (theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))     # [K/2]
  if local and cfg.rope_local_theta or cfg.rope_type == "default":
    return freqs
  if cfg.rope_type == "linear":
    return freqs / cfg.rope_factor
  factor, old_len = cfg.rope_factor, cfg.rope_original_max_len
  low_wavelen = old_len / cfg.rope_low_freq_factor
  high_wavelen = old_len / cfg.rope_high_freq_factor
  wavelen = 2 * jnp.pi / freqs
  scaled = jnp.where(wavelen > low_wavelen, freqs / factor, freqs)
  smooth = (old_len / wavelen - cfg.rope_low_freq_factor) / (
      cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
  blended = (1 - smooth) * scaled / factor + smooth * scaled
  middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(middle, blended, scaled)


def rope(x, positions, freqs):
  """Rotary embedding on x [B,T,H,K] at integer positions [B,T] (rotate-half convention), with
  inverse frequencies [K/2] from `rope_frequencies`."""
  angles = positions.astype(jnp.float32)[..., None] * freqs                    # [B,T,K/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


@jax.custom_vjp
def gelu_tanh(x):
  """GPT-2's tanh-approximate GELU, the same function as `nn.gelu(x, approximate=True)`.

  Autodiff of that expression differentiates x³ and tanh separately and keeps several
  intermediates; this backward reuses the forward's tanh and needs one fused elementwise pass.
  """
  return _gelu_tanh_fwd(x)[0]


_GELU_C = 0.7978845608028654      # sqrt(2 / pi)


def _gelu_tanh_fwd(x):
  t = jnp.tanh(_GELU_C * (x + 0.044715 * x * x * x))
  return 0.5 * x * (1 + t), (x, t)


def _gelu_tanh_bwd(res, g):
  x, t = res
  du = _GELU_C * (1 + 3 * 0.044715 * x * x)
  return (g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def einsum_attention(q, k, v, mask, scale):
  """Softmax attention: q [B,T,H,K], k and v [B,S,N,K] (N divides H), boolean mask [B,1,T,S];
  scores are q·k times `scale` (a Python float, usually K ** -0.5).

  The backward is written out from the saved probabilities P: dS = P·(dP − rowsum(dO·O)), the
  usual softmax identity, so it never recomputes the exponentials or re-applies the mask.
  """
  return _attention_fwd(q, k, v, mask, scale)[0]


def _attention_fwd(q, k, v, mask, scale):
  b, t, n, d = q.shape
  m = k.shape[2]
  qg = q.reshape(b, t, m, n // m, d)                       # query heads grouped by their kv head
  s = jnp.einsum("btmgd,bsmd->bmgts", qg, k, preferred_element_type=jnp.float32) * scale
  s = jnp.where(mask[:, :, None], s, jnp.finfo(jnp.float32).min)
  s = s - jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s)
  p = e / jnp.sum(e, axis=-1, keepdims=True)               # [B,N,R,T,S] float32
  out = jnp.einsum("bmgts,bsmd->btmgd", p.astype(v.dtype), v).reshape(b, t, n, d)
  return out, (q, k, v, mask, p, out)


def _attention_bwd(scale, res, g_out):
  q, k, v, mask, p, out = res
  b, t, n, d = q.shape
  m = k.shape[2]
  qg, gg = q.reshape(b, t, m, n // m, d), g_out.reshape(b, t, m, n // m, d)
  dv = jnp.einsum("bmgts,btmgd->bsmd", p.astype(v.dtype), gg)
  dp = jnp.einsum("btmgd,bsmd->bmgts", gg, v, preferred_element_type=jnp.float32)
  # rowsum(dP·P) equals rowsum(dO·O) per query, which is a [B,T,H] reduction instead of [.,T,S].
  delta = jnp.sum(g_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  delta = delta.reshape(b, t, m, n // m).transpose(0, 2, 3, 1)[..., None]      # [B,N,R,T,1]
  ds = (p * (dp - delta) * scale).astype(q.dtype)
  dq = jnp.einsum("bmgts,bsmd->btmgd", ds, k).reshape(b, t, n, d)
  dk = jnp.einsum("bmgts,btmgd->bsmd", ds, qg)
  return dq, dk, dv, None


einsum_attention.defvjp(_attention_fwd, _attention_bwd)


def cached_attention(q, k, v, mask, scale):
  """Softmax attention over a KV cache (forward only): q [B,T,H,K]; the cache in the layouts the
  two matmuls read without a transpose, k [B,N,K,S] and v [B,N,S,K]; mask [B,T,S].

  The training layout [B,S,N,K] would make XLA transpose every layer's whole cache on every decode
  step before each matmul; at batch 64 those copies, not the arithmetic, set the step time.
  """
  b, t, n, d = q.shape
  m = k.shape[1]
  qg = q.reshape(b, t, m, n // m, d).transpose(0, 2, 3, 1, 4).reshape(b, m, -1, d)  # [B,N,R*T,K]
  s = jnp.einsum("bmqd,bmds->bmqs", qg, k, preferred_element_type=jnp.float32) * scale
  s = s.reshape(b, m, n // m, t, -1)
  s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1).reshape(b, m, -1, s.shape[-1])
  out = jnp.einsum("bmqs,bmsd->bmqd", p.astype(v.dtype), v)                       # [B,N,R*T,K]
  return out.reshape(b, m, n // m, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


class Attention(nn.Module):
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, positions, segment_ids, layer_cache, cache_segment_ids, cache_index,
               is_local):
    """`is_local`: whether this layer uses the sliding window (a traced bool under the layer
    scan, a Python bool per layer with a cache); None when the model has no local layers."""
    cfg = self.cfg
    dt, pdt = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
    init = nn.initializers.normal(0.02)
    qkv_bias = cfg.use_bias if cfg.qkv_bias is None else cfg.qkv_bias
    dense = lambda feats, names, name: nn.DenseGeneral(
        feats, axis=-1, use_bias=qkv_bias, dtype=dt, param_dtype=pdt, name=name,
        kernel_init=_init(names, init),
        bias_init=_init(names[1:], nn.initializers.zeros))
    q = dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"), "query")(x)
    k = dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), "key")(x)
    v = dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), "value")(x)
    if cfg.qk_norm:
      offset = cfg.norm == "gemma_rmsnorm"
      q = RMSNorm(eps=cfg.norm_eps, dtype=dt, offset=offset, name="query_norm")(q)
      k = RMSNorm(eps=cfg.norm_eps, dtype=dt, offset=offset, name="key_norm")(k)
    if cfg.positional == "rope":
      freqs = rope_frequencies(cfg)
      if is_local is not None and cfg.rope_local_theta:
        freqs = jnp.where(is_local, rope_frequencies(cfg, local=True), freqs)
      q = rope(q, positions, freqs)
      k = rope(k, positions, freqs)

    t = x.shape[1]
    q_slots = jnp.arange(t)
    scale = cfg.attn_scale or cfg.head_dim ** -0.5

    def windowed(mask, q_slots):
      # Local layers add the sliding window to the mask; global layers keep the plain one.
      if is_local is None:
        return mask
      local = attention_mask(q_slots, segment_ids, mask_segments, cfg.sliding_window)
      return jnp.where(is_local, local, mask)

    impl = cfg.attention_impl
    if impl is None and jax.default_backend() == "cpu":
      impl = "einsum"
    if layer_cache is not None:
      # Write this call's keys and values at slots [cache_index, cache_index + T) and attend over
      # the whole cache; empty slots have segment 0 and are masked like padding.
      ck = jax.lax.dynamic_update_slice(
          layer_cache["k"], k.transpose(0, 2, 3, 1).astype(layer_cache["k"].dtype),
          (0, 0, 0, cache_index))
      cv = jax.lax.dynamic_update_slice(
          layer_cache["v"], v.transpose(0, 2, 1, 3).astype(layer_cache["v"].dtype),
          (0, 0, cache_index, 0))
      layer_cache = {"k": ck, "v": cv}
      mask_segments = cache_segment_ids
      mask = attention_mask(q_slots + cache_index, segment_ids, cache_segment_ids)  # [B,T,S]
      mask = windowed(mask, q_slots + cache_index)
      if t == 1 or impl == "einsum":
        out = cached_attention(q, ck.astype(dt), cv.astype(dt), mask, scale)
      else:
        # A long prefill on an accelerator keeps the fused kernel (e.g. cuDNN flash attention),
        # which wants [B,S,N,K]: one transpose per prefill, never per decoded token.
        out = jax.nn.dot_product_attention(
            q, ck.transpose(0, 3, 1, 2).astype(dt), cv.transpose(0, 2, 1, 3).astype(dt),
            mask=mask[:, None], scale=scale, implementation=impl)
    else:
      mask_segments = segment_ids
      mask = windowed(attention_mask(q_slots, segment_ids, segment_ids), q_slots)[:, None]
      if impl == "einsum":                                                         # [B,1,T,S]
        out = einsum_attention(q, k, v, mask, scale)
      else:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                           implementation=impl)
    out = nn.Dropout(cfg.dropout_rate)(out, deterministic=self.deterministic)
    out = nn.DenseGeneral(
        cfg.d_model, axis=(-2, -1), use_bias=cfg.use_bias if cfg.out_bias is None else cfg.out_bias,
        dtype=dt, param_dtype=pdt, name="out",
        # GPT-2 scales residual-branch outputs by 1/sqrt(2L) so the residual stream's variance
        # does not grow with depth.
        kernel_init=_init(("heads", "head_dim", "embed"),
                          nn.initializers.normal(0.02 / (2 * cfg.num_layers) ** 0.5)),
        bias_init=_init(("embed",), nn.initializers.zeros))(out)
    return out, layer_cache


class MLP(nn.Module):
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dt, pdt = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
    dense = lambda feats, names, name, std=0.02: nn.Dense(
        feats, use_bias=cfg.use_bias if cfg.mlp_bias is None else cfg.mlp_bias, dtype=dt, param_dtype=pdt, name=name,
        kernel_init=_init(names, nn.initializers.normal(std)),
        bias_init=_init(names[1:], nn.initializers.zeros))
    if cfg.activation in ("swiglu", "geglu"):
      gate = dense(cfg.mlp_dim, ("embed", "mlp"), "gate")(x)
      gate = nn.silu(gate) if cfg.activation == "swiglu" else gelu_tanh(gate)
      h = gate * dense(cfg.mlp_dim, ("embed", "mlp"), "up")(x)
    else:
      h = dense(cfg.mlp_dim, ("embed", "mlp"), "fc")(x)
      if cfg.activation == "gelu_tanh":
        h = gelu_tanh(h)
      elif cfg.activation == "gelu":
        h = nn.gelu(h, approximate=False)
      else:
        h = nn.relu(h)
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
    return dense(cfg.d_model, ("mlp", "embed"), "proj", 0.02 / (2 * cfg.num_layers) ** 0.5)(h)


class Block(nn.Module):
  """Pre-norm residual block. Training scans it over layers (the carry is x; `layer_cache` is
  None; `is_local` is this layer's entry of the per-layer flags, or None); cached decoding calls
  it once per layer with that layer's k/v buffers. With `post_norms` (Gemma) each branch's output
  is normalised again before it joins the residual stream."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, layer_cache, is_local, ctx):
    positions, segment_ids, cache_segment_ids, cache_index = ctx
    cfg = self.cfg
    h, layer_cache = Attention(cfg, self.deterministic, name="attn")(
        make_norm(cfg, "ln_attn")(x), positions, segment_ids, layer_cache, cache_segment_ids,
        cache_index, is_local)
    if cfg.post_norms:
      h = make_norm(cfg, "ln_attn_out")(h)
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
    h = MLP(cfg, self.deterministic, name="mlp")(make_norm(cfg, "ln_mlp")(x))
    if cfg.post_norms:
      h = make_norm(cfg, "ln_mlp_out")(h)
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
    return x, layer_cache


class GPT(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, inputs, positions=None, segment_ids=None, *, cache=None, cache_index=0,
               deterministic: bool = True, compute_logits: bool = True) -> ModelOutput:
    cfg = self.cfg.resolved()
    dt, pdt = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
    b, t = inputs.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)

    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=pdt, name="embed",
                     embedding_init=_init(("vocab", "embed"), nn.initializers.normal(0.02)))
    x = embed(inputs)
    if cfg.embed_scale:
      # In the embedding's dtype, as Gemma rounds it (sqrt(D) in bfloat16 is not sqrt(D)).
      x = x * jnp.asarray(cfg.d_model ** 0.5, jnp.float32).astype(x.dtype)
    if cfg.positional == "learned":
      pos = nn.Embed(cfg.max_len, cfg.d_model, dtype=dt, param_dtype=pdt, name="pos_embed",
                     embedding_init=_init(("pos", "embed"), nn.initializers.normal(0.01)))
      x = x + pos(positions)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)

    block = Block
    if cfg.remat != "none":
      policy = (jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
                if cfg.remat == "dots" else None)
      block = nn.remat(Block, policy=policy, prevent_cse=False)
    new_cache = None
    if cache is None or self.is_initializing():
      stack = nn.scan(block, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(0, 0, nn.broadcast), length=cfg.num_layers,
                      unroll=cfg.scan_unroll or cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      local_flags = None                                                           # [L] bool
      if "l" in cfg.layer_types:
        local_flags = jnp.array([c == "l" for c in cfg.layer_types])
      x, _ = stack(cfg, deterministic, name="blocks")(
          x, None, local_flags, (positions, segment_ids, None, 0))
    else:
      x, new_cache = self._cached_layers(x, positions, segment_ids, cache, cache_index,
                                         deterministic)
    hidden = make_norm(cfg, "ln_final")(x)

    logits = None
    if compute_logits or self.is_initializing():
      if cfg.tie_embeddings:
        logits = embed.attend(hidden)
      else:
        logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=pdt,
                          name="lm_head",
                          kernel_init=_init(("embed", "vocab"), nn.initializers.normal(0.02)))(hidden)
      logits = logits.astype(jnp.float32)
      if cfg.final_logit_softcap:
        logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)

    values = None
    if cfg.scalar_head:
      d = cfg.d_model
      values = nn.Dense(1, dtype=jnp.float32, param_dtype=pdt, name="scalar_head",
                        kernel_init=_init(("embed", None), nn.initializers.normal((d + 1) ** -0.5)),
                        bias_init=_init((None,), nn.initializers.zeros))(
                            hidden.astype(jnp.float32))[..., 0]

    return ModelOutput(logits=logits, hidden=hidden, values=values, cache=new_cache)

  def _cached_layers(self, x, positions, segment_ids, cache, cache_index, deterministic):
    """The layers, unrolled in Python, each reading and writing its own cache buffer.

    Parameters are the scanned "blocks" tree ([L, ...] leaves), so checkpoints and shardings are
    the training ones; layer i runs `Block` on slice i of it. Same modules, same arithmetic as
    the scan, so cached logits equal full-forward logits.
    """
    cfg = self.cfg.resolved()
    if len(cache["k"]) != cfg.num_layers:
      raise ValueError(f"KV cache has {len(cache['k'])} layers, model has {cfg.num_layers}; "
                       "build it with gptjax.model.init_cache")
    # Slots written by this call take the segment ids of the tokens written there.
    cache_segment_ids = jax.lax.dynamic_update_slice(
        cache["segment_ids"], segment_ids.astype(jnp.int32), (0, cache_index))
    stacked = nn.meta.unbox(self.variables["params"]["blocks"])
    rngs = {"dropout": self.make_rng("dropout")} if not deterministic else {}
    ctx = (positions, segment_ids, cache_segment_ids, cache_index)
    ks, vs = [], []
    for i in range(cfg.num_layers):
      layer_params = jax.tree.map(lambda a, i=i: a[i], stacked)
      is_local = (cfg.layer_types[i] == "l") if "l" in cfg.layer_types else None
      x, lc = Block(cfg, deterministic, parent=None).apply(
          {"params": layer_params}, x, {"k": cache["k"][i], "v": cache["v"][i]}, is_local, ctx,
          rngs={k: jax.random.fold_in(r, i) for k, r in rngs.items()})
      ks.append(lc["k"])
      vs.append(lc["v"])
    return x, {"k": tuple(ks), "v": tuple(vs), "segment_ids": cache_segment_ids}


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def matmul_params(cfg: ModelConfig, *, lm_head: bool = True) -> int:
  """N of the FLOPs formula: the non-embedding matmul weights plus the LM head (or a scalar head).

  The embedding lookup is free, the head projection is not. Norm scales and biases are left out:
  they cost O(D) FLOPs per token, not O(D²).
  """
  cfg = cfg.resolved()
  d, l, f = cfg.d_model, cfg.num_layers, cfg.mlp_dim
  kv = cfg.num_kv_heads * cfg.head_dim
  attn = d * d * 2 + d * kv * 2
  mlp = d * f * (3 if cfg.activation in ("swiglu", "geglu") else 2)
  return l * (attn + mlp) + (d * cfg.vocab_size if lm_head else d)


def flops_per_token(cfg: ModelConfig, seq_len: int, *, lm_head: bool = True) -> float:
  """Training FLOPs per token: 6·N for the matmuls plus 12·L·T·D for attention (PaLM appendix B).

  N is `matmul_params`. A reward model never runs the LM head: pass `lm_head=False`.
  """
  cfg = cfg.resolved()
  n = matmul_params(cfg, lm_head=lm_head)
  return 6.0 * n + 12.0 * cfg.num_layers * seq_len * cfg.d_model
