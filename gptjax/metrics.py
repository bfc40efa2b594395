"""Metric writers (TensorBoard event files, metrics.jsonl, a console progress bar) and MFU.

MFU (model FLOPs utilisation) is one formula everywhere:

    MFU = flops_per_token · tokens_per_second / (peak_flops_per_device · num_devices)

with `model.flops_per_token` = 6·N + 12·L·T·D (N: non-embedding parameters plus the LM head;
the attention term counts QKᵀ and AV for forward and backward, PaLM appendix B). Peaks are dense
(no sparsity) vendor figures for the compute dtype. A CPU's peak is worked out the same way, from
its datasheet quantities: usable cores × clock × float32 FLOPs per cycle from its vector units
(`cpu_peak_flops`). With GPTJAX_CPU_PEAK_FLOPS=measure, or where /proc/cpuinfo is missing, it is
measured instead, as the rate of a large jitted matmul (cached in ~/.cache/gptjax). That is an
achieved figure rather than a peak, and on a shared host it moves with the load, so MFU against it
reads high: a model step can beat a lone 1024² matmul, and the RM once read over 100%.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

# Dense peak FLOP/s per device, by device kind and compute dtype (vendor datasheets).
PEAK_FLOPS = {
    "a100": {"bfloat16": 312e12, "float32": 19.5e12},
    "h100": {"bfloat16": 989e12, "float32": 67e12},
    "h200": {"bfloat16": 989e12, "float32": 67e12},
    "tpu v4": {"bfloat16": 275e12, "float32": 275e12 / 4},
    "tpu v5 lite": {"bfloat16": 197e12, "float32": 197e12 / 4},   # v5e
    "tpu v5e": {"bfloat16": 197e12, "float32": 197e12 / 4},
    "tpu v5p": {"bfloat16": 459e12, "float32": 459e12 / 4},
    "tpu v5": {"bfloat16": 459e12, "float32": 459e12 / 4},
    "tpu v6 lite": {"bfloat16": 918e12, "float32": 918e12 / 4},   # v6e (Trillium)
    "tpu v6e": {"bfloat16": 918e12, "float32": 918e12 / 4},
}
_CPU_PEAK_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "gptjax", "cpu_peak.json")


def measure_cpu_peak(n: int = 1024, repeats: int = 5) -> float:
  """Float32 matmul FLOP/s on this host's JAX CPU device (median of repeats, after a warm-up)."""
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / float(np.median(times))


def cpu_peak_flops(cpuinfo: str | None = None, cores: int | None = None) -> float | None:
  """Theoretical float32 FLOP/s of the cores this process may run on, from /proc/cpuinfo.

  FLOPs per cycle per core by vector extension: AVX-512 64 (two 16-wide FMA units), AVX2 with FMA
  32 (two 8-wide FMA units), AVX 16, otherwise 8. The clock is the highest "cpu MHz" listed. The
  environment variable GPTJAX_CPU_PEAK_FLOPS overrides all of this. None when unknown.
  """
  env = os.environ.get("GPTJAX_CPU_PEAK_FLOPS", "").strip()
  if env == "measure":
    return None                      # peak_flops then measures a matmul instead
  if env:
    try:
      return float(env)
    except ValueError:
      raise ValueError(f"GPTJAX_CPU_PEAK_FLOPS={env!r}: expected a number of FLOP/s (e.g. 1.5e11) "
                       f"or 'measure'") from None
  info = cpuinfo
  if info is None:
    try:
      with open("/proc/cpuinfo") as f:
        info = f.read()
    except OSError:
      return None
  mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
  flags = set()
  for line in info.splitlines():
    if line.startswith("flags"):
      flags.update(line.split(":")[1].split())
  if not mhz or not flags:
    return None
  if "avx512f" in flags:
    per_cycle = 64
  elif "avx2" in flags and "fma" in flags:
    per_cycle = 32
  elif "avx" in flags:
    per_cycle = 16
  else:
    per_cycle = 8
  if cores is None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return cores * max(mhz) * 1e6 * per_cycle


def peak_flops(device=None, dtype: str = "float32") -> float:
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  if device.platform == "cpu":
    # All simulated host devices share these cores; MFU divides by the device count, so split.
    share = max(1, len(jax.local_devices(backend="cpu")))
    peak = cpu_peak_flops()
    if peak:
      return peak / share
    try:
      with open(_CPU_PEAK_CACHE) as f:
        return float(json.load(f)["flops"]) / share
    except (OSError, ValueError, KeyError):
      peak = measure_cpu_peak()
      try:
        os.makedirs(os.path.dirname(_CPU_PEAK_CACHE), exist_ok=True)
        with open(_CPU_PEAK_CACHE, "w") as f:
          json.dump({"flops": peak, "device_kind": kind}, f)
      except OSError:
        pass
      return peak / share
  dt = "bfloat16" if dtype in ("bfloat16", "float16") else "float32"
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name in kind:
      return PEAK_FLOPS[name][dt]
  return float("nan")


def mfu(flops_per_token: float, tokens_per_sec: float, *, num_devices: int, peak: float) -> float:
  return flops_per_token * tokens_per_sec / (peak * num_devices)


class MetricWriter:
  """Writes scalars to TensorBoard, `metrics.jsonl` and text to TensorBoard; process 0 only."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self.workdir = workdir
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def scalars(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    for k, v in clean.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()

  def text(self, step: int, tag: str, text: str) -> None:
    if not self.enabled:
      return
    self._tb.add_text(tag, text, step)
    with open(os.path.join(self.workdir, "samples.txt"), "a") as f:
      f.write(f"=== step {step} {tag}\n{text}\n\n")

  def flush(self):
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self):
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def rank_correlation(x, y) -> float | None:
  """Spearman's ρ of two equal-length score vectors (ties get their mean rank).

  None where it is undefined: fewer than three points, or either side constant (a collapsed
  policy's replies can all score the same, and scipy would warn and return NaN).
  """
  from scipy import stats
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"rank_correlation: expected two 1-D vectors of one length, got shapes "
                     f"{x.shape} and {y.shape}")
  if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return None
  return float(stats.spearmanr(x, y).statistic)


def batch_bar(desc: str, total: int):
  """A console progress bar over `total` host-driven batches (sampling, scoring), or None when
  `desc` is empty (progress off) or on processes other than 0."""
  if not desc or jax.process_index() != 0:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=0.5)
