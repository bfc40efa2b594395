"""The objective registry: what a stage runner and the rollouts need to know about a training
objective, in one object per objective.

    objective = objectives.get(cfg.loss.name)
    objective.loss            the registered loss: loss_fn(params, batch, *, frozen, rng, model, **hp)
    objective.runner          which stage runner wires it: pretrain | sft | reward | rl | preference
    objective.batch           the batch type its loss reads (gptjax/batches.py)
    objective.build           offline objectives: records -> batch arrays (the runner's batch builder)
    objective.read            offline objectives with a data format of their own: spec -> records
    objective.advantages      online objectives: the advantage estimator over an iteration's rollouts
    objective.kl              where the KL to the reference goes: 'reward' | 'loss' | 'none'
    objective.needs           {'reference', 'critic', 'group', 'reward'}: what the runner must supply

Hyperparameters are declared by the loss itself: its keyword-only arguments with defaults (other
than `frozen`, `rng`, `model`) are the fields `loss.<name>` may set, so `--config.loss.gamma=0.5`
works for any loss that takes `gamma`, without a preset that names it (`config.apply_overrides`
asks `hyperparameters`). `check`, if given, vets their values when the config is bound. Some are
`shared` with the rollouts and are read from `rl.*` instead, so the two can never differ
(temperature, GRPO's β and its length normaliser).

A new objective is one file: its loss (a pure function of log-probs, masks and advantages, wrapped
to take `params, batch, model`) and one `register(Objective(...))`. Nothing outside this package
compares objective names; runners, the rollouts, the pipeline, the comparison and the report card
read these fields. A loss registered with `losses.register` alone is an objective too: `get`
describes it from its signature and the stage it is trained in.

`frozen`: the step passes it to every loss as the place for networks a loss reads but never trains.
The trainer uses it for LoRA's frozen base (gptjax/lora.py wraps the loss to merge it in). No
objective's own loss reads it: reference log-probs are computed outside the step (once for offline
objectives, per iteration in the rollouts) and carried in the batch, which keeps the step's memory
to one network.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable

from gptjax import losses as losses_lib

RUNNERS = ("pretrain", "sft", "reward", "rl", "preference")
KL_PLACEMENTS = ("reward", "loss", "none")
NEEDS = ("reference", "critic", "group", "reward")
# Loss arguments the step supplies; every other keyword-only argument is a hyperparameter.
_STEP_ARGS = ("frozen", "rng", "model")


@dataclasses.dataclass(frozen=True)
class Objective:
  """See the module docstring."""
  name: str
  loss: Callable
  runner: str
  batch: type | None = None
  needs: frozenset = frozenset()
  kl: str = "none"
  advantages: Callable | None = None
  build: Callable | None = None
  read: Callable | None = None
  check: Callable | None = None
  shared: tuple = ()
  # An online objective whose loss recomputes log π with one update per iteration can take π_old
  # from the sampler (the ratio is 1 by construction); one with a critic needs the forward anyway.
  sampler_old_logp: bool = False
  # The aligned-policy objectives appear in the pipeline's comparison and report card.
  compared: bool = False
  # Metric -> the metric (or batch count) that weighs it when averaging over eval batches.
  eval_weights: dict = dataclasses.field(default_factory=dict)
  description: str = ""

  def __post_init__(self):
    if self.runner not in RUNNERS:
      raise ValueError(f"objective {self.name!r}: runner must be one of {RUNNERS}, got "
                       f"{self.runner!r}")
    if self.kl not in KL_PLACEMENTS:
      raise ValueError(f"objective {self.name!r}: kl must be one of {KL_PLACEMENTS}")
    unknown = set(self.needs) - set(NEEDS)
    if unknown:
      raise ValueError(f"objective {self.name!r}: unknown needs {sorted(unknown)}; "
                       f"expected some of {NEEDS}")
    if self.runner == "rl" and self.advantages is None:
      raise ValueError(f"objective {self.name!r}: an online objective needs an advantage "
                       "estimator")

  @property
  def online(self) -> bool:
    return self.runner == "rl"

  def hyperparameters(self) -> dict[str, Any]:
    return loss_hyperparameters(self.loss)


_REGISTRY: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
  """Registers `objective` (and its loss under the same name in `gptjax.losses`)."""
  old = _REGISTRY.get(objective.name)
  if old is not None and old != objective:
    raise ValueError(f"objective {objective.name!r} is already registered")
  losses_lib.register(objective.name, check=objective.check)(objective.loss)
  _REGISTRY[objective.name] = objective
  return objective


def _import_builtin():
  # Every module of this package is an objective file: adding one is adding a file, with no list
  # to edit. Sorted by name, so builtin.py (PPO, GRPO, DPO, ...) registers first.
  import pkgutil
  for mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{mod}")


def names() -> list[str]:
  _import_builtin()
  return sorted(_REGISTRY)


def registered() -> list[Objective]:
  """Every registered objective, in registration order (built-ins first)."""
  _import_builtin()
  return list(_REGISTRY.values())


# The runner each stage name meant before objectives named their runner; a loss registered with
# `losses.register` alone is trained by the runner of the stage it is given.
_STAGE_RUNNERS = {"pretrain": "pretrain", "sft": "sft", "reward": "reward", "rl": "rl",
                  "dpo": "preference", "preference": "preference"}


def get(name: str, *, stage: str | None = None) -> Objective:
  """The objective `name`; for a loss registered with `losses.register` alone, an objective
  described by its signature, trained by the runner of `stage`."""
  _import_builtin()
  if name in _REGISTRY:
    return _REGISTRY[name]
  loss = losses_lib.get(name)            # KeyError naming the registered losses
  runner = _STAGE_RUNNERS.get(stage or "", "preference")
  base = {"preference": "dpo", "rl": "grpo", "sft": "sft", "pretrain": "lm",
          "reward": "reward"}[runner]
  return dataclasses.replace(_REGISTRY[base], name=name, loss=loss, check=None, compared=False,
                             description=f"the loss {name!r}, in the {runner} runner")


def loss_hyperparameters(fn: Callable) -> dict[str, Any]:
  """The keyword-only arguments of a loss with their defaults: its declared hyperparameters."""
  params = inspect.signature(fn).parameters
  return {n: p.default for n, p in params.items()
          if p.kind == p.KEYWORD_ONLY and n not in _STEP_ARGS}


def hyperparameters(name: str) -> dict[str, Any]:
  """Declared hyperparameters of the loss `name` ({} for an unknown name)."""
  try:
    return loss_hyperparameters(losses_lib.get(name))
  except KeyError:
    return {}


def for_stage(cfg) -> Objective:
  """The objective a stage config trains: `loss.name`, in the runner of `cfg.stage`."""
  return get(cfg.loss.name, stage=cfg.stage)
