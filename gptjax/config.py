"""Config files and command-line overrides.

A config is a Python file with `get_config(arg)` returning an `ml_collections.ConfigDict`; the
launch spec is `path.py:arg` (the argument picks a preset such as `tiny`). Any field can then be
overridden with `--config.a.b=value`. Unknown fields and values of the wrong type fail at once
with a message naming the field; `validate` checks the fields against each other and the devices.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os

import ml_collections


class ConfigError(ValueError):
  pass


def _config_package(directory: str) -> str | None:
  """The name under which a config directory with an `__init__.py` is importable as a package,
  registered on first use. Its files then import each other relatively (`from . import common`),
  without putting the directory on sys.path, and two directories never share a name."""
  if not os.path.exists(os.path.join(directory, "__init__.py")):
    return None
  import hashlib
  import sys
  name = "gptjax_configs_" + hashlib.sha1(directory.encode()).hexdigest()[:10]
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(directory, "__init__.py"), submodule_search_locations=[directory])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
  return name


def load_module(path: str):
  """Executes a config file afresh (an edited file is read again). A file in a package directory
  (experiments/ has an `__init__.py`) runs as a module of that package, so its relative imports
  of sibling config files work."""
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist")
  stem = os.path.splitext(os.path.basename(path))[0]
  package = _config_package(os.path.dirname(os.path.abspath(path)))
  name = f"{package}.{stem}" if package else "gptjax_config_" + stem
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path}: defines no get_config(arg)")
  return module


def load(spec: str, overrides=()) -> ml_collections.ConfigDict:
  """`experiments/x.py:tiny` plus overrides like `train.steps=100` -> a locked ConfigDict."""
  path, _, arg = spec.partition(":")
  module = load_module(path)
  try:
    cfg = module.get_config(arg) if arg else module.get_config(None)
  except (ValueError, KeyError, TypeError) as e:
    # An unknown preset, mostly; a config file is the user's input, so its complaint is theirs.
    raise ConfigError(f"{spec}: {e}") from None
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
  apply_overrides(cfg, overrides)
  cfg.lock()
  return cfg


def _all_fields(cfg, prefix=""):
  for k, v in cfg.items():
    key = f"{prefix}{k}"
    yield key
    if isinstance(v, ml_collections.ConfigDict):
      yield from _all_fields(v, key + ".")


def _parse_value(text: str, old, field: str):
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text                    # a bare word is a string
  if old is None:
    return value
  if isinstance(old, bool):
    if isinstance(value, str) and value.lower() in ("true", "false"):
      return value.lower() == "true"
    if not isinstance(value, bool):
      raise ConfigError(f"config field {field!r}: expected true or false, got {text!r}")
    return value
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(old, str) and not isinstance(value, str):
    return text
  if isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
    return type(old)(value)
  if type(value) is not type(old):
    raise ConfigError(f"config field {field!r}: expected {type(old).__name__}, got {text!r}")
  return value


def _declared_loss_field(node, parts, i) -> bool:
  """Whether parts[i] is a hyperparameter the loss of a `loss` node declares but the preset does
  not set: it is added (with the loss's default), so `--config.loss.gamma=…` works for any loss
  that takes `gamma`."""
  if i != len(parts) - 1 or (parts[i - 1] if i else None) != "loss" or "name" not in node:
    return False
  from gptjax import objectives
  declared = objectives.hyperparameters(node.name)
  if parts[i] not in declared:
    return False
  with node.unlocked():
    node[parts[i]] = declared[parts[i]]
  return True


def _keep_declared_loss_fields(node, name: str) -> None:
  """A preset's loss.* fields belong to the preset's loss. When `loss.name` names another one,
  the fields it does not declare are dropped, so a new loss need not accept its predecessor's
  hyperparameters; one given on the command line after this is still checked against the new
  loss's declaration (name overrides are applied first)."""
  from gptjax import objectives
  declared = objectives.hyperparameters(name)
  with node.unlocked():
    for field in [f for f in node.keys() if f != "name" and f not in declared]:
      del node[field]


def apply_overrides(cfg: ml_collections.ConfigDict, overrides) -> None:
  items = [o[len("--config."):] if o.startswith("--config.") else o for o in overrides]
  # A loss's name first: its declared hyperparameters decide which loss.* fields exist.
  items.sort(key=lambda o: not o.split("=", 1)[0].endswith("loss.name"))
  for item in items:
    if "=" not in item:
      raise ConfigError(f"config override {item!r}: expected field=value")
    key, text = item.split("=", 1)
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
      if isinstance(node, ml_collections.ConfigDict) and part not in node and \
          _declared_loss_field(node, parts, i):
        pass
      elif not isinstance(node, ml_collections.ConfigDict) or part not in node:
        if i == len(parts) - 1 and i and parts[i - 1] == "loss" and "name" in node:
          from gptjax import objectives
          takes = ", ".join(objectives.hyperparameters(node.name)) or "none"
          raise ConfigError(f"{key}: loss {node.name!r} takes no hyperparameter {part!r}; it "
                            f"takes {takes}")
        known = list(_all_fields(cfg))
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config field {key!r}{hint}")
      if i < len(parts) - 1:
        node = node[part]
    old = node[parts[-1]]
    value = _parse_value(text, old, key)
    if parts[-1] == "name" and len(parts) >= 2 and parts[-2] == "loss" and value != old:
      _keep_declared_loss_fields(node, value)
    with node.unlocked():
      node[parts[-1]] = value


def split_argv(argv):
  """Separates `--config.x=y` overrides from the other arguments."""
  overrides, rest = [], []
  for a in argv:
    (overrides if a.startswith("--config.") else rest).append(a)
  return overrides, rest


def to_json(cfg) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def from_json(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def validate(cfg, num_devices: int | None = None, num_processes: int = 1) -> None:
  """Checks fields against each other and the hardware; every message names its field."""
  from gptjax import sharding
  import jax
  num_devices = jax.device_count() if num_devices is None else num_devices
  try:
    shape = sharding.mesh_shape(cfg.mesh.shape, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    mcfg = model_config(cfg).resolved()
  except (ValueError, TypeError) as e:
    raise ConfigError(str(e)) from None
  t = cfg.train
  dp = shape[0] * shape[1]
  if t.batch_size <= 0:
    raise ConfigError(f"train.batch_size: must be positive, got {t.batch_size}")
  if t.grad_accum <= 0 or t.batch_size % t.grad_accum:
    raise ConfigError(f"train.grad_accum: {t.grad_accum} does not divide train.batch_size="
                      f"{t.batch_size}")
  micro = t.batch_size // t.grad_accum
  if micro % dp:
    raise ConfigError(f"train.batch_size: the micro-batch of {micro} rows does not divide across "
                      f"the {dp} data-parallel devices (mesh.shape={shape})")
  if t.batch_size % num_processes:
    raise ConfigError(f"train.batch_size: {t.batch_size} does not divide across "
                      f"{num_processes} processes")
  if "seq_len" in cfg.data and cfg.data.seq_len > mcfg.max_len:
    raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds model.max_len={mcfg.max_len}")
  if t.steps < 0:
    raise ConfigError(f"train.steps: must be >= 0, got {t.steps}")
  for f in ("eval_every", "sample_every", "checkpoint_every", "log_every"):
    if t[f] < 0:
      raise ConfigError(f"train.{f}: must be >= 0 (0 disables), got {t[f]}")
  if t.keep_checkpoints < 1:
    raise ConfigError(f"train.keep_checkpoints: must be >= 1, got {t.keep_checkpoints}")
  if t.get("nan_policy", "halt") not in ("halt", "skip"):
    raise ConfigError(f"train.nan_policy: expected 'halt' or 'skip', got {t.nan_policy!r}")
  check_ranges(cfg)
  from gptjax import losses
  if cfg.loss.name not in losses.names():
    raise ConfigError(f"loss.name: unknown loss {cfg.loss.name!r}; registered: {losses.names()}")


def check_ranges(cfg) -> None:
  """Values a type check lets through but training cannot use (e.g. a negative learning rate
  trains, uphill)."""
  rules = {"optim.lr": (lambda v: v >= 0, ">= 0"),
           "optim.warmup_steps": (lambda v: v >= 0, ">= 0"),
           "optim.clip_norm": (lambda v: v >= 0, ">= 0 (0 disables)"),
           "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
           "optim.min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
           "optim.b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
           "optim.b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
           "optim.eps": (lambda v: v > 0, "> 0"),
           "model.dropout_rate": (lambda v: 0 <= v < 1, "in [0, 1)"),
           "data.val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)")}
  checks = []
  for field, (ok, expected) in rules.items():
    group, name = field.split(".")
    if group in cfg and name in cfg[group]:
      value = cfg[group][name]
      checks.append((field, value, ok(value), expected))
  if "loader" in cfg.data and cfg.get("stage") == "pretrain":
    checks.append(("data.loader", cfg.data.loader,
                   cfg.data.loader in ("windows", "packed", "grain"),
                   "'windows', 'packed' or 'grain'"))
  for field, value, ok, expected in checks:
    if not ok:
      raise ConfigError(f"{field}: expected {expected}, got {value!r}")


def model_config(cfg):
  fields = {f for f in model_lib_fields()}
  d = cfg.model.to_dict()
  d.pop("lora", None)          # adapters are not part of the network's shape (gptjax/lora.py)
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ConfigError(f"unknown config field 'model.{unknown[0]}'")
  from gptjax.model import ModelConfig
  return ModelConfig(**d)


def model_lib_fields():
  import dataclasses
  from gptjax.model import ModelConfig
  return [f.name for f in dataclasses.fields(ModelConfig)]


def loss_kwargs(cfg) -> dict:
  d = cfg.loss.to_dict()
  d.pop("name")
  return d
