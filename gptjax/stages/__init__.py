"""Stage runners: each builds its model, data and loss, then calls the one loop in trainer.py.

`cfg.stage` picks the runner: a runner's name (pretrain, sft, reward, rl; dpo for the preference
runner), or an objective's own name (ppo, grpo, rloo, kto, ...), which means that objective's
runner (`Objective.runner`). The pipeline names its stages the second way."""

# Runner name -> module. 'preference' is every offline objective over a fixed data set of pairs
# or labelled examples (DPO, IPO, ORPO, SimPO, KTO); its module kept DPO's name.
_MODULES = {"pretrain": "pretrain", "sft": "sft", "reward": "reward", "rl": "rl",
            "preference": "dpo"}
_STAGES = ("pretrain", "sft", "reward", "rl", "dpo", "preference")


def run_stage(cfg, workdir: str, *, progress: bool = True):
  """Runs the stage `cfg` describes in `workdir`, with its objective's runner."""
  import importlib
  from gptjax import hf, objectives
  from gptjax.config import ConfigError
  if cfg.stage not in _STAGES and cfg.stage not in objectives.names():
    raise ConfigError(f"stage: unknown stage {cfg.stage!r}; expected one of "
                      f"{sorted(set(_STAGES) | set(objectives.names()))}")
  hf.resolve_stage_config(cfg, workdir)       # train.init_from=hf:DIR and friends
  runner = {"dpo": "preference"}.get(cfg.stage, cfg.stage)
  if runner not in _MODULES:
    runner = objectives.get(cfg.stage).runner
  module = importlib.import_module(f"gptjax.stages.{_MODULES[runner]}")
  return module.run(cfg, workdir, progress=progress)
