"""Stage runners: each builds its model, data and loss, then calls the one loop in trainer.py.

`cfg.stage` picks the runner: a runner's name (pretrain, sft, reward, rl; dpo for the preference
runner), or an objective's own name (ppo, grpo, rloo, kto, ...), which means that objective's
runner (`Objective.runner`). The pipeline names its stages the second way."""

# Runner name -> module. 'preference' is every offline objective over a fixed data set of pairs
# or labelled examples (DPO, IPO, ORPO, SimPO, KTO); its module kept DPO's name.
_MODULES = {"pretrain": "pretrain", "sft": "sft", "reward": "reward", "rl": "rl",
            "preference": "dpo"}
_STAGES = ("pretrain", "sft", "reward", "rl", "dpo", "preference")


def _runner_module(cfg):
  """The runner module of `cfg.stage` (a ConfigError for an unknown stage)."""
  import importlib
  from gptjax import objectives
  from gptjax.config import ConfigError
  if cfg.stage not in _STAGES and cfg.stage not in objectives.names():
    raise ConfigError(f"stage: unknown stage {cfg.stage!r}; expected one of "
                      f"{sorted(set(_STAGES) | set(objectives.names()))}")
  runner = {"dpo": "preference"}.get(cfg.stage, cfg.stage)
  if runner not in _MODULES:
    runner = objectives.get(cfg.stage).runner
  return importlib.import_module(f"gptjax.stages.{_MODULES[runner]}")


def run_stage(cfg, workdir: str, *, progress: bool = True):
  """Runs the stage `cfg` describes in `workdir`, with its objective's runner."""
  from gptjax import hf
  module = _runner_module(cfg)
  hf.resolve_stage_config(cfg, workdir)       # train.init_from=hf:DIR and friends
  return module.run(cfg, workdir, progress=progress)


def memory_parts(cfg, workdir: str | None = None):
  """What the runner of `cfg` would build, as shapes (`gptjax.memory.Parts`): read by the memory
  plan. Reads the data and tokenizer the runner reads (host only); allocates no weights."""
  from gptjax.config import ConfigError
  module = _runner_module(cfg)
  for field, value in (("train.init_from", cfg.train.get("init_from", "")),
                       ("rl.reward_workdir", cfg.get("rl", {}).get("reward_workdir", ""))):
    if str(value).startswith("hf:"):
      # Resolving hf:DIR imports the weights into a workdir: work the plan does not do.
      raise ConfigError(f"{field}: the memory plan reads gptjax workdirs; import {value[3:]} "
                        "first (gptjax import-hf --model DIR --workdir W) and pass W")
  return module.memory_parts(cfg, workdir)
