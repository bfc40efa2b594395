"""`gptjax sample` and `gptjax chat` on every stage's workdir of a pipeline run, in both
checkpoint layouts: the micro preset's (PPO with a value head: one GPT tree) and the tiny
preset's (PPO with `rl.value_model=critic`: {'policy': GPT, 'critic': GPT})."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import REPO, child_env, pipeline_cmd

TRAINED = ("pretrain", "sft", "reward", "ppo", "grpo", "dpo", "ppo_beta0")


@pytest.fixture(scope="module")
def critic_run(micro_pipeline, tmp_path_factory):
  """The micro run with its PPO stage redone in the tiny preset's layout (a critic beside the
  policy; ppo_beta0 has the same), for one RL iteration: the stages before it are reused."""
  run = str(tmp_path_factory.mktemp("critic") / "run")
  shutil.copytree(micro_pipeline, run,
                  ignore=lambda d, names: [n for n in names if d == micro_pipeline and
                                           n in ("ppo", "ppo_beta0", "grpo", "dpo", "compare",
                                                 "report")])
  stages = ("tokenizer", "pretrain", "sft", "rm_data", "reward", "ppo")
  cmd = pipeline_cmd(run, stages) + [
      f"--config.ppo.rl.{k}={v}"
      for k, v in (("value_model", "critic"), ("iterations", 1), ("eval_prompts", 0))]
  proc = subprocess.run(cmd, env=child_env(), cwd=REPO, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return run


def _sample_and_chat(workdir, capsys):
  from gptjax import generate_cli
  out = []
  assert generate_cli.sample_main(["--workdir", workdir, "--prompt", "ROMEO:",
                                   "--max_new_tokens", "6", "--num_samples", "2"],
                                  write=out.append) == 0
  assert len(out) == 2 and all(s.startswith(f"--- sample {i + 1}/2\nROMEO:")
                               for i, s in enumerate(out))
  inputs = iter(["Speak, friend.", "/quit"])
  out = []
  assert generate_cli.chat_main(["--workdir", workdir, "--max_new_tokens", "6"],
                                read_line=lambda _: next(inputs), write=out.append) == 0
  assert "".join(out).count("model> ") == 1
  assert capsys.readouterr().err == ""


@pytest.mark.parametrize("stage", TRAINED)
def test_sample_and_chat_load_every_stage_of_the_micro_layout(micro_pipeline, stage, capsys):
  _sample_and_chat(os.path.join(micro_pipeline, stage), capsys)


def test_sample_and_chat_load_ppo_with_a_critic(critic_run, capsys):
  import flax.linen as nn
  import jax
  import numpy as np
  from gptjax import checkpoint, config as config_lib
  workdir = os.path.join(critic_run, "ppo")
  assert config_lib.from_json(os.path.join(workdir, "config.json")).rl.value_model == "critic"
  _sample_and_chat(workdir, capsys)
  # The loaded parameters are the trained policy's, not the SFT model's or the critic's.
  model, params, _, _ = checkpoint.load_for_inference(workdir)
  abstract = jax.eval_shape(lambda: nn.meta.unbox(model.init(
      jax.random.key(0), np.zeros((1, 1), np.int32))["params"]))
  policy = checkpoint.restore_params(workdir, {"policy": abstract})["policy"]
  _, sft, _, _ = checkpoint.load_for_inference(os.path.join(critic_run, "sft"))
  jax.tree.map(np.testing.assert_array_equal, params, policy)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                      jax.tree.leaves(sft)))


def test_a_checkpoint_missing_parameters_is_an_error_naming_them(micro_pipeline, tmp_path):
  """A layout the config does not describe fails at load, naming the parameters, instead of
  handing placeholders to jit."""
  from gptjax import checkpoint
  wd = str(tmp_path / "ppo")
  shutil.copytree(os.path.join(micro_pipeline, "ppo"), wd)
  cfg_path = os.path.join(wd, "config.json")
  with open(cfg_path) as f:
    text = f.read()
  with open(cfg_path, "w") as f:
    f.write(text.replace('"value_model": "head"', '"value_model": "critic"'))
  with pytest.raises(ValueError, match=r"the checkpoint has no parameter\(s\) \['policy'\]"):
    checkpoint.load_for_inference(wd)


def test_a_pipeline_run_directory_lists_its_stages(micro_pipeline, capsys):
  from gptjax import generate_cli
  for main in (generate_cli.sample_main, generate_cli.chat_main):
    assert main(["--workdir", micro_pipeline], **({"write": print})) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"gptjax {main.__name__[:-5]}: --workdir: {micro_pipeline} is a "
                          "pipeline run, not a stage's workdir; its stages are: pretrain, sft, "
                          "reward, ppo"), err
