"""The loss registry: each stage is a loss function selected by name in a config.

Every loss has the same signature, so the one train step can run any of them:

    loss_fn(params, batch, *, frozen, rng, model) -> (scalar loss, dict of metrics)

`frozen` is for parameters a loss reads but never trains: LoRA's frozen base, which the trainer's
wrapper reads; no objective's own loss uses it (reference log-probs travel in the batch; see
gptjax/objectives/__init__.py); `rng` is already folded
with the step number; `model` is the flax module. Metrics are scalars named with a slash-separated
group, e.g. "train/loss".

A loss is the trainable part of an objective; `gptjax.objectives` says what else each needs
(reference, critic, rollouts, data format). Registering a loss here alone is enough for an
objective that fits an existing runner's batch (the README's example).
"""

from __future__ import annotations

from typing import Callable

_REGISTRY: dict[str, Callable] = {}
_CHECKS: dict[str, Callable] = {}


def register(name: str, *, check: Callable | None = None):
  """`check(**hyperparameters)`, if given, raises ValueError naming a bad field. It runs when the
  config is bound (`stages.common.bind_loss`), so a bad value is a config error before training,
  not an exception from inside the traced step."""
  def deco(fn):
    if name in _REGISTRY and _REGISTRY[name] is not fn:
      raise ValueError(f"loss {name!r} is already registered")
    _REGISTRY[name] = fn
    if check is not None:
      _CHECKS[name] = check
    return fn
  return deco


def check(name: str, hyperparameters: dict) -> None:
  """Runs the check `name` registered with (if any) on the config's hyperparameters."""
  _import_builtin()
  if name in _CHECKS:
    _CHECKS[name](**hyperparameters)


def get(name: str) -> Callable:
  _import_builtin()
  if name not in _REGISTRY:
    raise KeyError(f"unknown loss {name!r}; registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def names() -> list[str]:
  _import_builtin()
  return sorted(_REGISTRY)


def _import_builtin():
  # Importing the modules runs their @register decorators. Modules that do not exist yet in a
  # partial checkout are skipped; a module that fails to import for another reason still raises.
  import importlib
  for mod in ("lm", "reward", "policy", "dpo"):
    try:
      importlib.import_module(f"gptjax.losses.{mod}")
    except ModuleNotFoundError as e:
      if e.name != f"gptjax.losses.{mod}":
        raise
  # The objectives' own files (rloo, kto, ...) register their losses too.
  importlib.import_module("gptjax.objectives").registered()
