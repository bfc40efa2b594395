"""Wall time and peak host memory of importing a Hugging Face model of Qwen2.5-0.5B's shape.

    flock /tmp/gptjax-heavy.lock nice python benchmarks/hf_load.py [--dir /tmp/qwen05_random]

The script writes the model itself (random bf16 weights in Qwen2.5-0.5B's shapes, config.json,
sharded safetensors of ≤ 500 MB, as the Hub's larger models are): nothing is downloaded. Each
measurement is a fresh child process that starts jax's backend, notes its RSS, runs
`gptjax.hf.load_pretrained` and blocks on the result; it reports the load's wall time and the
peak RSS (getrusage) above the RSS before loading. Target: that increase under 1.5× the loaded
parameters' bytes (loading must not hold a second full copy on the host). Median of --repeats
children per dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

# Qwen2.5-0.5B(-Instruct) config.json, the fields that set shapes and math.
QWEN05 = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "tie_word_embeddings": True,
    "hidden_act": "silu", "use_sliding_window": False, "sliding_window": 32768,
    "max_window_layers": 21, "bos_token_id": 151643, "eos_token_id": 151645,
    "torch_dtype": "bfloat16", "attention_dropout": 0.0, "initializer_range": 0.02,
    "use_cache": True,
}


def write_model(out: str, shard_bytes: int = 500 * 1024 ** 2) -> int:
  """Writes the random model; returns its parameter count."""
  import ml_dtypes
  from safetensors.numpy import save_file
  c = QWEN05
  d, f, v, h, n = (c["hidden_size"], c["intermediate_size"], c["vocab_size"],
                   c["num_attention_heads"], c["num_key_value_heads"])
  k = d // h
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes.update({
        p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        p + "self_attn.q_proj.weight": (h * k, d), p + "self_attn.q_proj.bias": (h * k,),
        p + "self_attn.k_proj.weight": (n * k, d), p + "self_attn.k_proj.bias": (n * k,),
        p + "self_attn.v_proj.weight": (n * k, d), p + "self_attn.v_proj.bias": (n * k,),
        p + "self_attn.o_proj.weight": (d, h * k), p + "mlp.gate_proj.weight": (f, d),
        p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f)})
  os.makedirs(out, exist_ok=True)
  rng = np.random.default_rng(0)
  shards, current, size, count = [], {}, 0, 0
  for name, shape in shapes.items():
    x = (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    if current and size + x.nbytes > shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = x
    size += x.nbytes
    count += x.size
  shards.append(current)
  weight_map = {}
  for j, shard in enumerate(shards):
    file = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(out, file), metadata={"format": "pt"})
    weight_map.update({name: file for name in shard})
  with open(os.path.join(out, "model.safetensors.index.json"), "w") as fh:
    json.dump({"metadata": {"total_size": count * 2}, "weight_map": weight_map}, fh)
  with open(os.path.join(out, "config.json"), "w") as fh:
    json.dump(c, fh)
  return count


CHILD = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp
from gptjax import hf

def rss_mb():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024

jax.block_until_ready(jnp.zeros(8))     # the CPU backend's own memory is not the load's
before = rss_mb()
start = time.perf_counter()
model, params, _ = hf.load_pretrained(sys.argv[1], dtype=getattr(jnp, sys.argv[2]))
jax.block_until_ready(params)
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
print(json.dumps({"wall_s": wall, "rss_before_mb": before, "peak_rss_mb": peak,
                  "param_mb": nbytes / 2 ** 20}))
"""


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dir", default="/tmp/gptjax_qwen05_random")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dtypes", default="bfloat16,float32")
  args = ap.parse_args()
  if not os.path.exists(os.path.join(args.dir, "config.json")):
    count = write_model(args.dir)
    print(f"wrote a random Qwen2.5-0.5B-shaped model ({count / 1e6:.0f}M parameters, bf16) "
          f"to {args.dir}")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  for dtype in args.dtypes.split(","):
    runs = []
    for _ in range(args.repeats):
      out = subprocess.run([sys.executable, "-c", CHILD, args.dir, dtype], env=env,
                           capture_output=True, text=True, check=True)
      runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    wall = statistics.median(r["wall_s"] for r in runs)
    extra = statistics.median(r["peak_rss_mb"] - r["rss_before_mb"] for r in runs)
    param = runs[0]["param_mb"]
    walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
    print(f"{dtype:9s} params {param:7.0f} MB | load wall {wall:5.1f} s (median of {len(runs)}: "
          f"{walls}) | peak RSS above start "
          f"{extra:6.0f} MB = {extra / param:.2f}x params (target < 1.5x) | peak RSS "
          f"{statistics.median(r['peak_rss_mb'] for r in runs):6.0f} MB")


if __name__ == "__main__":
  main()
