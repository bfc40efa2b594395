"""Loader throughput on this host: packed pretraining tokens/s and SFT rows/s.

    python benchmarks/loader_throughput.py [--append] [--grain_workers 0,2]

Pretraining is measured through our packed loader and, side by side, through the grain pipeline
that yields the same batches (`gptjax/data/grain_loader.py`), with each number of grain worker
processes in --grain_workers (0 = no worker process).

Synthetic documents (lengths drawn like a web corpus, 50..4000 tokens) so the figure measures the
loader, not a tokenizer. Each figure is the median of several timed runs after a warm-up, read
through the public iterator with its prefetch thread, as the trainer reads it. --append adds a
section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

import sys

import numpy as np

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gptjax.data.documents import TokenDocuments
from gptjax.data.grain_loader import GrainPackedLoader, GrainStreamLoader
from gptjax.data.loader import PackedLoader

DATE = time.strftime("%Y-%m-%d")


def _cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return platform.processor() or "unknown"


def _documents(num_docs: int, *, seed: int = 0, lo: int = 50, hi: int = 4000) -> TokenDocuments:
  rng = np.random.default_rng(seed)
  lengths = rng.integers(lo, hi, size=num_docs)
  tokens = rng.integers(0, 32_000, size=int(lengths.sum()), dtype=np.int32)
  return TokenDocuments(tokens, np.r_[0, np.cumsum(lengths)])


def _rate(loader, *, batches: int, per_batch: float, repeats: int, warmup: int = 5) -> float:
  for _ in range(warmup):
    next(loader)
  rates = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(batches):
      next(loader)
    rates.append(batches * per_batch / (time.perf_counter() - t))
  return statistics.median(rates)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--append", action="store_true", help="append a section to RESULTS.md")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--grain_workers", default="0,2", help="comma-separated worker counts")
  args = p.parse_args(argv)

  seq_len, batch = 1024, 32
  docs = _documents(20_000)
  pre = PackedLoader(docs, seq_len=seq_len, global_batch=batch, seed=0, pad_id=0, mode="stream",
                     process_index=0, process_count=1)
  pre_tps = _rate(pre, batches=100, per_batch=batch * seq_len, repeats=args.repeats)
  pre.close()
  grain_tps = {}
  for workers in [int(w) for w in args.grain_workers.split(",") if w != ""]:
    it = GrainStreamLoader(docs, seq_len=seq_len, global_batch=batch, seed=0, pad_id=0,
                           process_index=0, process_count=1, worker_count=workers)
    grain_tps[workers] = _rate(it, batches=100, per_batch=batch * seq_len, repeats=args.repeats)
    it.close()

  sft_docs = _documents(20_000, seed=1, lo=20, hi=600)
  masked = [(sft_docs[i], (np.arange(len(sft_docs[i])) > len(sft_docs[i]) // 2).astype(np.float32))
            for i in range(len(sft_docs))]
  sft = {}
  for method in ("first_fit", "best_fit", "pad"):
    it = PackedLoader(masked, seq_len=seq_len, global_batch=batch, seed=0, pad_id=0, mode=method,
                      process_index=0, process_count=1)
    sft[method] = (_rate(it, batches=20, per_batch=batch, repeats=args.repeats),
                   it.pack_stats.padding_fraction)
    it.close()
  sft_grain = {}
  for workers in [int(w) for w in args.grain_workers.split(",") if w != ""]:
    it = GrainPackedLoader(masked, seq_len=seq_len, global_batch=batch, seed=0, pad_id=0,
                           mode="first_fit", process_index=0, process_count=1,
                           worker_count=workers)
    sft_grain[workers] = _rate(it, batches=20, per_batch=batch, repeats=args.repeats)
    it.close()

  lines = [f"pretraining (stream packing, B={batch}, T={seq_len}): {pre_tps / 1e6:.1f}M tokens/s"]
  for workers, tps in grain_tps.items():
    lines.append(f"pretraining through grain, {workers} worker processes (same batches): "
                 f"{tps / 1e6:.1f}M tokens/s")
  for method, (rows, pad) in sft.items():
    lines.append(f"SFT {method:9s} (B={batch}, T={seq_len}): {rows:,.0f} rows/s, "
                 f"padding {pad:.1%}")
  for workers, rows in sft_grain.items():
    lines.append(f"SFT first_fit through grain, {workers} worker processes (same batches): "
                 f"{rows:,.0f} rows/s")
  for line in lines:
    print(line)
  if args.append:
    path = os.path.join(os.path.dirname(__file__), "RESULTS.md")
    section = [f"\n## Data loader throughput ({DATE})", "",
               f"Machine: {_cpu_model()}, {os.cpu_count()} CPUs. "
               "Command: `python benchmarks/loader_throughput.py --append`. "
               "Synthetic token documents; median of "
               f"{args.repeats} runs after warm-up, through the prefetching iterator.", ""]
    section += [f"- {line}" for line in lines]
    with open(path, "a") as f:
      f.write("\n".join(section) + "\n")


if __name__ == "__main__":
  main()
