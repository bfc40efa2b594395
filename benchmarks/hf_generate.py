"""The side-by-side baseline for decode throughput: Hugging Face `generate` on a randomly
initialised GPT-2 124M (no download), on the same device, at the same batch sizes and lengths as
`benchmarks/decode_throughput.py --model gpt2_124m`.

    python benchmarks/hf_generate.py [--batch_sizes 1,64] [--prompt_len 16] [--new_tokens 256]

Sampling with `min_new_tokens = max_new_tokens`, so no row stops early; tokens/s counts
batch × new tokens over the whole `generate` call (prefill included, as HF does it in one call).
Median of `--repeats` after one warm-up call. Needs torch and transformers (the `test` extra).
"""

import argparse
import statistics
import time


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch_sizes", default="1,64")
  ap.add_argument("--prompt_len", type=int, default=16)
  ap.add_argument("--new_tokens", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  args = ap.parse_args()
  import torch
  import transformers
  device = "cuda" if torch.cuda.is_available() else "cpu"
  cfg = transformers.GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257,
                                n_positions=1024)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(cfg).to(device=device, dtype=getattr(torch, args.dtype))
  model.eval()
  print(f"HF generate, GPT-2 124M random, {args.dtype}, {device} "
        f"({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), transformers "
        f"{transformers.__version__}, prompt {args.prompt_len}, {args.new_tokens} new tokens")
  for b in [int(x) for x in args.batch_sizes.split(",")]:
    ids = torch.randint(0, cfg.vocab_size, (b, args.prompt_len), device=device)

    def run():
      with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                       max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                       pad_token_id=0)
      if device == "cuda":
        torch.cuda.synchronize()

    run()
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      run()
      times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    print(f"  batch {b:3d}: {b * args.new_tokens / t:10.1f} tok/s  ({t:.3f} s per call)")


if __name__ == "__main__":
  main()
