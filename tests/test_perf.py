"""`perf.retain_host_memory`: with it, glibc serves a large block from its heap and keeps the block
when it is freed, ready for the next allocation; without it (GPTJAX_RETAIN_HOST_MEMORY=0), the
block is mmapped and handed back to the kernel on free, so the next one is faulted in afresh.
Each case runs in a child, because the setting must be made before anything allocates."""

import ctypes
import json
import subprocess
import sys

import pytest

from conftest import REPO, child_env

CHILD = r"""
import ctypes, json, threading
from gptjax import perf
applied = perf.retain_host_memory()

class MallInfo2(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
              "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
out = {"applied": applied}

def work():
  # From a thread other than the main one, as XLA's workers allocate.
  before = libc.mallinfo2().hblkhd        # blocks the interpreter mapped before the setting
  block = bytearray(64 << 20)
  out["mmapped_while_alive"] = libc.mallinfo2().hblkhd - before
  del block
  out["free_in_heap_after"] = libc.mallinfo2().fordblks

t = threading.Thread(target=work)
t.start()
t.join()
print("RESULT " + json.dumps(out))
"""


def _run(retain: str) -> dict:
  out = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True,
                       env=child_env(GPTJAX_RETAIN_HOST_MEMORY=retain), timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads([l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])


def _has_glibc_mallinfo2() -> bool:
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version, libc.mallinfo2
    return True
  except (OSError, AttributeError):
    return False


@pytest.mark.skipif(not _has_glibc_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_retained_host_memory_keeps_freed_blocks_in_the_heap():
  on, off = _run("1"), _run("0")
  assert on["applied"] and not off["applied"]
  block = 64 << 20
  # Default glibc: a 64 MB block is its own mapping, and freeing it returns it to the kernel.
  assert off["mmapped_while_alive"] >= block, off
  assert off["free_in_heap_after"] < block, off
  # Retained: the block comes from the heap, and stays there, free, once released.
  assert on["mmapped_while_alive"] == 0, on
  assert on["free_in_heap_after"] >= block, on
