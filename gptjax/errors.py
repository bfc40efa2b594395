"""How every `gptjax` command ends on a problem the user can fix: one line and an exit status.

    gptjax: data error: chats.jsonl:12: field 'messages[1].role' must be one of ...   (exit 2)
    gptjax: config error: optim.lr: must be >= 0, got -0.001                          (exit 2)
    gptjax: checkpoint error: ...                                                    (exit 2)
    gptjax: filesystem error: ...                                                    (exit 2)
    gptjax: non-finite value: train/loss=nan at step 4 in ...               (exit 3)
    gptjax: stopped: SIGTERM arrived before training started or between stages ... (exit 143)

Everything else is a bug and keeps its traceback. GPTJAX_TRACEBACK=1 shows the traceback for
the problems above too, for debugging.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

EXIT_USER = 2
EXIT_NONFINITE = 3


class CheckpointError(RuntimeError):
  """No readable checkpoint to resume from, or one could not be written (disk full, read-only)."""


# The errnos that name a problem with the user's files or disk rather than a bug.
_FS_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS,
              errno.ENOSPC, errno.EEXIST, errno.EDQUOT, errno.ENAMETOOLONG}


def classify(e: BaseException) -> tuple[str, int] | None:
  """(kind, exit status) for a problem the user can fix, else None (a bug)."""
  # Ctrl-C first: it may have landed half-way through importing jax, which must not be imported
  # again here.
  if isinstance(e, KeyboardInterrupt):
    return "stopped", 128 + signal.SIGINT
  from gptjax import config as config_lib
  from gptjax.data.errors import DataError
  from gptjax.trainer import NonFiniteError
  if isinstance(e, NonFiniteError):
    return "non-finite value", EXIT_NONFINITE
  if isinstance(e, config_lib.ConfigError):
    return "config error", EXIT_USER
  if isinstance(e, DataError):
    return "data error", EXIT_USER
  if isinstance(e, CheckpointError):
    return "checkpoint error", EXIT_USER
  if isinstance(e, OSError) and e.errno in _FS_ERRNOS:
    return "filesystem error", EXIT_USER
  if isinstance(e, FileNotFoundError):       # raised with a message of ours, without an errno
    return "filesystem error", EXIT_USER
  return None


def message(e: BaseException) -> str:
  if isinstance(e, KeyboardInterrupt):
    return "interrupted (Ctrl-C); run the same command again to go on."
  if isinstance(e, OSError) and e.strerror:
    where = e.filename or ""
    text = f"{where}: {e.strerror}" if where else e.strerror
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      text += free_space_note(where)
    elif e.errno in (errno.EEXIST, errno.ENOTDIR) and where:
      text += "; expected a directory there (a file is in the way)"
    elif e.errno == errno.EROFS:
      text += "; the disk is read-only, choose a writable --workdir"
    return text
  return " ".join(str(e).split("\n")) if str(e) else type(e).__name__


def free_space_note(path: str) -> str:
  import shutil
  probe = path
  while probe and not os.path.exists(probe):
    probe = os.path.dirname(probe)
  try:
    free = shutil.disk_usage(probe or ".").free
  except OSError:
    return ""
  return f" ({free / 2**20:.1f} MiB free on that disk)"


def _install_stop_handler():
  """SIGTERM before (or between) training loops ends the command with a message, not silently.

  The training loop installs its own handler for its duration (save, then stop) and puts this
  one back after. Returns the handler it replaced, or None off the main thread."""
  def handle(signum, frame):
    # Exit here rather than raise: an exception raised in a signal handler can land inside a
    # garbage-collection callback, where Python prints and ignores it and the run goes on. Outside
    # a training loop, exiting at once is what SIGTERM always did; now it says so.
    name = signal.Signals(signum).name
    print(f"gptjax: stopped: {name} arrived before training started or between stages; no "
          "checkpoint was being written. Run the same command again to go on.", file=sys.stderr,
          flush=True)
    os._exit(128 + signum)
  try:
    return signal.signal(signal.SIGTERM, handle)
  except ValueError:              # not the main thread
    return None


def run_command(fn, argv) -> int:
  """Runs one command; turns the problems `classify` knows into one line on stderr."""
  old = _install_stop_handler()
  try:
    return fn(argv) or 0
  except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - bugs are re-raised
    kind = classify(e)
    if kind is None or os.environ.get("GPTJAX_TRACEBACK", "") not in ("", "0"):
      raise
    print(f"gptjax: {kind[0]}: {message(e)}", file=sys.stderr, flush=True)
    return kind[1]
  finally:
    if old is not None:
      signal.signal(signal.SIGTERM, old)
