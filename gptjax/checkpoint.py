"""Orbax checkpoints of {train state, data-iterator state}, in `<workdir>/checkpoints/<step>`.

Resume order when a run starts: (1) the newest readable checkpoint in its own workdir; (2) else the
parameters of `init_from` (another run's workdir, e.g. the previous stage); (3) else fresh init.
A checkpoint that cannot be read is reported, moved aside (never deleted: it may still hold
something a person wants), and the previous one is used; when none is readable the run stops
instead of silently starting again from step 0. A save that meets a full or read-only disk stops
with one message naming the path and the free space; what was saved before stays intact, and
the half-written `*.orbax-checkpoint-tmp` directory is removed (also those a kill left behind).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import re
import shutil
import time

import jax
import orbax.checkpoint as ocp

from gptjax.errors import CheckpointError, free_space_note

log = logging.getLogger(__name__)

_DISK_ERRORS = {errno.ENOSPC: "no space left on the disk", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "the disk is read-only", errno.EACCES: "permission denied"}


def _disk_problem(e: BaseException | None) -> int | None:
  """The errno of a full, read-only or forbidden disk behind `e`, if that is what it is.

  TensorStore reports OS errors as ValueError text ("... [os_error_code='28']"), and orbax
  re-raises them from its writer threads, so the chain and the text are both searched."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
      return e.errno
    m = re.search(r"os_error_code='(\d+)'", str(e))
    if m and int(m.group(1)) in _DISK_ERRORS:
      return int(m.group(1))
    e = e.__cause__ or e.__context__
  return None


class _DropThreadReports(logging.Filter):
  """Orbax logs every writer thread's exception with its traceback before re-raising it in the
  caller (dozens of blocks for one full disk); the caller's exception is what gets reported."""

  def filter(self, record):
    return "raised an exception" not in record.getMessage()


@contextlib.contextmanager
def _quiet_writer_threads():
  f = _DropThreadReports()
  loggers = [logging.getLogger("absl"), logging.getLogger()]
  for lg in loggers:
    lg.addFilter(f)
  try:
    yield
  finally:
    for lg in loggers:
      lg.removeFilter(f)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _ignore_abandoned_io() -> None:
  """Drops the 'Event loop is closed' reports that follow a failed restore or save, and only
  those.

  When one read of a damaged checkpoint (or one write to a full disk) fails, orbax closes the
  event loop of that call while TensorStore is still finishing the other reads or writes it
  started; their completion callbacks then find the loop closed and Python prints each as an
  unraisable exception (a traceback per array) although the failure itself is already handled.
  Installed once, when a Checkpointer opens; every other unraisable exception goes to the
  previous hook."""
  import sys
  previous = sys.unraisablehook
  if getattr(previous, "_gptjax_abandoned_reads", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
      return
    previous(unraisable)
  hook._gptjax_abandoned_reads = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_DropSiblingDiskErrors())


class _DropSiblingDiskErrors(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" report when the task died of a full
  or read-only disk.

  One checkpoint save runs a task per array; when the disk fills, the first failure reaches our
  caller (one message, exit 2), while sibling tasks that failed the same way are dropped
  unawaited and asyncio logs each one, traceback included, when it is garbage-collected, which
  may be after the save has returned. Any other never-retrieved exception is still reported."""

  def filter(self, record):
    if "exception was never retrieved" not in str(record.msg):
      return True
    exc = record.exc_info[1] if record.exc_info else None
    return _disk_problem(exc) is None


class Checkpointer:
  def __init__(self, workdir: str, *, keep: int = 3):
    self.directory = checkpoint_dir(workdir)
    self.keep = keep
    self._open()

  def _open(self):
    _ignore_abandoned_io()
    self.clean_partial()
    options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                           enable_async_checkpointing=False)
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      if _disk_problem(e) is None:
        raise
      raise self._disk_error(e, "cannot create the checkpoint directory") from None

  def clean_partial(self) -> None:
    """Removes half-written checkpoints (a kill or a full disk during a save). They never hold
    a whole state, so they cannot be resumed from, and they would fill the disk again."""
    if jax.process_index() != 0:
      return
    for path in glob.glob(os.path.join(glob.escape(self.directory), "*.orbax-checkpoint-tmp*")):
      shutil.rmtree(path, ignore_errors=True)
      print(f"[checkpoint] removed the partial checkpoint {path}", flush=True)

  def _disk_error(self, e, what: str) -> CheckpointError:
    code = _disk_problem(e)
    latest = [s for s in self._steps_on_disk()]
    kept = (f"the checkpoints already there are intact (newest: step {latest[-1]})" if latest
            else "no checkpoint was saved before")
    return CheckpointError(
        f"{what} under {self.directory}: {_DISK_ERRORS[code]}{free_space_note(self.directory)}; "
        f"{kept}. Free space (or make the disk writable, or use another --workdir with the "
        "checkpoints copied over) and run the same command again to resume.")

  def _steps_on_disk(self) -> list[int]:
    return sorted(int(os.path.basename(p)) for p in glob.glob(
        os.path.join(glob.escape(self.directory), "[0-9]*")) if os.path.basename(p).isdigit())

  def _prune(self) -> None:
    """Keeps the newest `keep` checkpoints. Orbax prunes after each save, but a kill between a
    save and its pruning, or a resume that saves nothing new, used to leave one too many."""
    steps = self.all_steps()
    for s in steps[:-self.keep] if len(steps) > self.keep else []:
      self.manager.delete(s)

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, *, force: bool = True) -> None:
    if step in self.manager.all_steps():
      return
    try:
      with _quiet_writer_threads():
        self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)
        self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - only a disk problem is turned into a message
      if _disk_problem(e) is None:
        raise
      self.clean_partial()
      raise self._disk_error(e, f"could not write the checkpoint of step {step}") from None
    self._prune()

  def restore(self, abstract_state, step: int | None = None):
    """Restores the newest readable checkpoint into `abstract_state`'s shapes and shardings.

    Returns (state, data_state, step), or None when there is no checkpoint at all.
    """
    steps = self.all_steps() if step is None else [step]
    moved = []
    for i, s in reversed(list(enumerate(steps))):
      try:
        with _quiet_writer_threads():
          out = self.manager.restore(s, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except Exception as e:  # orbax raises many types for a damaged directory
        if step is not None:
          raise
        bad = os.path.join(self.directory, str(s))
        aside = os.path.join(self.directory, f"unreadable-{s}-{int(time.time())}")
        then = (f"falling back to step {steps[i - 1]}" if i else
                "there is no older checkpoint")
        log.warning("checkpoint %s is unreadable (%s: %s); moving it to %s; %s", bad,
                    type(e).__name__, str(e)[:300], aside, then)
        print(f"WARNING: checkpoint {bad} is unreadable ({type(e).__name__}); {then}. The "
              f"unreadable one is kept at {aside}.", flush=True)
        if jax.process_index() == 0 and os.path.exists(bad):
          os.rename(bad, aside)
        moved.append(aside)
        self.manager.close()
        self._open()
        continue
      if moved or len(steps) > self.keep:
        self._prune()
      return out["state"], out["data"], s
    if moved:
      # Starting again from step 0 in this workdir would quietly throw the run's progress
      # away (and later overwrite what a person may still rescue); that is theirs to decide.
      raise CheckpointError(
          f"no readable checkpoint in {self.directory}: every one failed to load and was moved "
          f"aside ({', '.join(moved)}). To start this run again from step 0, move "
          f"{os.path.dirname(self.directory)} away (or use another --workdir); to start from "
          "another run's parameters, set train.init_from.")
    return None

  def close(self):
    self.manager.close()


def restore_params(workdir: str, abstract_params, step: int | None = None):
  """Only the parameters of another run (for `init_from`), into `abstract_params`' shardings.

  A LoRA run's checkpoint holds its adapters only; asked for a plain tree, it comes back with the
  adapters merged into that run's base (gptjax/lora.py)."""
  from gptjax import lora
  if lora.workdir_spec(workdir) is not None and not lora.has_adapters(abstract_params):
    return lora.load_merged(workdir, abstract_params, step=step)
  directory = checkpoint_dir(workdir)
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=False, enable_async_checkpointing=False))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {directory}: the run there has saved none (yet)")
  target = {"params": abstract_params}
  # Leaves without a sharding (inference loads) are replicated over all devices, so the same
  # call works on one CPU and under a mesh.
  everywhere = jax.sharding.NamedSharding(
      jax.make_mesh((jax.device_count(),), ("all",),
                    axis_types=(jax.sharding.AxisType.Auto,)), jax.sharding.PartitionSpec())
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item=target,
          restore_args=jax.tree.map(
              lambda x: ocp.ArrayRestoreArgs(sharding=getattr(x, "sharding", None) or everywhere,
                                             global_shape=x.shape, dtype=x.dtype),
              target),
          partial_restore=True)))
  mngr.close()
  params = restored["state"]["params"]
  # With partial_restore, a leaf the checkpoint lacks comes back as its abstract placeholder;
  # passing that on fails far away (inside jit) with a message about ShapeDtypeStructs.
  missing = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(params)
             if not isinstance(x, jax.Array)]
  if missing:
    shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
    raise ValueError(f"{directory}/{step}: the checkpoint has no parameter(s) {shown} "
                     f"({len(missing)} missing); its layout differs from the model its "
                     "config.json describes")
  return params


def policy_layout(cfg) -> str | None:
  """The key the language model's parameters sit under in a workdir's checkpoint: None for a
  plain GPT tree (pretrain, SFT, reward, DPO, PPO with a value head, GRPO), 'policy' for PPO
  with `rl.value_model=critic`, whose params are {'policy': GPT, 'critic': GPT}."""
  return "policy" if cfg.get("rl", {}).get("value_model") == "critic" else None


def load_for_inference(workdir: str, step: int | None = None):
  """(model, params, tokenizer, config) of the language model of any stage's workdir, on the
  default device(s); of an actor-critic PPO run, the policy alone."""
  import flax.linen as nn
  import jax.numpy as jnp
  from gptjax import config as config_lib
  from gptjax.data import tokenizers
  from gptjax.model import GPT
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(not_a_workdir_message(workdir))
  cfg = config_lib.from_json(cfg_path)
  mcfg = config_lib.model_config(cfg)
  model = GPT(mcfg)
  abstract = jax.eval_shape(lambda: nn.meta.unbox(
      model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
  key = policy_layout(cfg)
  params = restore_params(workdir, {key: abstract} if key else abstract, step)
  tok = tokenizers.load_tokenizer(workdir)
  return model, (params[key] if key else params), tok, cfg


def not_a_workdir_message(workdir: str) -> str:
  """Why `workdir` cannot be loaded, and what to pass instead when it is a pipeline run."""
  configs = [os.path.join(workdir, d, "config.json")
             for d in (os.listdir(workdir) if os.path.isdir(workdir) else [])]
  # In the order they ran (a stage writes its config.json when it starts).
  stages = [os.path.basename(os.path.dirname(c))
            for c in sorted((c for c in configs if os.path.exists(c)), key=os.path.getmtime)]
  if stages:
    example = "ppo" if "ppo" in stages else stages[-1]
    return (f"{workdir} is a pipeline run, not a stage's workdir; its stages are: "
            f"{', '.join(stages)}. Pass one of them, e.g. --workdir "
            f"{os.path.join(workdir, example)}")
  if not os.path.isdir(workdir):
    return f"{workdir}: no such directory"
  return f"{workdir} has no config.json; expected a training workdir (config.json, checkpoints)"


def _paths(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def init_from_workdir(workdir: str, fresh_params, *, strict_prefix: str | None = None,
                      step: int | None = None):
  """Loads another run's GPT parameters into `fresh_params` (a sharded tree of the new stage).

  Leaves present in both with the same shape are taken from `workdir`; leaves only in the new
  model (e.g. a reward head) keep their fresh initialisation and are listed; a leaf with a shape
  that differs is an error, since silently re-initialising it would lose the previous stage.
  """
  import flax.linen as nn
  import jax.numpy as jnp
  from gptjax import config as config_lib
  from gptjax.model import GPT
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"init_from: {workdir} has no config.json; is it a gptjax workdir?")
  prev_cfg = config_lib.from_json(cfg_path)
  prev_model = GPT(config_lib.model_config(prev_cfg))
  prev_abstract = jax.eval_shape(lambda: nn.meta.unbox(
      prev_model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
  fresh = _paths(fresh_params)
  repl = jax.sharding.NamedSharding(
      jax.tree.leaves(fresh_params)[0].sharding.mesh, jax.sharding.PartitionSpec())

  def target(path, a):
    key = jax.tree_util.keystr(path)
    f = fresh.get(key)
    if f is not None and f.shape != a.shape:
      raise ValueError(f"init_from {workdir}: parameter {key} has shape {a.shape} there but "
                       f"{f.shape} in this model; the model configs disagree")
    sh = f.sharding if f is not None else repl
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)

  target_tree = jax.tree_util.tree_map_with_path(target, prev_abstract)
  loaded = _paths(restore_params(workdir, target_tree, step))
  missing = sorted(k for k in fresh if k not in loaded)
  if missing:
    print(f"init_from {workdir}: freshly initialised {len(missing)} parameter(s) not in the "
          f"previous run: {', '.join(missing)}", flush=True)

  def pick(path, f):
    return loaded.get(jax.tree_util.keystr(path), f)

  return jax.tree_util.tree_map_with_path(pick, fresh_params)
