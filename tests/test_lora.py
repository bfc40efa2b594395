"""LoRA through qwix: zero-init parity, gradients reach adapters only, adapters-off reference,
merge parity, PEFT round trip, and LoRA SFT/RM/DPO/PPO/GRPO micro runs."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import lora
from gptjax.model import GPT, ModelConfig

CFG = ModelConfig(vocab_size=61, num_layers=2, num_heads=4, num_kv_heads=2, d_model=32,
                  max_len=32, variant="llama", scalar_head=True)
SPEC = lora.LoraSpec(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "mlp"))


def _init(model, seed=0):
  x = jnp.zeros((1, 8), jnp.int32)
  return nn.meta.unbox(model.init(jax.random.key(seed), x)["params"])


def _apply(model, params, x):
  return jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)


def _tokens(b=3, t=12, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)


@pytest.fixture(scope="module")
def setup():
  model = lora.wrap(GPT(CFG), SPEC)
  params = _init(model)
  trainable, base = lora.split(params)
  return model, params, trainable, base


def _randomise(trainable, seed=3):
  leaves, tdef = jax.tree.flatten(trainable)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tdef, [0.05 * jax.random.normal(k, x.shape) for k, x in
                                   zip(keys, leaves)])


def test_split_holds_only_adapters_and_head(setup):
  model, params, trainable, base = setup
  flat = lora._flatten(trainable)
  assert flat and all(p[-1].endswith(("_lora_a", "_lora_b")) or "scalar_head" in p for p in flat)
  # Every targeted kernel got an adapter: 4 attention + 3 swiglu projections.
  assert sum(p[-1] == "kernel_lora_a" for p in flat) == 7
  assert not any(p[-1].endswith(("_lora_a", "_lora_b")) for p in lora._flatten(base))
  assert lora.count(trainable) + lora.count(base) == lora.count(params)


def test_zero_init_logits_equal_base(setup):
  model, params, _, base = setup
  x = _tokens()
  out = _apply(model, params, x)
  ref = _apply(lora.base_model(model), lora.strip_adapters(params), x)
  np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(ref.logits))
  np.testing.assert_array_equal(np.asarray(out.values), np.asarray(ref.values))


@pytest.mark.parametrize("base_quant", [None, "nf4"])
def test_bfloat16_compute_keeps_its_dtype_and_zero_adapters_equal_the_base(base_quant):
  """Under bfloat16 compute a LoRA model initialises and runs (qwix's float32 adapter term used to
  turn the layer scan's bfloat16 carry float32, and init failed); with B = 0 the logits are
  bitwise the adapters-off model's, and trained adapters change them. (The logits themselves are
  float32 by the model's design, bfloat16 or not.)"""
  import dataclasses
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  spec = dataclasses.replace(SPEC, base_quant=base_quant)
  model = lora.wrap(GPT(cfg), spec)
  params = _init(model)
  if base_quant is not None:
    from gptjax import qlora
    params = qlora.quantize_base(params, spec)
  x = _tokens()
  out = _apply(model, params, x).logits
  base = _apply(*lora.reference(model, params), x).logits
  np.testing.assert_array_equal(np.asarray(out), np.asarray(base))
  trainable, frozen = lora.split(params)
  moved = _apply(model, lora.combine(frozen, _randomise(trainable)), x).logits
  assert not np.array_equal(np.asarray(moved), np.asarray(out))


def test_gradients_reach_adapters_only(setup):
  model, params, trainable, base = setup
  x = _tokens()
  trainable = _randomise(trainable)

  def loss(tr, base):
    out = model.apply({"params": lora.combine(base, tr)}, x)
    return jnp.mean(jax.nn.log_softmax(out.logits)[..., 0]) + jnp.mean(out.values)

  g_tr, g_base = jax.jit(jax.grad(loss, argnums=(0, 1)))(trainable, base)
  # Every adapter leaf and the head get a non-zero gradient...
  for path, g in lora._flatten(g_tr).items():
    assert float(jnp.abs(g).max()) > 0, path
  # ...and differentiating with respect to the trainable tree alone (what the step does) gives
  # exactly the same gradient: the base enters as a constant.
  g_only = jax.jit(jax.grad(loss))(trainable, base)
  for a, b in zip(jax.tree.leaves(g_only), jax.tree.leaves(g_tr)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_reference_with_adapters_off_equals_base(setup):
  model, params, trainable, base = setup
  x = _tokens()
  trained = lora.combine(base, _randomise(trainable))
  policy = _apply(model, trained, x).logits
  ref = _apply(lora.base_model(model), lora.strip_adapters(trained), x).logits
  plain = _apply(GPT(CFG), lora.strip_adapters(params), x).logits
  np.testing.assert_array_equal(np.asarray(ref), np.asarray(plain))
  assert float(jnp.abs(policy - plain).max()) > 1e-3       # the adapters do change the policy


def test_merge_then_forward_equals_unmerged(setup):
  model, params, trainable, base = setup
  x = _tokens()
  trained = lora.combine(base, _randomise(trainable))
  unmerged = _apply(model, trained, x).logits
  merged = _apply(GPT(CFG), lora.merge(trained, SPEC), x).logits
  np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=2e-5, rtol=1e-5)


def test_cached_decoding_sees_adapters(setup):
  from gptjax.model import init_cache
  model, params, trainable, base = setup
  x = _tokens(2, 10)
  trained = lora.combine(base, _randomise(trainable))
  full = _apply(model, trained, x).logits
  cached = jax.jit(lambda p, x: model.apply({"params": p}, x, cache=init_cache(CFG, 2, 16),
                                            cache_index=0).logits)(trained, x)
  np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=2e-5, rtol=1e-5)


def test_gpt2_targets_and_bad_spec():
  from gptjax.config import ConfigError
  cfg = ModelConfig(vocab_size=50, num_layers=1, num_heads=2, d_model=16, max_len=16)
  params = _init(lora.wrap(GPT(cfg), lora.LoraSpec(rank=2, targets=("q", "mlp"))))
  names = {p[-2] for p in lora._flatten(lora.split(params)[0])}
  assert names == {"query", "fc", "proj"}
  with pytest.raises(ConfigError, match="model.lora.targets: unknown target 'qq'"):
    lora.spec_from_dict({"rank": 4, "targets": ("qq",)})
  with pytest.raises(ConfigError, match="model.lora.base_quant: expected None, 'int8' or 'nf4', "
                     "got 'int3'"):
    lora.spec_from_dict({"rank": 4, "base_quant": "int3"})
  assert lora.spec_from_dict({"rank": 4, "base_quant": "nf4"}).base_quant == "nf4"
  assert lora.spec_from_dict({"rank": 4, "base_quant": "none"}).base_quant is None
  assert lora.spec_from_dict({"rank": 0}) is None


# --------------------------------------------------------------------------------------------
# QLoRA: the frozen base stored int8 or nf4 (gptjax/qlora.py)
# --------------------------------------------------------------------------------------------

def _kernel(shape, seed=0):
  w = 0.02 * jax.random.normal(jax.random.key(seed), shape)
  # One outlier per kernel, so absmax scaling has something to do.
  return w.at[(0,) * len(shape)].set(0.3)


def test_int8_per_channel_absmax_error_is_at_most_half_a_step():
  from gptjax import qlora
  # A scanned attention output kernel: [L, heads, head_dim, D], contracting (heads, head_dim).
  w = _kernel((2, 4, 8, 32)).at[1, :, :, 5].set(0.0)        # one all-zero output channel
  q = qlora.quantize_kernel(w, "int8", contracting=2, output=1)
  assert q.codes.dtype == jnp.int8 and q.codes.shape == w.shape
  assert q.scales.shape == (2, 32) and q.shape == w.shape
  scale = np.asarray(q.scales)[:, None, None, :]
  # Per layer and output channel: the scale is that channel's absmax over the contracting dims.
  absmax = np.abs(np.asarray(w)).max(axis=(1, 2), keepdims=True)
  # (XLA may divide by 127 as a multiply by 1/127: one float32 ulp either way.)
  np.testing.assert_allclose(scale, absmax / np.float32(127), rtol=2e-7, atol=0)
  err = np.abs(np.asarray(q.dequantize()) - np.asarray(w))
  # Rounding to the nearest code is off by at most half a step; the 1e-6 covers the float32
  # rounding of w / scale and of code * scale.
  assert np.all(err <= scale / 2 * (1 + 1e-6)), float((err / scale).max())
  assert float(err.max()) > 0                                 # it did quantize
  assert not np.asarray(q.dequantize())[1, :, :, 5].any()     # a zero channel stays zero
  assert q.nbytes == w.size + 4 * 2 * 32


def test_nf4_codes_are_the_16_levels_with_per_block_absmax():
  from qwix._src.core import numerics
  from gptjax import qlora
  # The levels derived from normal quantiles equal qwix's table of QLoRA's appendix E.
  np.testing.assert_allclose(qlora.NF4_LEVELS, np.asarray(numerics.get_nf4_buckets()), atol=3e-7)
  # [L, in, out] with 33 * 7 = 231 weights per layer: 3 full blocks of 64 and a padded one.
  w = _kernel((2, 33, 7), seed=1)
  q = qlora.quantize_kernel(w, "nf4", contracting=1, output=1)
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == (2, 4, 32)   # two codes per byte
  assert q.scales.shape == (2, 4) and q.shape == w.shape
  codes = np.stack([np.asarray(q.codes) & 15, np.asarray(q.codes) >> 4], -1).reshape(2, -1)
  flat = np.pad(np.asarray(w).reshape(2, -1), ((0, 0), (0, 4 * 64 - 231)))
  blocks = flat.reshape(2, 4, 64)
  absmax = np.abs(blocks).max(-1)
  np.testing.assert_array_equal(np.asarray(q.scales), absmax)
  normed = (blocks / absmax[..., None]).reshape(2, -1)
  # Each weight got the level nearest to w / absmax (ties either way)...
  dist = np.abs(normed[..., None] - qlora.NF4_LEVELS)
  chosen = np.take_along_axis(dist, codes[..., None].astype(np.int64), -1)[..., 0]
  np.testing.assert_allclose(chosen, dist.min(-1), atol=1e-7)
  # ...so every dequantized weight is a level times its block's absmax, the block's largest
  # weight comes back exactly, and the error is at most half the widest gap between levels.
  deq = np.pad(np.asarray(q.dequantize()).reshape(2, -1), ((0, 0), (0, 4 * 64 - 231)))
  np.testing.assert_array_equal(deq.reshape(2, 4, 64),
                                qlora.NF4_LEVELS[codes].reshape(2, 4, 64) * absmax[..., None])
  np.testing.assert_array_equal(np.abs(deq.reshape(2, 4, 64)).max(-1), absmax)
  half_gap = np.diff(qlora.NF4_LEVELS).max() / 2
  err = np.abs(deq - flat).reshape(2, 4, 64)
  assert np.all(err <= absmax[..., None] * half_gap * (1 + 1e-6))
  assert q.nbytes == 2 * 4 * 32 + 4 * 2 * 4


QSPECS = {kind: lora.LoraSpec(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "mlp"),
                              base_quant=kind) for kind in ("int8", "nf4")}


@pytest.fixture(scope="module", params=["int8", "nf4"])
def qsetup(request):
  spec = QSPECS[request.param]
  model = lora.wrap(GPT(CFG), spec)
  trainable, base = lora.split(_init(model))
  return spec, model, trainable, lora.quantize_base(base, spec)


def test_qlora_frozen_base_is_stored_quantized(qsetup):
  from gptjax import qlora
  spec, model, trainable, qbase = qsetup
  flat = lora._flatten(qbase)
  quantized = {p for p, v in flat.items() if qlora.is_quantized(v)}
  # All 7 targeted kernels of the layer stack, nothing else (embeddings, norms, the LM head).
  assert {p[-2] for p in quantized} == {"query", "key", "value", "out", "gate", "up", "proj"}
  assert all(p[0] == "blocks" for p in quantized)
  stored, fp32 = qlora.quantized_nbytes(qbase)
  n = fp32 // 4
  if spec.base_quant == "int8":
    # 1 byte a weight plus one float32 scale per output channel and layer.
    out_channels = sum(int(np.prod(flat[p].array.scales.shape)) for p in quantized)
    assert stored == n + 4 * out_channels and stored / fp32 < 0.3
  else:
    # Half a byte a weight plus one float32 absmax per block of 64 (none of these kernels
    # needs padding): 0.5625 bytes a weight, 1/7.1 of float32.
    assert stored == n // 2 + 4 * (n // 64) and stored / fp32 == pytest.approx(0.140625)
  # The leaves really are int8 / uint8 codes and float32 scales.
  dtypes = {str(x.dtype) for p in quantized for x in jax.tree.leaves(flat[p])}
  assert dtypes == {"int8" if spec.base_quant == "int8" else "uint8", "float32"}
  # Quantizing again keeps the codes (the stages quantize once; the trainer's call is a no-op).
  again = lora._flatten(lora.quantize_base(qbase, spec))
  assert all(again[p] is flat[p] for p in quantized)


def test_qlora_zero_adapters_equal_the_dequantized_base_exactly(qsetup):
  from gptjax import qlora
  spec, model, trainable, qbase = qsetup
  x = _tokens()
  params = lora.combine(qbase, trainable)
  out = _apply(model, params, x)
  # A plain GPT whose kernels are the dequantized base: the same computation, bit for bit.
  plain = _apply(GPT(CFG), lora.strip_adapters(qlora.dequantize_base(params)), x)
  np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(plain.logits))
  np.testing.assert_array_equal(np.asarray(out.values), np.asarray(plain.values))
  # The reference policy: the same quantized base with the adapters off.
  ref = _apply(lora.base_model(model), lora.strip_adapters(params), x)
  np.testing.assert_array_equal(np.asarray(ref.logits), np.asarray(plain.logits))
  # Quantization did change the network (the base is not silently left in float).
  full = _apply(GPT(CFG), lora.strip_adapters(_init(model)), x)
  assert float(jnp.abs(full.logits - plain.logits).max()) > 1e-5


def test_qlora_adapters_add_exactly_their_term(qsetup):
  """The adapters act on the dequantized matmul: logits equal a plain GPT whose kernels are
  dequantized base + A·B·alpha/rank (a forward that dropped the adapters would equal the base)."""
  spec, model, trainable, qbase = qsetup
  x = _tokens()
  trained = lora.combine(qbase, _randomise(trainable))
  got = _apply(model, trained, x).logits
  want = _apply(GPT(CFG), lora.merge(trained, spec), x).logits
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
  base_only = _apply(lora.base_model(model), lora.strip_adapters(trained), x).logits
  assert float(jnp.abs(got - base_only).max()) > 1e-2
  # Cached decoding (sampling, rollouts) reads the same quantized kernels and adapters.
  from gptjax.model import init_cache
  cached = jax.jit(lambda p, x: model.apply({"params": p}, x, cache=init_cache(CFG, 3, 16),
                                            cache_index=0).logits)(trained, x)
  np.testing.assert_allclose(np.asarray(cached), np.asarray(got), atol=2e-5, rtol=1e-5)


def test_qlora_gradients_reach_adapters_only(qsetup):
  spec, model, trainable, qbase = qsetup
  x = _tokens()
  trainable = _randomise(trainable)

  def loss(tr):
    out = model.apply({"params": lora.combine(qbase, tr)}, x)
    return jnp.mean(jax.nn.log_softmax(out.logits)[..., 0]) + jnp.mean(out.values)

  grads = jax.jit(jax.grad(loss))(trainable)
  # The gradient tree is the trainable tree (adapters and the head), and every leaf of it moves:
  # through the dequantized matmuls too, for every targeted kernel.
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  for path, g in lora._flatten(grads).items():
    assert float(jnp.abs(g).max()) > 0, path


# --------------------------------------------------------------------------------------------
# End to end: LoRA GRPO and PPO micro runs
# --------------------------------------------------------------------------------------------

RL_CONFIG = __import__("os").path.join(__import__("os").path.dirname(__file__), "..",
                                       "experiments", "rl.py")
LORA = ("model.lora.rank=4", "model.lora.alpha=16.0", "optim.lr=0.01", "rl.iterations=2")


def _rl(preset, workdir, *overrides):
  from gptjax import config as config_lib
  from gptjax.stages import run_stage
  cfg = config_lib.load(f"{RL_CONFIG}:{preset}", list(overrides))
  return cfg, run_stage(cfg, str(workdir), progress=False)


def _iterations(workdir):
  import json
  with open(workdir / "rl_iterations.jsonl") as f:
    return [json.loads(l) for l in f]


@pytest.mark.parametrize("preset, value_model", [("grpo_micro", "none"), ("ppo_micro", "head"),
                                                  ("ppo_micro", "critic")])
def test_lora_rl_micro_run(tmp_path, preset, value_model):
  # value_model=critic: PPO's {'policy', 'critic'} tree, both with adapters; its workdir loads as
  # the plain policy GPT like the others.
  from gptjax import checkpoint as ckpt_lib
  from gptjax.stages import rl as rl_stage
  cfg, res = _rl(preset, tmp_path, *LORA, f"rl.value_model={value_model}")
  assert ("critic" in res.state.params) == (value_model == "critic")
  its = _iterations(tmp_path)
  assert len(its) == 2
  # Iteration 0: the policy is the base (B = 0) and the reference is the base with the adapters
  # off, so the KL is exactly zero; afterwards the adapters have moved the policy. PPO's rl/kl is
  # the k1 estimate (log π − log π_ref summed over sampled tokens), whose sample mean of a small
  # true KL can have either sign, so the check is that it is no longer zero.
  assert its[0]["rl/kl"] == 0.0 and its[-1]["rl/kl"] != 0.0
  # The checkpoint holds adapters (+ the value head for PPO) and their optimizer state only.
  model = rl_stage.build_model(cfg)
  full = _init(model)
  trainable_abs, base_abs = lora.split(full)
  ckpt = ckpt_lib.restore_params(str(tmp_path), trainable_abs)
  assert lora.count(ckpt) == lora.count(trainable_abs) < lora.count(full) // 4
  state = res.state
  # The base the hooks saw is the initial (fresh, seeded) base, untouched by training.
  init = jax.jit(lambda r: nn.meta.unbox(model.init(r, jnp.zeros((1, 8), jnp.int32))["params"]))(
      jax.random.fold_in(jax.random.key(cfg.seed), 0))
  for path, x in lora._flatten(lora.split(init)[1]).items():
    np.testing.assert_array_equal(np.asarray(x), np.asarray(lora._flatten(state.params)[path]))
  # Loading the workdir as a plain GPT merges the adapters: same logits as the trained policy.
  pol, params, _ = ckpt_lib.load_for_inference(str(tmp_path))[:3]
  x = _tokens(2, 10, seed=5) % cfg.model.vocab_size
  want = _apply(model, state.params, x).logits
  got = _apply(pol, params, x).logits
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_qlora_grpo_micro_run_reference_is_the_quantized_base(tmp_path):
  """GRPO with an nf4 base: at iteration 0 the KL to the reference is exactly zero, which holds
  only if the reference reads the same quantized base as the policy (a float reference would
  differ by the quantization error); the adapters then move the policy."""
  from gptjax import qlora
  cfg, res = _rl("grpo_micro", tmp_path, *LORA, "model.lora.base_quant=nf4")
  its = _iterations(tmp_path)
  assert len(its) == 2
  assert its[0]["rl/kl"] == 0.0 and its[-1]["rl/kl"] != 0.0
  assert any(qlora.is_quantized(v) for v in lora._flatten(res.state.params).values())


def _llama_state_dict(params, cfg):
  """Our Llama-style tree as a transformers LlamaForCausalLM state dict (test-side converter)."""
  import torch
  c = cfg.resolved()
  t = lambda x: torch.tensor(np.asarray(x, np.float32))
  sd = {"model.embed_tokens.weight": t(params["embed"]["embedding"]),
        "model.norm.weight": t(params["ln_final"]["scale"]),
        "lm_head.weight": t(np.asarray(params["lm_head"]["kernel"]).T)}
  blk = params["blocks"]
  d = c.d_model
  for i in range(c.num_layers):
    p = f"model.layers.{i}."
    for ours, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      sd[p + f"self_attn.{hf}.weight"] = t(np.asarray(blk["attn"][ours]["kernel"][i]).reshape(d, -1).T)
    sd[p + "self_attn.o_proj.weight"] = t(np.asarray(blk["attn"]["out"]["kernel"][i]).reshape(-1, d).T)
    for ours, hf in (("gate", "gate_proj"), ("up", "up_proj"), ("proj", "down_proj")):
      sd[p + f"mlp.{hf}.weight"] = t(np.asarray(blk["mlp"][ours]["kernel"][i]).T)
    sd[p + "input_layernorm.weight"] = t(blk["ln_attn"]["scale"][i])
    sd[p + "post_attention_layernorm.weight"] = t(blk["ln_mlp"]["scale"][i])
  return sd


def test_peft_round_trip(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  cfg = ModelConfig(vocab_size=61, num_layers=2, num_heads=4, num_kv_heads=2, d_model=32,
                    max_len=32, variant="llama")
  model = lora.wrap(GPT(cfg), SPEC)
  trainable, base = lora.split(_init(model))
  params = lora.combine(base, _randomise(trainable))
  files = lora.export_peft(params, SPEC, str(tmp_path / "adapter"))
  assert [os.path.basename(f) for f in files] == ["adapter_config.json",
                                                  "adapter_model.safetensors"]
  c = cfg.resolved()
  hf_cfg = transformers.LlamaConfig(
      vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.mlp_dim,
      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
      num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, max_position_embeddings=c.max_len,
      rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=False,
      attention_bias=False, mlp_bias=False)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  missing = hf.load_state_dict(_llama_state_dict(base, cfg), strict=False)
  assert not missing.missing_keys or missing.missing_keys == [], missing
  x = _tokens(2, 10)
  plain_ours = np.asarray(_apply(GPT(cfg), base, x).logits)
  with torch.no_grad():
    plain_hf = hf(torch.tensor(np.asarray(x))).logits.numpy()
  np.testing.assert_allclose(plain_hf, plain_ours, atol=2e-4, rtol=1e-4)   # the base matches
  pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    lora_hf = pm(torch.tensor(np.asarray(x))).logits.numpy()
  lora_ours = np.asarray(_apply(model, params, x).logits)
  assert np.abs(lora_ours - plain_ours).max() > 1e-3          # the adapters matter...
  np.testing.assert_allclose(lora_hf, lora_ours, atol=2e-4, rtol=1e-4)   # ...and load equal


# --------------------------------------------------------------------------------------------
# End to end: LoRA SFT, reward model and DPO micro runs
# --------------------------------------------------------------------------------------------

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


def _stage(spec, workdir, *overrides):
  from gptjax import config as config_lib
  from gptjax.stages import run_stage
  cfg = config_lib.load(os.path.join(EXPERIMENTS, spec), list(overrides))
  return cfg, run_stage(cfg, str(workdir), progress=False)


def _losses(workdir):
  import json
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]


def _check_lora_workdir(workdir, model, state, *, trainable_prefixes=()):
  """A LoRA workdir's checkpoint holds the trainable leaves only (adapters, plus any scalar head),
  and it loads as a plain GPT whose logits (and scores) equal the trained LoRA model's."""
  from gptjax import checkpoint as ckpt_lib
  full = _init(model)
  trainable_abs, _ = lora.split(full)
  names = {p[0] for p in lora._flatten(trainable_abs) if not p[-1].endswith(("_lora_a",
                                                                             "_lora_b"))}
  assert names == set(trainable_prefixes), names
  ckpt = ckpt_lib.restore_params(str(workdir), trainable_abs)
  assert lora.count(ckpt) == lora.count(trainable_abs) < lora.count(full) // 4
  plain, params, _, cfg = ckpt_lib.load_for_inference(str(workdir))
  assert not lora.has_adapters(params) and lora.spec_of(plain) is None
  x = _tokens(2, 10, seed=5) % cfg.model.vocab_size
  want, got = _apply(model, state.params, x), _apply(plain, params, x)
  np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), atol=2e-5,
                             rtol=1e-5)
  if trainable_prefixes:
    np.testing.assert_allclose(np.asarray(got.values), np.asarray(want.values), atol=2e-5,
                               rtol=1e-5)
  return ckpt


def test_lora_sft_micro_run(tmp_path):
  """LoRA SFT: the loss falls, the checkpoint holds adapters only, and the workdir loads as a
  plain GPT."""
  cfg, res = _stage("sft.py:micro", tmp_path, "model.lora.rank=4", "train.steps=6",
                    "optim.lr=0.01", "train.eval_every=0", "sft.eval_prompts=0",
                    "train.log_every=1")
  losses = _losses(tmp_path)
  assert len(losses) == 6 and np.mean(losses[-2:]) < losses[0] - 0.05, losses
  _check_lora_workdir(tmp_path, rl_like_model(cfg), res.state)


def rl_like_model(cfg):
  """The stage's LoRA model rebuilt from its recorded config."""
  from gptjax import config as config_lib
  return lora.wrap(GPT(config_lib.model_config(cfg)), lora.spec_from_config(cfg))


def _preference_file(path, n=32, seed=0):
  import json
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for i in range(n):
      p = ["hi", "say", "well", "now"][i % 4]
      good, bad = ("i love it", "i hate it") if rng.random() < 0.5 else ("love you", "go away")
      f.write(json.dumps({"prompt": p, "chosen": good, "rejected": bad}) + "\n")
  return str(path)


def test_lora_reward_model_micro_run_trains_the_scalar_head(tmp_path):
  from gptjax import reward_model
  from gptjax.data.tokenizers import CharTokenizer
  pairs = _preference_file(tmp_path / "pairs.jsonl")
  tok_dir = str(tmp_path / "tok")
  CharTokenizer.from_text("hi say well now i love it hate you go away").save(tok_dir)
  wd = tmp_path / "rm"
  cfg, res = _stage("reward.py:micro", wd, "model.lora.rank=4", "model.lora.alpha=8.0",
                    f"data.source=preference_jsonl:{pairs}",
                    f"data.eval_source=preference_jsonl:{pairs}", f"data.tokenizer={tok_dir}",
                    "train.steps=16", "train.batch_size=8", "optim.lr=0.02",
                    "train.eval_every=16", "train.log_every=16", "data.seq_len=24")
  # The preferences follow one rule (love beats hate/away); the adapters and the head learn it.
  assert res.last_metrics["eval/rm_accuracy"] > 0.9, res.last_metrics
  model = rl_like_model(cfg)
  ckpt = _check_lora_workdir(wd, model, res.state, trainable_prefixes=("scalar_head",))
  # The score head is trained, not just carried: it moved away from its fresh init.
  init = jax.jit(lambda r: nn.meta.unbox(model.init(r, jnp.zeros((1, 8), jnp.int32))["params"]))(
      jax.random.fold_in(jax.random.key(cfg.seed), 0))
  assert float(jnp.abs(ckpt["scalar_head"]["kernel"] - init["scalar_head"]["kernel"]).max()) > 1e-3
  # The RL stages read the LoRA reward model through the usual loader: adapters merged, plus
  # the normalisation bias the stage computed after training.
  scorer = reward_model.load_reward_model(str(wd))
  assert scorer.bias != 0.0
  x = _tokens(2, 10, seed=6) % cfg.model.vocab_size
  np.testing.assert_allclose(np.asarray(_apply(scorer.model, scorer.params, x).values),
                             np.asarray(_apply(model, res.state.params, x).values) + scorer.bias,
                             atol=2e-5)


@pytest.mark.parametrize("base_quant", ["none", "int8"])
def test_lora_dpo_micro_run(tmp_path, base_quant):
  # int8: QLoRA DPO; the first loss is exactly log 2 only if the reference log-probs come from
  # the same quantized base the policy reads.
  pairs = _preference_file(tmp_path / "pairs.jsonl")
  wd = tmp_path / "dpo"
  cfg, res = _stage("rl.py:dpo_micro", wd, "model.lora.rank=4", "model.lora.alpha=16.0",
                    f"model.lora.base_quant={base_quant}",
                    f"data.train_source=preference_jsonl:{pairs}",
                    f"data.eval_source=preference_jsonl:{pairs}", "train.steps=12",
                    "optim.lr=0.01", "train.eval_every=12", "rl.eval_prompts=0",
                    "train.log_every=1")
  losses = _losses(wd)
  # The policy starts as its reference (B = 0, the base with the adapters off): the first loss
  # is exactly log 2, and the adapters then learn the preference.
  assert losses[0] == pytest.approx(np.log(2.0), abs=1e-5)
  assert res.last_metrics["eval/accuracy"] > 0.9 and losses[-1] < losses[0]
  _check_lora_workdir(wd, rl_like_model(cfg), res.state)


def test_qlora_nf4_sft_micro_run_learns_and_resumes_exactly(tmp_path, capsys):
  """QLoRA SFT (nf4 base): the loss falls, the base the trainer keeps is the quantized initial
  one, the workdir loads as a plain GPT with the QLoRA model's logits, and a run stopped at step
  3 and resumed (its base rebuilt and quantized again, never checkpointed) ends bitwise equal to
  a straight run."""
  from gptjax import qlora
  run = lambda wd, steps: _stage(
      "sft.py:micro", wd, "model.lora.rank=4", "model.lora.base_quant=nf4", f"train.steps={steps}",
      "optim.lr=0.01", "optim.decay_steps=6", "train.eval_every=0", "sft.eval_prompts=0",
      "train.log_every=1", "train.checkpoint_every=0")
  cfg, straight = run(tmp_path / "straight", 6)
  losses = _losses(tmp_path / "straight")
  assert len(losses) == 6 and np.mean(losses[-2:]) < losses[0] - 0.05, losses
  model = rl_like_model(cfg)
  assert lora.spec_of(model).base_quant == "nf4"
  # The hooks' view holds the quantized base: every targeted kernel, equal to quantizing the
  # fresh seeded init (SFT micro has no init_from), untouched by training.
  flat = lora._flatten(straight.state.params)
  quantized = [p for p, v in flat.items() if qlora.is_quantized(v)]
  assert len(quantized) == 6                 # gpt2 micro: query key value out fc proj
  init = jax.jit(lambda r: nn.meta.unbox(model.init(r, jnp.zeros((1, 8), jnp.int32))["params"]))(
      jax.random.fold_in(jax.random.key(cfg.seed), 0))
  want = lora._flatten(lora.quantize_base(lora.split(init)[1], lora.spec_of(model)))
  for p in quantized:
    for a, b in zip(jax.tree.leaves(flat[p]), jax.tree.leaves(want[p])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _check_lora_workdir(tmp_path / "straight", model, straight.state)

  split_dir = tmp_path / "split"
  run(split_dir, 3)
  capsys.readouterr()
  _, resumed = run(split_dir, 6)
  assert "resumed from step 3" in capsys.readouterr().out
  for a, b in zip(jax.tree.leaves((straight.state.params, straight.state.opt_state)),
                  jax.tree.leaves((resumed.state.params, resumed.state.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# The objectives registered as one file each (gptjax/objectives/). Each is trained once, from its
# micro preset, with adapters: the objective and the shared update step are the ones a full
# fine-tune runs (LoRA only splits the parameters the step differentiates), so one run checks both
# that the objective trains from its preset and that LoRA reaches it with no LoRA code in it.
# Full fine-tuning through these objectives also runs in the pipeline test (rloo, kto) in
# tests/test_objectives.py.
NEW_OBJECTIVES = ("rloo", "reinforce_pp", "gspo", "kto", "orpo", "simpo")


@pytest.mark.parametrize("name", NEW_OBJECTIVES)
def test_each_new_objective_trains_from_its_preset_with_lora(name, tmp_path):
  from gptjax import objectives
  from gptjax.stages import rl as rl_stage
  over = ["model.lora.rank=4", "model.lora.alpha=16.0", "optim.lr=0.01", "train.log_every=1"]
  online = objectives.get(name).online
  if online:
    over += ["rl.iterations=2"]
  else:
    pairs = _preference_file(tmp_path / "pairs.jsonl")
    over += [f"data.train_source=preference_jsonl:{pairs}", "train.steps=4", "rl.eval_prompts=0"]
  wd = tmp_path / name
  cfg, res = _stage(f"{name}.py:micro", wd, *over)
  losses = _losses(wd)
  assert res.step >= 2 and losses and np.all(np.isfinite(losses)), losses
  if online:
    # The reference is the base with the adapters off, and the policy starts there (B = 0).
    its = _iterations(wd)
    assert len(its) == 2 and its[0]["rl/kl"] == 0.0 and its[-1]["rl/kl"] != 0.0, its
  model = rl_stage.build_model(cfg) if online else rl_like_model(cfg)
  # Training moved the adapters (every B starts at zero).
  b = [v for p, v in lora._flatten(res.state.params).items() if p[-1].endswith("_lora_b")]
  assert b and max(float(jnp.abs(v).max()) for v in b) > 0
  _check_lora_workdir(wd, model, res.state)
