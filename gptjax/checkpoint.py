"""Orbax checkpoints of {train state, data-iterator state}, in `<workdir>/checkpoints/<step>`.

Resume order when a run starts: (1) the newest readable checkpoint in its own workdir; (2) else the
parameters of `init_from` (another run's workdir, e.g. the previous stage); (3) else fresh init.
A checkpoint that cannot be read is reported, moved aside (never deleted: it may still hold
something a person wants), and the previous one is used.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  def __init__(self, workdir: str, *, keep: int = 3):
    self.directory = checkpoint_dir(workdir)
    self.keep = keep
    self._open()

  def _open(self):
    options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, *, force: bool = True) -> None:
    if step in self.manager.all_steps():
      return
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)
    self.manager.wait_until_finished()

  def restore(self, abstract_state, step: int | None = None):
    """Restores the newest readable checkpoint into `abstract_state`'s shapes and shardings.

    Returns (state, data_state, step), or None when there is no checkpoint at all.
    """
    steps = self.all_steps() if step is None else [step]
    for s in reversed(steps):
      try:
        out = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], out["data"], s
      except Exception as e:  # orbax raises many types for a damaged directory
        if step is not None:
          raise
        bad = os.path.join(self.directory, str(s))
        aside = os.path.join(self.directory, f"unreadable-{s}-{int(time.time())}")
        log.warning("checkpoint %s is unreadable (%s: %s); moving it to %s and falling back to "
                    "the previous one", bad, type(e).__name__, str(e)[:300], aside)
        print(f"WARNING: checkpoint {bad} is unreadable ({type(e).__name__}); falling back to the "
              f"previous checkpoint. The unreadable one is kept at {aside}.", flush=True)
        if jax.process_index() == 0 and os.path.exists(bad):
          os.rename(bad, aside)
        self.manager.close()
        self._open()
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
