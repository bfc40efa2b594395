"""Post-training a Hugging Face model: SFT, RM, DPO, PPO and GRPO with `train.init_from=hf:DIR`.

The architecture, weights, tokenizer and chat template all come from DIR (config.json,
safetensors, tokenizer.json, tokenizer_config.json); the preset sets only training. Finish with
`gptjax export-hf --workdir W --out DIR2`, which transformers (and vLLM) load.

Tiny presets (CPU, seconds; the tests run them against a tiny random model they write):

    python tests/helpers/hf_tiny.py --family qwen2 --out /tmp/tiny_qwen2
    gptjax train --config experiments/hf_post_train.py:sft_tiny --workdir runs/hf_sft \
        --config.train.init_from=hf:/tmp/tiny_qwen2
    gptjax train --config experiments/hf_post_train.py:grpo_tiny --workdir runs/hf_grpo \
        --config.train.init_from=hf:/tmp/tiny_qwen2
    (also reward_tiny, ppo_tiny, and dpo_tiny with --config.data.train_source=preference_jsonl:F)

Real-hardware presets. UNMEASURED: written for the hardware named, not yet run on it; the
step counts and learning rates are the usual ones for these sizes, not tuned here.

  sft_qwen_gpu   Qwen2.5-0.5B-Instruct SFT on one GPU (bf16, 2k steps of 16 x 1024 tokens):
      gptjax train --config experiments/hf_post_train.py:sft_qwen_gpu --workdir runs/qwen_sft \
          --config.train.init_from=hf:/models/Qwen2.5-0.5B-Instruct \
          --config.data.source=chat_jsonl:/data/chats.jsonl
  dpo_qwen_gpu   then DPO from that SFT run on one GPU:
      gptjax train --config experiments/hf_post_train.py:dpo_qwen_gpu --workdir runs/qwen_dpo \
          --config.train.init_from=runs/qwen_sft \
          --config.data.train_source=preference_jsonl:/data/prefs_train.jsonl \
          --config.data.eval_source=preference_jsonl:/data/prefs_val.jsonl
  grpo_llama_tpu Llama-3.2-1B GRPO on a TPU v5e-8 (FSDP over the 8 chips), a verifiable reward:
      gptjax train --config experiments/hf_post_train.py:grpo_llama_tpu --workdir runs/llama_grpo \
          --config.train.init_from=hf:/models/Llama-3.2-1B-Instruct \
          --config.rl.reward=python:my_rewards.py:score
"""

from . import reward as reward_exp
from . import rl as rl_exp
from . import sft as sft_exp

PRESETS = ("sft_tiny", "reward_tiny", "dpo_tiny", "ppo_tiny", "grpo_tiny", "sft_qwen_gpu",
           "dpo_qwen_gpu", "grpo_llama_tpu")


def get_config(arg=None):
  preset = arg or "sft_tiny"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
  algo, _, size = preset.partition("_")
  if algo == "sft":
    c = sft_exp.get_config("micro" if size == "tiny" else "gpu")
  elif algo == "reward":
    c = reward_exp.get_config("micro")
  else:
    c = rl_exp.get_config(f"{algo}_micro" if size == "tiny" else f"{algo}_gpu")
  if size == "tiny":
    # The tiny random models of tests/helpers/hf_tiny.py: max_len 64.
    c.data.seq_len = 64
    if algo == "sft":
      c.train.update(steps=8, batch_size=8, eval_every=4, checkpoint_every=4)
      c.sft.update(max_reply_chars=40, reply_tokens=12, eval_prompts=4, show_samples=2)
      c.optim.update(lr=3e-3)
    elif algo == "reward":
      c.sft.update(max_reply_chars=40, reply_tokens=12)
    elif algo in ("ppo", "grpo"):
      c.rl.update(prompt_len=24, max_new_tokens=12, iterations=2)
      c.data.seq_len = 64
    return c
  c.model.update(dtype="bfloat16", remat="full")
  if preset == "sft_qwen_gpu":
    c.data.seq_len = 1024
    c.sft.update(max_reply_chars=0, reply_tokens=256, eval_prompts=128)
    c.train.update(steps=2000, batch_size=16, eval_every=500, checkpoint_every=500)
    c.optim.update(lr=1e-5, warmup_steps=50, weight_decay=0.0)
  elif preset == "dpo_qwen_gpu":
    c.data.seq_len = 1024
    c.train.update(steps=1000, batch_size=16, eval_every=200)
    c.optim.update(lr=5e-7)
  else:  # grpo_llama_tpu
    c.mesh.shape = (1, -1, 1)
    c.rl.update(prompt_len=256, max_new_tokens=512, prompts_per_iteration=64, group_size=8,
                iterations=200, reward="contains:answer")
    c.train.batch_size = 256
    c.optim.update(lr=1e-6)
    c.data.seq_len = 2048
  return c
