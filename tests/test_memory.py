"""The memory plan (gptjax/memory.py) against counts by hand and the compiled step's own figures.

Tolerance. The plan's step arguments (state, LoRA base, batch) are shapes times itemsizes; XLA's
`argument_size_in_bytes` counts the same buffers, so the two are equal when the loss reads every
batch field. jit drops arguments a program never reads (GRPO ignores `returns` and `values`), so
there the compiled figure is smaller by exactly those fields, which the source still allocates:
the plan keeps them. The step temporaries are XLA's own `temp_size_in_bytes` (0 tolerance by
construction). What the plan cannot see (the runtime, compiled code, host data) is measured by
benchmarks/memory_plan.py against the peak RSS, not here.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, child_env

EXPERIMENTS = os.path.join(REPO, "experiments")
# A model small enough that each compile stays short on a loaded two-core machine.
TINY = ("model.variant=llama", "model.tie_embeddings=True", "model.num_layers=1",
        "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1", "model.mlp_dim=64",
        "model.vocab_size=128", "model.max_len=64", "train.batch_size=4")
F32 = 4


def _load(spec, *overrides):
  from gptjax import config as config_lib
  return config_lib.load(os.path.join(EXPERIMENTS, spec), list(TINY) + list(overrides))


def _hand_params(cfg, vocab=128):
  """Parameters of the TINY llama block by hand: tied embedding, q/k/v/o without biases, SwiGLU
  gate/up/proj, two RMSNorm scales per layer and the final one."""
  m = cfg.model
  d, layers, h, kv, f = m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim
  hd = d // h
  attn = d * h * hd + 2 * d * kv * hd + h * hd * d
  return vocab * d + layers * (attn + 3 * d * f + 2 * d) + d


# The optimizer's scalars beside its two moments: AdamW's and the schedule's int32 counts, plus
# the state's int32 step and its uint32[2] key data.
OPT_SCALARS = 2 * 4 + 4 + 8


def _state_args(p):
  return p.rows["parameters"] + p.rows["adapters"] + p.rows["optimizer state"]


def test_sft_plan_equals_hand_counts_and_the_compiled_arguments():
  from gptjax import memory
  cfg = _load("sft.py:tiny", "data.seq_len=32")
  p = memory.plan_config(cfg)
  n = _hand_params(cfg)
  assert p.rows["parameters"] == n * F32
  assert p.rows["optimizer state"] == 2 * n * F32 + OPT_SCALARS
  # LMBatch: five [B, T] fields of 4 bytes (int32 ids, positions, segments; float32 mask).
  assert p.rows["batch"] == 5 * 4 * 32 * F32
  for r in ("adapters", "frozen models", "rollout buffer", "KV cache"):
    assert p.rows[r] == 0, r
  # The SFT loss reads every batch field: XLA's arguments are exactly the plan's.
  assert p.compiled["argument_size_in_bytes"] == _state_args(p) + p.rows["batch"]
  assert p.rows["step temporaries"] >= p.compiled["temp_size_in_bytes"] > 0
  assert p.peak == _state_args(p) + p.rows["batch"] + p.rows["step temporaries"]
  table = memory.format_table(p)
  assert all(r in table for r in memory.ROWS) and "peak" in table


def test_lora_plan_shows_adapters_and_the_frozen_base_and_a_small_optimizer():
  from gptjax import memory
  full = _hand_params(_load("sft.py:tiny"))
  cfg = _load("sft.py:tiny", "data.seq_len=32", "model.lora.rank=2")
  p = memory.plan_config(cfg)
  m = cfg.model
  d, hd, f, kv = m.d_model, m.d_model // m.num_heads, m.mlp_dim, m.num_kv_heads
  # rank-2 A [in, r] and B [r, out] on q, k, v, o and gate, up, proj (one layer).
  per_target = lambda i, o: 2 * (i + o)
  adapters = (per_target(d, m.num_heads * hd) + 2 * per_target(d, kv * hd)
              + per_target(m.num_heads * hd, d) + 2 * per_target(d, f) + per_target(f, d))
  assert p.rows["adapters"] == adapters * F32
  assert p.rows["parameters"] == 0              # no scalar head in SFT
  assert p.rows["frozen models"] == full * F32  # the base, once
  assert p.rows["optimizer state"] == 2 * adapters * F32 + OPT_SCALARS
  assert p.rows["optimizer state"] * 10 < 2 * full * F32
  assert p.compiled["argument_size_in_bytes"] == (
      _state_args(p) + p.rows["frozen models"] + p.rows["batch"])
  assert any("LoRA base" in n for n in p.notes)


def test_qlora_plan_counts_the_quantized_base():
  """nf4: the targeted kernels at half a byte a weight plus one float32 absmax per block of 64
  (0.5625 bytes), the embedding and norms in float32; still exactly the compiled arguments."""
  from gptjax import memory
  base = _load("sft.py:tiny")
  full = _hand_params(base)
  m = base.model
  d, hd, f, kv = m.d_model, m.d_model // m.num_heads, m.mlp_dim, m.num_kv_heads
  kernels = m.num_layers * (d * m.num_heads * hd + 2 * d * kv * hd + m.num_heads * hd * d
                            + 3 * d * f)
  cfg = _load("sft.py:tiny", "data.seq_len=32", "model.lora.rank=2", "model.lora.base_quant=nf4")
  p = memory.plan_config(cfg)
  assert p.rows["frozen models"] == (full - kernels) * F32 + kernels // 2 + kernels // 64 * F32
  assert p.compiled["argument_size_in_bytes"] == (
      _state_args(p) + p.rows["frozen models"] + p.rows["batch"])


def _reward_workdir(tmp_path, cfg):
  """A reward stage's workdir as far as the plan reads it: its config.json (the RM's shape)."""
  from gptjax import config as config_lib
  rm = cfg.copy_and_resolve_references()
  with rm.unlocked():
    rm.model.d_model = 64
    rm.model.num_heads = 2
    rm.model.mlp_dim = 128
  path = tmp_path / "rm"
  path.mkdir()
  (path / "config.json").write_text(config_lib.to_json(rm))
  return str(path), rm


def test_grpo_plan_holds_the_reference_the_reward_model_and_the_kv_cache(tmp_path):
  from gptjax import memory
  cfg = _load("grpo.py:tiny", "rl.prompt_len=12", "rl.max_new_tokens=8",
              "rl.prompts_per_iteration=4", "rl.group_size=2")
  rm_dir, rm = _reward_workdir(tmp_path, cfg)
  with cfg.unlocked():
    cfg.rl.reward, cfg.rl.reward_workdir = "rm", rm_dir
  p = memory.plan_config(cfg)
  n = _hand_params(cfg)
  rm_n = _hand_params(rm) + rm.model.d_model + 1        # plus the scalar head's kernel and bias
  assert p.rows["parameters"] == n * F32
  assert p.rows["frozen models"] == (n + rm_n) * F32    # the reference policy and the RM
  assert any("reference policy" in x and "reward model" in x for x in p.notes)
  rows, slots = 4 * 2, 12 + 8
  m = cfg.model
  hd = m.d_model // m.num_heads
  # k and v per layer [rows, kv heads, head_dim, slots] float32, and the slots' segment ids.
  assert p.rows["KV cache"] == 2 * m.num_layers * rows * m.num_kv_heads * hd * slots * F32 + \
      rows * slots * 4
  t = slots - 1
  # RolloutBatch: ten [rows, P+M-1] fields of 4 bytes; the step's minibatch is train.batch_size.
  assert p.rows["rollout buffer"] == 10 * rows * t * 4
  assert p.rows["batch"] == 10 * 4 * t * 4
  # jit drops what the GRPO loss never reads (returns, values); the plan keeps the allocation.
  args = _state_args(p) + p.rows["batch"]
  assert args - 2 * 4 * t * 4 <= p.compiled["argument_size_in_bytes"] <= args
  assert p.peak == p.persistent + max(p.step_phase, p.rollout_phase)


def test_sizes_parse_and_bad_ones_name_the_flag():
  from gptjax import config as config_lib
  from gptjax import memory
  assert memory.parse_bytes("16GiB") == 16 * 2 ** 30
  assert memory.parse_bytes("1.5GB") == 1_500_000_000
  assert memory.parse_bytes("800MiB") == 800 * 2 ** 20
  assert memory.parse_bytes("1234") == 1234
  with pytest.raises(config_lib.ConfigError, match="--memory_limit"):
    memory.parse_bytes("lots")


def test_dry_run_prints_the_plan_and_refuses_over_the_limit_in_one_line(tmp_path):
  workdir = str(tmp_path / "run")
  args = [sys.executable, "-m", "gptjax.main", "train", "--config",
          os.path.join(EXPERIMENTS, "sft.py:tiny"), "--workdir", workdir, "--dry_run",
          "--memory_limit", "256KiB", "--config.data.seq_len=32"] + [f"--config.{o}" for o in TINY]
  proc = subprocess.run(args, env=child_env(), cwd=REPO, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr + proc.stdout
  assert "peak" in proc.stdout and "step temporaries" in proc.stdout
  err = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(err) == 1, proc.stderr
  line = err[0]
  assert line.startswith("gptjax: config error: memory plan: stage sft needs")
  assert "over the limit of 0.25 MiB" in line
  # The largest rows at this size (the step's temporaries, the optimizer, the parameters) and the
  # fields that shrink them.
  for field in ("train.grad_accum", "model.remat", "train.batch_size", "data.seq_len",
                "model.lora.rank"):
    assert field in line, field
  assert not os.path.exists(os.path.join(workdir, "checkpoints")), "a dry run trained"
  # Under a limit it fits: the plan prints and the command ends 0 without training.
  ok = subprocess.run(args[:args.index("--memory_limit")] + ["--memory_limit", "16GiB"] +
                      args[args.index("--memory_limit") + 2:] + ["--no_progress"],
                      env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert "limit: 16.000 GiB per device" in ok.stdout
  assert not os.path.exists(os.path.join(workdir, "config.json"))


def test_dpo_plan_holds_the_reference_and_pairs_of_rows(tmp_path):
  from gptjax import memory
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps({"prompt": f"say {w}", "chosen": f"{w}!", "rejected": "no"})
                          + "\n" for w in ("yes", "maybe", "never", "soon")))
  cfg = _load("dpo.py:tiny", "data.seq_len=32", f"data.train_source=preference_jsonl:{path}")
  p = memory.plan_config(cfg)
  n = _hand_params(cfg)
  assert p.rows["parameters"] == n * F32
  assert p.rows["frozen models"] == n * F32     # the initial policy, kept as the reference
  # DPOBatch: chosen and rejected LMBatches (five [B, T] fields of 4 bytes each) and two [B]
  # float32 reference log-probs.
  assert p.rows["batch"] == 2 * 5 * 4 * 32 * 4 + 2 * 4 * 4
  assert p.compiled["argument_size_in_bytes"] == _state_args(p) + p.rows["batch"]


def test_per_device_rows_on_a_sharded_mesh_equal_the_compiled_arguments():
  """Four CPU devices as (data 2, fsdp 2): the plan counts each device's shards, and XLA's
  per-device argument size agrees exactly."""
  args = [sys.executable, "-m", "gptjax.main", "memory", "--json", "--config",
          os.path.join(EXPERIMENTS, "sft.py:tiny"), "--config.data.seq_len=32",
          "--config.mesh.shape=(2,2,1)"] + [f"--config.{o}" for o in TINY]
  proc = subprocess.run(args, env=child_env(num_devices=4), cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  p = json.loads(proc.stdout[proc.stdout.index("{\n"):])      # after any data-preparation line
  rows, n = p["rows"], _hand_params(_load("sft.py:tiny"))
  assert p["devices"] == 4
  # Kernels and the embedding split their embed axis over fsdp; norm scales stay whole.
  assert n * F32 // 2 <= rows["parameters"] < n * F32 * 0.6
  # train.batch_size=4 over data x fsdp = 4 devices: one row of five [32] fields each.
  assert rows["batch"] == 5 * 1 * 32 * F32
  state = rows["parameters"] + rows["adapters"] + rows["optimizer state"]
  assert p["compiled"]["argument_size_in_bytes"] == state + rows["batch"]
