"""The whole recipe on the embedded corpus: a Shakespeare assistant, RLHF'd to be kinder.

    gptjax pipeline --config experiments/shakespeare_assistant.py:tiny --workdir runs/demo

Presets:
  micro  seconds per stage; for tests only (the numbers mean nothing)
  tiny   2 CPU cores, about 15 minutes for the whole pipeline
  gpu    one H100
  tpu    a v5e-8 slice (or similar); the same code, FSDP over the chips

Several seeds: `--config.pipeline.seeds="(0,1,2)"` (or `gptjax pipeline ... --seeds 0,1,2`) runs the
stages after SFT again for seeds 1 and 2 from the same SFT model, and the report card shows
mean ± 95% interval over the three; `--config.pipeline.seeded_stages` picks which stages run per
seed (add 'pretrain' and 'sft' to redo those too).

Every stage's sub-config can be overridden, e.g. `--config.ppo.rl.kl_coef=0.0` or
`--config.pretrain.train.steps=2000`; `--config.pipeline.stages="('tokenizer','pretrain')"` runs a
prefix of the pipeline. The optional stages `grpo`, `dpo` and `ppo_beta0` (PPO with β = 0, the
over-optimisation run) are added the same way, and so is every other objective with a preset file
in experiments/ (`ipo`, `rloo`, `reinforce_pp`, `gspo`, `kto`, `orpo`, `simpo`).
"""

import os

import ml_collections

from gptjax import objectives, stage_names

from . import common
from . import ppo as ppo_exp
from . import reward as reward_exp
from . import rl as rl_exp
from . import sft as sft_exp

PRESETS = ("micro", "tiny", "gpu", "tpu")


def pretrain_config(preset: str) -> ml_collections.ConfigDict:
  c = common.base_config()
  c.stage = "pretrain"
  if preset == "micro":
    c.model.update(num_layers=2, num_heads=2, d_model=32, max_len=64)
    c.data.seq_len = 64
    c.train.update(steps=20, batch_size=8, log_every=5, eval_every=10, eval_batches=2,
                   sample_every=0, checkpoint_every=10)
    c.optim.update(lr=3e-3, warmup_steps=2)
  elif preset == "tiny":
    c.model.update(num_layers=4, num_heads=4, d_model=128, max_len=128)
    c.data.seq_len = 128
    c.train.update(steps=600, batch_size=16, log_every=25, eval_every=200, eval_batches=8,
                   sample_every=300, sample_tokens=48, checkpoint_every=200)
    c.optim.update(lr=2e-3, warmup_steps=100)
  elif preset in ("gpu", "tpu"):
    c.model.update(num_layers=8, num_heads=8, d_model=512, max_len=512, dtype="bfloat16")
    c.data.seq_len = 512
    c.train.update(steps=10_000, batch_size=64, log_every=50, eval_every=500, eval_batches=20,
                   sample_every=2000, sample_tokens=96, checkpoint_every=1000)
    c.optim.update(lr=1e-3, warmup_steps=500)
    if preset == "tpu":
      c.mesh.shape = (1, -1, 1)
  c.train.sample_prompts = ("ROMEO:\n", "HAMLET:\nTo be")
  return c


def get_config(arg=None):
  preset = arg or "tiny"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.pipeline = ml_collections.ConfigDict()
  c.pipeline.stages = ("tokenizer", "pretrain", "sft", "rm_data", "reward", "ppo", "compare",
                       "report")
  c.pipeline.num_eval_prompts = {"micro": 8, "tiny": 256, "gpu": 512, "tpu": 512}[preset]
  # The comparison's best-of-N curve (one set of max(N) SFT replies per prompt, reused for each N);
  # its N = 16 point is the results table's best-of-16 row.
  c.pipeline.best_of_n = (1, 2, 4, 8, 16, 32, 64) if preset != "micro" else (1, 4, 16)
  c.pipeline.num_side_by_side = 4
  # Seeds: the main run holds `seed`; each other seed in `seeds` re-runs `seeded_stages` (empty: the
  # stages after SFT) under <run>/seeds/<seed>/, from the main run's earlier stages, and the
  # report card gives every results figure as a mean with a 95% interval over the seeds.
  c.pipeline.seeds = ()
  c.pipeline.seeded_stages = ()
  c.tokenizer = ml_collections.ConfigDict(dict(
      kind="bpe", vocab_size={"micro": 320, "tiny": 1024, "gpu": 4096, "tpu": 4096}[preset]))
  c.pretrain = pretrain_config(preset)
  # The later stages have no TPU presets of their own: on a TPU slice they run the gpu ones
  # (sizes and steps), with the same FSDP mesh as pretraining.
  stage = "gpu" if preset == "tpu" else preset
  c.sft = sft_exp.get_config(stage)
  c.reward = reward_exp.get_config(stage)
  # One sub-config per policy stage: every compared objective with a preset file here (a new
  # objective's preset makes it a stage, with no edit in this file).
  here = os.path.dirname(os.path.abspath(__file__))
  policies = []
  for name in stage_names.policy_stages():
    if name in stage_names.ABLATIONS or not os.path.exists(os.path.join(here, name + ".py")):
      continue
    c[name] = rl_exp.get_config(f"{name}_{stage}")
    policies.append(c[name])
  # The over-optimisation run (an optional stage): the PPO stage with β = 0, a third longer.
  c.ppo_beta0 = ppo_exp.without_kl(ppo_exp.get_config(stage),
                                   iterations=c.ppo.rl.iterations * 4 // 3)
  policies.append(c.ppo_beta0)
  if preset == "tpu":
    for sub in (c.sft, c.reward, *policies):
      sub.mesh.shape = c.pretrain.mesh.shape
  if preset == "micro":
    # The micro presets of online objectives train a random model on a toy reward; in the
    # pipeline the policy is the SFT model and the reward is the RM, on the plays' held-out
    # prompts.
    for sub in policies:
      if objectives.get(sub.loss.name).online:
        sub.rl.update(prompts=(), reward="rm", eval_prompts=8, eval_split="validation",
                      max_prompts=64, iterations=2)
        sub.data.source = "shakespeare:dialogue"
  c.distributed = common.base_config().distributed
  return c
