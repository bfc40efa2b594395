"""XLA:CPU flags for training speed. They must be in XLA_FLAGS before JAX initialises a backend.

    from gptjax import perf
    perf.apply_cpu_flags()        # before the first `import jax` that touches a device
"""

from __future__ import annotations

import os


def cpu_flags() -> list[str]:
  """The XLA:CPU flags measured fastest for training on CPU (benchmarks/RESULTS.md)."""
  return []


def apply_cpu_flags() -> None:
  """Appends `cpu_flags()` to XLA_FLAGS, leaving any flag the user already set untouched."""
  current = os.environ.get("XLA_FLAGS", "")
  have = {f.split("=")[0] for f in current.split()}
  extra = [f for f in cpu_flags() if f.split("=")[0] not in have]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current] + extra).strip()
