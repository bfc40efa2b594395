"""The `gptjax` command. Thin on purpose: parse, then call a library function.

  gptjax train     --config experiments/x.py:preset --workdir DIR [--config.field=value ...]
                   [--import my_losses.py] [--dry_run] [--memory_limit 16GiB]
  gptjax memory    --config experiments/x.py:preset [--config.field=value ...] [--memory_limit 16GiB]
                   (the memory plan per device; --dry_run prints the same and trains nothing)
  gptjax pipeline  --config experiments/shakespeare_assistant.py:tiny --workdir DIR
  gptjax scaling   --config experiments/scaling.py:tiny --workdir DIR      (an IsoFLOP sweep)
  gptjax sample    --workdir DIR --prompt "..."        gptjax chat --workdir DIR
  gptjax tokenizer train --source shakespeare --vocab_size 512 --out DIR
  gptjax eval      --workdir DIR --tasks hellaswag,arc_easy [--limit N]     (needs lm-eval)
  gptjax import-hf --model HF_DIR --workdir DIR    gptjax export-hf --workdir DIR --out HF_DIR
"""

from __future__ import annotations

import argparse
import logging
import sys


def _train(argv):
  from gptjax import config as config_lib
  overrides, rest = config_lib.split_argv(argv)
  p = argparse.ArgumentParser(prog="gptjax train")
  p.add_argument("--config", required=True, help="path.py:preset")
  p.add_argument("--workdir", required=True)
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--import", dest="imports", action="append", default=[],
                 help="a module name or .py file to import first, e.g. one that registers a loss")
  p.add_argument("--dry_run", action="store_true",
                 help="print the memory plan per device (gptjax/memory.py) and exit")
  from gptjax import memory
  memory.add_arguments(p)
  args = p.parse_args(rest)
  for item in args.imports:
    import_user_module(item)
  cfg = config_lib.load(args.config, overrides)
  _distributed(cfg)
  if args.dry_run:
    memory.report(cfg, workdir=args.workdir, memory_limit=args.memory_limit,
                  compile=not args.no_compile)
    return 0
  if args.memory_limit:
    # Planned on a copy: the plan fills fields (vocab_size, the previous run's architecture) the
    # runner fills again in its own way.
    memory.report(cfg.copy_and_resolve_references(), workdir=args.workdir,
                  memory_limit=args.memory_limit, compile=not args.no_compile)
  from gptjax.stages import run_stage
  res = run_stage(cfg, args.workdir, progress=not args.no_progress)
  return 128 + 15 if getattr(res, "interrupted", False) else 0


def _memory(argv):
  from gptjax import memory
  return memory.main(argv)


def import_user_module(item: str):
  """Imports `pkg.module` or `path/to/file.py`, so its @losses.register decorators run."""
  import importlib
  import importlib.util
  import os
  from gptjax import config as config_lib
  if item.endswith(".py"):
    if not os.path.exists(item):
      raise config_lib.ConfigError(f"--import: no file {item!r}")
    spec = importlib.util.spec_from_file_location(os.path.basename(item)[:-3], item)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  try:
    return importlib.import_module(item)
  except ModuleNotFoundError as e:
    raise config_lib.ConfigError(f"--import: cannot import {item!r} ({e})") from None


def _hf_command(name):
  """import-hf / export-hf: a directory gptjax cannot read is one line on stderr, exit 2."""
  def run(argv):
    from gptjax import config as config_lib
    from gptjax import hf
    try:
      return getattr(hf, name)(argv)
    except config_lib.ConfigError as e:
      print(f"gptjax: {e}", file=sys.stderr)
      return 2
  return run


def _distributed(cfg):
  from gptjax import sharding
  sharding.init_distributed(cfg.distributed)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  # Every command ends the same way on a problem the user can fix: one line, exit status 2 (3 for
  # a non-finite loss); GPTJAX_TRACEBACK=1 shows the traceback instead. Entered first, so that a
  # SIGTERM while jax loads is reported too.
  from gptjax import errors
  return errors.run_command(_dispatch, argv)


def _dispatch(argv) -> int:
  # Before anything starts a JAX backend: it only reaches threads that have not allocated yet.
  from gptjax import perf
  perf.retain_host_memory()
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  commands = {"train": _train, "memory": _memory, "import-hf": _hf_command("import_main"),
              "export-hf": _hf_command("export_main")}
  try:
    from gptjax import generate_cli
    commands["sample"] = generate_cli.sample_main
    commands["chat"] = generate_cli.chat_main
  except ImportError:
    pass
  try:
    from gptjax.data import tokenizer_cli
    commands["tokenizer"] = tokenizer_cli.tokenizer_main
  except ImportError:
    pass
  try:
    from gptjax import pipeline
    commands["pipeline"] = pipeline.main
  except ImportError:
    pass
  if argv and argv[0] == "eval":
    # lm-eval is imported only for this command: it is slow to import and an optional extra.
    try:
      from gptjax import lm_harness
    except ModuleNotFoundError as e:
      print(f"gptjax eval: needs lm-eval ({e}); pip install -e '.[eval]'", file=sys.stderr)
      return 2
    commands["eval"] = lm_harness.eval_main
  from gptjax import scaling
  commands["scaling"] = scaling.main
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
    print(__doc__.strip())
    if argv and argv[0] not in ("-h", "--help"):
      print(f"\ngptjax: unknown command {argv[0]!r}; expected one of {sorted(commands)}",
            file=sys.stderr)
      return 2
    return 0
  return commands[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
  sys.exit(main())
