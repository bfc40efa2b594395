"""Process settings for speed on the host. Both must run before JAX initialises a backend.

    from gptjax import perf
    perf.retain_host_memory()     # glibc malloc keeps freed memory (see below)
    perf.apply_cpu_flags()        # XLA:CPU flags
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt(3) parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
RETAIN_ENV = "GPTJAX_RETAIN_HOST_MEMORY"


def retain_host_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

  Why: XLA:CPU allocates an executable's buffers (activations, logits, gradients) on every call.
  By default glibc serves large requests with mmap and unmaps them on free, and each worker
  thread's arena trims its heap, so every step writes to pages the kernel must fault in afresh:
  about 102k minor page faults (400 MB) per update of the RL benchmark's PPO step, a quarter of
  its time (benchmarks/RESULTS.md). With one arena, no mmap and no trimming the heap grows to the
  peak once and is reused; the cost is that the process keeps its peak resident size.

  Only threads that have not yet allocated pick up the single arena, so call this before JAX
  starts a backend (the `gptjax` command, the benchmarks and the tests do). Linux with glibc only;
  elsewhere, or with GPTJAX_RETAIN_HOST_MEMORY=0, it does nothing. Returns whether it applied.
  """
  if os.environ.get(RETAIN_ENV, "1") == "0" or not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version           # musl has mallopt but not these parameters
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  # -1 as the trim threshold is SIZE_MAX to glibc: never trim (mallopt(3)).
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


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
