"""The one training loop. Every stage calls `train` with its own loss, batch source and hooks.

    train(cfg, Job(model=..., loss_fn=..., source=..., mesh=..., init_params=..., init_from=...,
                   evaluate=..., sample=...), workdir=...)

A batch source is any object with
    next(state) -> batch          global arrays sharded over the batch axes
    get_state() -> dict           JSON-able position, saved inside each checkpoint
    set_state(dict)               restores that position exactly
so a data loader and an RL rollout generator (which reads the current policy from `state`) plug in
the same way. Two optional methods:
    checkpoint_safe() -> bool     False while the source holds state it cannot save (an RL
                                  iteration's rollouts between minibatches); saves wait for True
    pop_metrics() -> dict         scalars the source measured (e.g. rl/score), logged with the step The loop owns: init or restore, the jitted step, logging, eval, samples, checkpoints
and clean shutdown on SIGTERM/SIGINT.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from gptjax import checkpoint as ckpt_lib
from gptjax import config as config_lib
from gptjax import lora as lora_lib
from gptjax import metrics as metrics_lib
from gptjax import sharding as shd
from gptjax import step as step_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
  state: Any
  step: int
  interrupted: bool = False
  stop_requested: bool = False     # SIGTERM/SIGINT arrived (interrupted, or after the last step)
  last_metrics: dict = dataclasses.field(default_factory=dict)
  timings: dict = dataclasses.field(default_factory=dict)


class NonFiniteError(RuntimeError):
  """A step's loss, gradient norm or parameters were NaN or infinite under nan_policy='halt'.

  Raised after the loop has closed its files; nothing after the last good checkpoint is saved."""

  exit_code = 3


NAN_POLICIES = ("halt", "skip")
# The number of skipped updates travels inside the checkpoint's JSON beside the data position, so
# a resumed run keeps counting from where it was.
_SKIPPED_KEY = "trainer/nonfinite_skipped"
_WATCHED = ("train/loss", "train/grad_norm", "train/param_norm")


def _nonfinite_message(workdir, step, metrics, saved_steps) -> str:
  bad = [k for k in _WATCHED if k in metrics and not np.isfinite(float(metrics[k]))]
  shown = ", ".join(f"{k}={float(metrics[k])}" for k in bad) or "a non-finite value"
  kept = (f"checkpoints kept: steps {', '.join(map(str, saved_steps))}" if saved_steps
          else "no checkpoint was written")
  return (f"{shown} at step {step} in {workdir}; the run stops (train.nan_policy="
          f"'halt') and the update was not applied or saved; {kept}. Lower optim.lr or raise "
          f"optim.warmup_steps, or set --config.train.nan_policy=skip to skip such steps.")


class _StopFlag:
  """Turns SIGTERM/SIGINT into a request to save and stop after the current step."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[s] = signal.signal(s, self._handle)
      except ValueError:          # not the main thread (e.g. inside a notebook worker)
        pass
    return self

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt     # a second Ctrl-C means stop now
    self.signum = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


def abstract_with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def make_eval_step(loss_fn, model):
  """A jitted forward-only evaluation of a loss; returns its metrics plus `loss`."""
  @jax.jit
  def eval_step(params, batch, frozen):
    loss, metrics = loss_fn(params, batch, frozen=frozen, rng=None, model=model)
    return {**metrics, "loss": loss}
  return eval_step


def average_metrics(ms: list[dict]) -> dict:
  ms = jax.device_get(ms)
  return {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}


@dataclasses.dataclass
class Job:
  """What one stage hands the loop: its network, loss, batches and hooks.

  init_params(rng) -> boxed params (flax `init` output); called under eval_shape and jit, so the
  full state is never built on one device. init_from(fresh_params) -> params, when there is no
  checkpoint in the workdir yet (e.g. load the previous stage's parameters). `frozen` reaches
  every loss call unchanged: networks a loss reads but never trains (with LoRA, the frozen base;
  see gptjax/objectives). base_params: with LoRA, the initial full parameters to keep frozen (the
  runner's reference reads the same buffers). evaluate(state) and sample(state) run every
  train.eval_every / train.sample_every steps; on_step(step, state, metrics) after every step.
  tokens_per_step and flops_per_token feed the throughput and MFU logs; `steps` overrides
  train.steps (RL counts iterations).
  """
  model: Any
  loss_fn: Callable
  source: Any
  mesh: Any
  init_params: Callable
  init_from: Callable | None = None
  frozen: Any = None
  evaluate: Callable | None = None
  sample: Callable | None = None
  on_step: Callable | None = None
  tokens_per_step: int | None = None
  flops_per_token: float | None = None
  steps: int | None = None
  base_params: Any = None


@dataclasses.dataclass
class Setup:
  """Everything the loop compiles before it touches data or a checkpoint: the optimizer, the
  state's shapes and shardings, and the jitted step. With LoRA, `model`, `loss_fn`,
  `init_params`, `init_from` and `frozen` are the adapter versions (Adapters.for_run).

  Built without allocating the state (shapes come from eval_shape), so the memory plan
  (gptjax/memory.py) can lower the very step a run would compile."""
  total: int
  optimizer: Any
  schedule: Callable
  adapters: Any
  model: Any
  loss_fn: Callable
  init_params: Callable
  init_from: Callable | None
  frozen: Any
  init_rng: Any
  state_sharding: Any
  make_state: Callable
  abstract_state: Any
  train_step: Callable
  view: Callable


def setup(cfg, job: Job) -> Setup:
  """The optimizer, state shapes/shardings and the jitted step of `job` under `cfg`. With LoRA
  and no `job.base_params`, the frozen base is built here (a jitted init, plus init_from)."""
  model, loss_fn, mesh = job.model, job.loss_fn, job.mesh
  init_params, init_from, frozen = job.init_params, job.init_from, job.frozen
  total = int(cfg.train.steps if job.steps is None else job.steps)
  rules = shd.rules_from_config(cfg.mesh.rules)
  optim_cfg = cfg.optim.to_dict()
  if not optim_cfg.get("decay_steps"):
    optim_cfg["decay_steps"] = max(total, 1)
  optim_cfg = type("O", (), optim_cfg)
  optimizer = step_lib.make_optimizer(optim_cfg)
  schedule = step_lib.lr_schedule(optim_cfg)

  rng = jax.random.key(cfg.seed)
  init_rng = jax.random.fold_in(rng, 0)
  adapters = lora_lib.Adapters.for_run(cfg, model=model, loss_fn=loss_fn, init_params=init_params,
                                       init_from=init_from, frozen=frozen, mesh=mesh, rules=rules,
                                       init_rng=init_rng, base_params=job.base_params)
  if adapters is not None:
    # LoRA: the state holds the adapters (and scalar heads) only; the base rides in `frozen`.
    model, loss_fn, init_params, init_from, frozen = (
        adapters.model, adapters.loss_fn, adapters.init_params, adapters.init_from,
        adapters.frozen)
  boxed = jax.eval_shape(init_params, init_rng)
  state_sh = step_lib.state_shardings(boxed, optimizer, mesh, rules)

  def make_state(r):
    params = nn.meta.unbox(init_params(r))
    return step_lib.init_state(params, optimizer, cfg.seed)

  abstract_state = abstract_with_shardings(jax.eval_shape(make_state, init_rng), state_sh)
  train_step = step_lib.make_train_step(loss_fn, optimizer, model=model, state_sharding=state_sh,
                                        mesh=mesh, grad_accum=cfg.train.grad_accum,
                                        schedule=schedule)
  return Setup(total=total, optimizer=optimizer, schedule=schedule, adapters=adapters,
               model=model, loss_fn=loss_fn, init_params=init_params, init_from=init_from,
               frozen=frozen, init_rng=init_rng, state_sharding=state_sh, make_state=make_state,
               abstract_state=abstract_state, train_step=train_step,
               view=adapters.view if adapters is not None else (lambda s: s))


def train(cfg, job: Job, *, workdir: str, progress: bool = True) -> TrainResult:
  """Runs (or resumes) one stage to `cfg.train.steps` (or `job.steps`) and saves its final
  checkpoint."""
  source = job.source
  evaluate, sample, on_step = job.evaluate, job.sample, job.on_step
  tokens_per_step, flops_per_token = job.tokens_per_step, job.flops_per_token
  t_cfg = cfg.train
  nan_policy = t_cfg.get("nan_policy", "halt")
  if nan_policy not in NAN_POLICIES:
    raise config_lib.ConfigError(f"train.nan_policy: expected one of {NAN_POLICIES}, got "
                                 f"{nan_policy!r}")
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(cfg))

  built = setup(cfg, job)
  total, optimizer, init_from, frozen = built.total, built.optimizer, built.init_from, built.frozen
  make_state, state_sh, init_rng = built.make_state, built.state_sharding, built.init_rng
  ckpt = ckpt_lib.Checkpointer(workdir, keep=t_cfg.keep_checkpoints)
  restored = ckpt.restore(built.abstract_state)
  if restored is not None:
    state, data_state, at = restored
    data_state = dict(data_state)
    skipped_before = int(data_state.pop(_SKIPPED_KEY, 0))
    source.set_state(data_state)
    print(f"[{workdir}] resumed from step {at}", flush=True)
  else:
    skipped_before = 0
    state = jax.jit(make_state, out_shardings=state_sh)(init_rng)
    if init_from is not None:
      params = init_from(state.params)
      state = jax.jit(lambda p: step_lib.init_state(p, optimizer, cfg.seed),
                      out_shardings=state_sh)(params)

  train_step, view = built.train_step, built.view
  writer = metrics_lib.MetricWriter(workdir)
  peak = metrics_lib.peak_flops(jax.devices()[0], cfg.model.get("dtype", "float32"))
  step = int(jax.device_get(state.step))
  result = TrainResult(state=state, step=step)
  bar = None
  if progress and is_main:
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=step, desc=os.path.basename(os.path.normpath(workdir)),
               dynamic_ncols=True, mininterval=0.5)

  timings = {"compile_s": 0.0, "train_s": 0.0, "tokens": 0, "steps": 0}
  window_t, window_tokens, window_steps = time.perf_counter(), 0, 0
  last_logged = {}
  rl_post = {}
  pending_source_metrics = {}
  safe = getattr(source, "checkpoint_safe", lambda: True)
  save_due = False
  # Non-finite steps never change the state (the step selects the old one on device). Under
  # 'halt' the loop reads each step's flag one step late, after the next step is queued, so the
  # device never waits on the host; under 'skip' the count stays on the device until a log or a
  # save reads it.
  skipped = jax.numpy.asarray(skipped_before, jax.numpy.int32)
  unchecked = None                 # (step, metrics) whose flag the host has not read yet
  halted = None

  def first_nonfinite(pending):
    if pending is None or nan_policy != "halt":
      return None
    at, m = pending
    return _nonfinite_message(workdir, at, jax.device_get(m), ckpt.all_steps()) if int(
        jax.device_get(m["train/nonfinite"])) else None

  def save(at):
    nonlocal halted
    halted = halted or first_nonfinite(unchecked)
    if halted:
      return False
    data = source.get_state()
    if nan_policy == "skip":
      data = {**data, _SKIPPED_KEY: int(jax.device_get(skipped))}
    ckpt.save(at, state, data)
    return True

  with _StopFlag() as stop:
    while step < total:
      t0 = time.perf_counter()
      batch = source.next(view(state))
      state, metrics = train_step(state, batch, frozen)
      step += 1
      halted = first_nonfinite(unchecked)
      if halted:
        break
      unchecked = (step, metrics)
      if nan_policy == "skip":
        skipped = skipped + metrics["train/nonfinite"]
      first = timings["steps"] == 0 and timings["compile_s"] == 0.0
      if first:
        jax.block_until_ready(state.params)
        timings["compile_s"] = time.perf_counter() - t0
        window_t, window_tokens, window_steps = time.perf_counter(), 0, 0
      else:
        window_tokens += tokens_per_step or 0
        window_steps += 1
      log_now = t_cfg.log_every and (step % t_cfg.log_every == 0 or step == total)
      if hasattr(source, "pop_metrics"):
        pending_source_metrics.update(source.pop_metrics())
      if log_now or on_step is not None:
        metrics = jax.device_get(metrics)
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics.update(pending_source_metrics)
        pending_source_metrics = {}
        unchecked = (step, metrics)
        halted = first_nonfinite(unchecked)
        if halted:
          break
        unchecked = None
        if nan_policy == "skip":
          metrics["train/skipped_steps"] = float(jax.device_get(skipped))
      if log_now:
        elapsed = time.perf_counter() - window_t
        if window_steps:
          metrics["perf/steps_per_sec"] = window_steps / elapsed
          timings["train_s"] += elapsed
          timings["steps"] += window_steps
          if tokens_per_step:
            tps = window_tokens / elapsed
            metrics["perf/tokens_per_sec"] = tps
            timings["tokens"] += window_tokens
            if flops_per_token:
              metrics["perf/mfu"] = metrics_lib.mfu(flops_per_token, tps,
                                                    num_devices=jax.device_count(), peak=peak)
        writer.scalars(step, metrics)
        last_logged = metrics
        if bar is not None:
          post = {"loss": f"{metrics['train/loss']:.4f}"}
          # What an RL run is for: the RM's score, the gold labeler's and the KL to the reference
          # (logged once per iteration by the rollout source; the last value stays shown).
          for key, short in (("rl/score", "score"), ("rl/gold_score", "gold"), ("rl/kl", "kl")):
            if key in metrics:
              rl_post[short] = f"{metrics[key]:.3f}"
          post.update(rl_post)
          if "perf/tokens_per_sec" in metrics:
            post["tok/s"] = f"{metrics['perf/tokens_per_sec']:.0f}"
          if "perf/mfu" in metrics:
            post["mfu"] = f"{100 * metrics['perf/mfu']:.1f}%"
          bar.set_postfix(post, refresh=False)
        window_t, window_tokens, window_steps = time.perf_counter(), 0, 0
      if on_step is not None:
        on_step(step, view(state), metrics)
      if bar is not None:
        bar.update(1)
      if evaluate is not None and t_cfg.eval_every and (step % t_cfg.eval_every == 0 or
                                                        step == total):
        t_eval = time.perf_counter()
        ev = evaluate(view(state))
        writer.scalars(step, ev)
        last_logged.update(ev)
        window_t += time.perf_counter() - t_eval      # eval time is not training time
        if bar is not None:
          bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in ev.items()))
      if sample is not None and t_cfg.sample_every and (step % t_cfg.sample_every == 0 or
                                                        step == total):
        t_s = time.perf_counter()
        text = sample(view(state))
        writer.text(step, "samples", text)
        window_t += time.perf_counter() - t_s
      if t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0 and step < total:
        save_due = True
      if save_due and safe():
        if not save(step):
          break
        save_due = False
      if stop.signum is not None and safe():
        if not save(step):
          break
        name = signal.Signals(stop.signum).name
        msg = (f"[{workdir}] {name}: saved checkpoint at step {step}; run the same command again "
               "to resume.")
        if bar is not None:
          bar.write(msg)
        else:
          print(msg, flush=True)
        result.interrupted = True
        break
    else:
      save(step)

    # Still under the flag: a SIGTERM during the final save and its wait (ckpt.close) must not
    # kill the process half-way through writing the checkpoint. A stop asked for after the last
    # step's check is reported, so the caller (the pipeline) stops before its next stage instead
    # of swallowing it.
    if bar is not None:
      bar.close()
    writer.close()
    ckpt.close()
    result.stop_requested = stop.signum is not None
  if halted:
    raise NonFiniteError(halted)
  if nan_policy == "skip" and int(jax.device_get(skipped)):
    print(f"[{workdir}] train.nan_policy='skip': {int(jax.device_get(skipped))} step(s) had a "
          "non-finite loss or gradient and changed nothing", flush=True)
  result.state, result.step, result.last_metrics, result.timings = (view(state), step, last_logged,
                                                                      timings)
  return result
