"""Stage runners: each builds its model, data and loss, then calls the one loop in trainer.py."""


def run_stage(cfg, workdir: str, *, progress: bool = True):
  """Runs the stage named by `cfg.stage` in `workdir`."""
  import importlib
  names = {"pretrain": "pretrain", "sft": "sft", "reward": "reward", "rl": "rl", "ppo": "rl",
           "grpo": "rl", "dpo": "dpo"}
  if cfg.stage not in names:
    from gptjax.config import ConfigError
    raise ConfigError(f"stage: unknown stage {cfg.stage!r}; expected one of {sorted(names)}")
  from gptjax import hf
  hf.resolve_stage_config(cfg, workdir)       # train.init_from=hf:DIR and friends
  module = importlib.import_module(f"gptjax.stages.{names[cfg.stage]}")
  return module.run(cfg, workdir, progress=progress)
