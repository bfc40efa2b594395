"""MFU's denominator: the CPU peak from datasheet quantities, and the per-token FLOP count."""

import jax
import pytest

from gptjax import metrics
from gptjax.model import ModelConfig, flops_per_token

_ZEN3 = """processor\t: 0
model name\t: AMD EPYC
cpu MHz\t\t: 2445.402
flags\t\t: fpu sse sse2 avx fma avx2 bmi2
processor\t: 1
cpu MHz\t\t: 2300.000
flags\t\t: fpu sse sse2 avx fma avx2 bmi2
"""


def test_cpu_peak_is_cores_times_clock_times_vector_flops(monkeypatch):
  monkeypatch.delenv("GPTJAX_CPU_PEAK_FLOPS", raising=False)
  # Two cores, 8-wide FMA on two ports: 2 * 2445.402e6 * 32.
  assert metrics.cpu_peak_flops(_ZEN3, cores=2) == pytest.approx(156.505728e9)
  avx512 = _ZEN3.replace("avx2", "avx2 avx512f")
  assert metrics.cpu_peak_flops(avx512, cores=1) == pytest.approx(2445.402e6 * 64)
  plain = "cpu MHz\t: 1000.0\nflags\t: fpu sse2\n"
  assert metrics.cpu_peak_flops(plain, cores=4) == pytest.approx(4 * 1e9 * 8)
  assert metrics.cpu_peak_flops("model name: mystery\n", cores=2) is None


def test_cpu_peak_env_override(monkeypatch, tmp_path):
  monkeypatch.setenv("GPTJAX_CPU_PEAK_FLOPS", "1e11")
  assert metrics.cpu_peak_flops(_ZEN3, cores=2) == 1e11
  # 'measure' selects the measured matmul rate, read from its cache when there is one.
  cache = tmp_path / "cpu_peak.json"
  cache.write_text('{"flops": 6.0e10}')
  monkeypatch.setattr(metrics, "_CPU_PEAK_CACHE", str(cache))
  monkeypatch.setenv("GPTJAX_CPU_PEAK_FLOPS", "measure")
  assert metrics.cpu_peak_flops(_ZEN3, cores=2) is None
  assert metrics.peak_flops() == pytest.approx(6.0e10 / len(jax.local_devices(backend="cpu")))
  monkeypatch.setenv("GPTJAX_CPU_PEAK_FLOPS", "fast")
  with pytest.raises(ValueError, match="GPTJAX_CPU_PEAK_FLOPS='fast'.*'measure'"):
    metrics.cpu_peak_flops(_ZEN3, cores=2)


def test_flops_per_token_counts_the_lm_head_only_when_asked():
  cfg = ModelConfig(vocab_size=1000, num_layers=2, num_heads=2, d_model=64, max_len=32)
  with_head = flops_per_token(cfg, 32)
  without = flops_per_token(cfg, 32, lm_head=False)
  assert with_head - without == pytest.approx(6 * 64 * (1000 - 1))
  # 2 layers x (4 d^2 attention + 8 d^2 MLP) + head, times 6, plus 12 L T D attention.
  assert with_head == pytest.approx(6 * (2 * 12 * 64 * 64 + 64 * 1000) + 12 * 2 * 32 * 64)


def test_rank_correlation_matches_a_hand_computation_with_ties():
  # Spearman is the Pearson correlation of the ranks; tied values share their mean rank.
  x, y = [0.1, 0.5, 0.5, 0.9], [2.0, 1.0, 3.0, 7.0]
  rx, ry = [1, 2.5, 2.5, 4], [2, 1, 3, 4]
  mx, my = sum(rx) / 4, sum(ry) / 4
  cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
  var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
  assert metrics.rank_correlation(x, y) == pytest.approx(cov / var, abs=1e-12)
  assert metrics.rank_correlation(x, [-v for v in x]) == pytest.approx(-1.0)


def test_rank_correlation_is_undefined_for_constant_or_tiny_input():
  assert metrics.rank_correlation([1.0, 1.0, 1.0], [0.1, 0.2, 0.3]) is None   # collapsed policy
  assert metrics.rank_correlation([0.1, 0.2], [0.3, 0.1]) is None
  with pytest.raises(ValueError, match="shapes"):
    metrics.rank_correlation([0.1, 0.2, 0.3], [0.1, 0.2])
