#!/usr/bin/env bash
# Every GPU figure of the project in one go, on one H100/H200 (budget: under 8 minutes).
#
#   bash benchmarks/gpu_suite.sh 2>&1 | tee gpu_suite.txt
#
# Prints, each part under a header, with the machine and date first:
#   1. GPT-2 124M pretraining MFU in bf16, without and with remat (the real train step);
#   2. decode tokens/s at batch 1 and 64 (GPT-2 124M, bf16), and HF generate on the same GPU
#      beside it when torch and transformers are installed;
#   3. rollouts: the continuous-batching engine against the static sampler (batch 64, up to 256
#      new tokens, geometric lengths of mean 64);
#   4. the GRPO step and the PPO iteration (benchmarks/rl_throughput.py), rollouts from the static
#      sampler and from the engine side by side (lengths geometric with mean 16 of 64);
#   5. LoRA rank 16 against full fine-tuning memory for a GRPO step on a Qwen2.5-0.5B-shaped model.
# Each part has its own time limit (`timeout`), so one that hangs cannot eat the others' time;
# a part that fails prints its status and the suite goes on. Step counts are cut to what gives
# stable medians on a GPU (the scripts' CPU defaults are for slower machines).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # so part 5's per-process peaks are its own

start=$(date +%s)
part() {   # part TITLE LIMIT_S CMD...
  local title=$1 limit=$2; shift 2
  echo
  echo "=== $title (limit ${limit}s, at +$(( $(date +%s) - start ))s) ==="
  timeout "$limit" "$@"
  local rc=$?
  [ $rc -ne 0 ] && echo "!!! $title: exit status $rc"
  return 0
}

echo "gptjax GPU suite  $(date -u '+%Y-%m-%d %H:%M UTC')  commit $(git rev-parse --short HEAD 2>/dev/null)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python -c "import jax; print('jax', jax.__version__, jax.devices())"

part "1. GPT-2 124M pretraining, bf16: remat none vs full vs dots (MFU)" 110 \
  python benchmarks/pretrain_throughput.py --preset gpt2_124m --dtype bfloat16 --batch 16 \
    --variants "remat=none;remat=full;remat=dots" --steps 10 --repeats 3 --warmup 3 --no_split

part "2a. decode tokens/s, GPT-2 124M bf16, batch 1 and 64 (gptjax)" 75 \
  python benchmarks/decode_throughput.py --model gpt2_124m --dtype bfloat16 --batch_sizes 1,64 \
    --new_tokens 256 --repeats 3 --baseline no

if python -c "import torch, transformers" 2>/dev/null; then
  part "2b. decode tokens/s, HF generate on the same GPU (baseline)" 60 \
    python benchmarks/hf_generate.py --batch_sizes 1,64 --new_tokens 256 --repeats 3
else
  echo; echo "=== 2b. HF generate baseline: skipped (torch/transformers not installed) ==="
fi

part "3. rollouts: continuous engine vs static sampler (64 x <=256 tokens, mean 64)" 45 \
  python benchmarks/rollout_engine.py --batch 64 --max_new_tokens 256 --mean_len 64 \
    --d_model 768 --num_layers 12 --repeats 3

part "4. RL: GRPO step and PPO iteration, static sampler vs engine rollouts" 50 \
  python benchmarks/rl_throughput.py --repeats 3 --warmup 2 --mean_len 16

part "5. GRPO step memory: full fine-tuning vs LoRA r16, Qwen2.5-0.5B shape, bf16" 130 \
  python benchmarks/lora_memory.py --dtype bfloat16 --rank 16 --batch 8 --seq 512 --remat full \
    --steps 3

echo
echo "=== done in $(( $(date +%s) - start ))s ==="
