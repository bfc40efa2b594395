"""Tiny random Hugging Face models of every supported family, written with transformers (test-only).

    python tests/helpers/hf_tiny.py --family qwen2 --out /tmp/tiny_qwen2      # for the *_tiny presets

Weights are perturbed away from transformers' init: every 1-D parameter (norm scales, biases) is
moved by up to ±0.2, since ones and zeros hide mistakes in norms, biases and their offsets.
A ChatML chat template and a byte-level BPE tokenizer trained on a few sentences come with each.
"""

from __future__ import annotations

import argparse
import json
import os

VOCAB = 320
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PLAIN_TEMPLATE = TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def config_for(family: str, **over):
  import transformers as T
  common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=None,
                initializer_range=0.1)
  if family == "gpt2":
    cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64,
                       bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0,
                       attn_pdrop=0.0, initializer_range=0.1)
  elif family == "llama":
    cfg = T.LlamaConfig(**common, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 16},
                        rope_theta=500.0)
  elif family == "mistral":
    cfg = T.MistralConfig(**common, sliding_window=5, rope_theta=1000.0, head_dim=16)
  elif family == "qwen2":
    cfg = T.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1000.0)
  elif family == "qwen3":
    cfg = T.Qwen3Config(**common, head_dim=24, tie_word_embeddings=False, rope_theta=1000.0)
  elif family == "gemma3_text":
    cfg = T.Gemma3TextConfig(
        **{**common, "num_hidden_layers": 4}, head_dim=24, query_pre_attn_scalar=20,
        sliding_window=4, layer_types=["sliding_attention", "full_attention",
                                       "sliding_attention", "full_attention"],
        rope_theta=10_000.0, rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0})
  else:
    raise ValueError(family)
  for k, v in over.items():
    setattr(cfg, k, v)
  return cfg


def perturb(model, seed: int = 0):
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(torch.rand(p.shape, generator=g) * 0.4 - 0.2)
  return model


def write_tokenizer(out: str, *, template: str = TEMPLATE, pad: bool = False):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ["<|pad|>", "<|bos|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  trainer = trainers.BpeTrainer(vocab_size=VOCAB - 16, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  text = ["To be, or not to be, that is the question.", "Hello there, how are you today?",
          "The quick brown fox jumps over the lazy dog.", "I am fine, thank you."] * 20
  tok.train_from_iterator(text, trainer)
  tok.save(os.path.join(out, "tokenizer.json"))
  cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>",
         "eos_token": "<|im_end|>", "chat_template": template, "model_max_length": 64,
         "clean_up_tokenization_spaces": False}
  if pad:
    cfg["pad_token"] = "<|pad|>"
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(cfg, f)
  return tok


def write_model(family: str, out: str, *, seed: int = 0, head: str = "lm", tokenizer=True,
                max_shard_size=None, **over):
  """Writes a tiny perturbed model (and tokenizer) to `out`; returns the torch model."""
  import torch
  import transformers as T
  torch.manual_seed(seed)
  cfg = config_for(family, **over)
  if head == "score":
    cfg.num_labels = 1
    cfg.pad_token_id = 0
    model = T.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")
  else:
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
  perturb(model, seed)
  model.eval()
  kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(out, **kw)
  if tokenizer:
    write_tokenizer(out)
  return model


if __name__ == "__main__":
  p = argparse.ArgumentParser()
  p.add_argument("--family", default="qwen2")
  p.add_argument("--head", default="lm", choices=("lm", "score"))
  p.add_argument("--out", required=True)
  a = p.parse_args()
  write_model(a.family, a.out, head=a.head)
  print(f"wrote a tiny {a.family} ({a.head}) to {a.out}")
