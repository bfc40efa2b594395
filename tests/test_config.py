"""Config errors fail fast and name their field, on the command line too (exit 2, no traceback)."""

import os
import subprocess
import sys

import pytest

from conftest import MICRO, REPO, child_env
from gptjax import config as config_lib
from gptjax import main as main_lib
from gptjax.stages import common


def _validate(*overrides, num_devices=8):
  # vocab_size is normally filled from the tokenizer (0 = "the tokenizer's"); set it here.
  cfg = config_lib.load(MICRO, ["model.vocab_size=65", *overrides])
  config_lib.validate(cfg, num_devices=num_devices)


def test_micro_config_is_valid_on_one_and_eight_devices():
  _validate(num_devices=1)
  _validate(num_devices=8)


def test_unknown_field_suggests_the_close_one():
  with pytest.raises(config_lib.ConfigError,
                     match=r"unknown config field 'train\.step' \(did you mean 'train\.steps'\?\)"):
    config_lib.load(MICRO, ["train.step=5"])
  with pytest.raises(config_lib.ConfigError, match=r"unknown config field 'modle\.d_model'"):
    config_lib.load(MICRO, ["--config.modle.d_model=5"])


@pytest.mark.parametrize("override,message", [
    ("train.steps=abc", r"'train\.steps': expected int"),
    ("train.steps=1.5", r"'train\.steps': expected int"),
    ("optim.lr=fast", r"'optim\.lr': expected float"),
    ("model.qk_norm=maybe", r"'model\.qk_norm': expected true or false"),
])
def test_wrong_type_names_the_field(override, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.load(MICRO, [override])


def test_overrides_parse_to_the_field_type():
  cfg = config_lib.load(MICRO, ["train.steps=7", "optim.lr=1", "model.qk_norm=true",
                                "mesh.shape=(1,-1,1)", "data.tokenizer=char"])
  assert cfg.train.steps == 7 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
  assert cfg.model.qk_norm is True and tuple(cfg.mesh.shape) == (1, -1, 1)


@pytest.mark.parametrize("overrides,field", [
    (["mesh.shape=(3,1,1)"], "mesh.shape"),                         # 3 does not divide 8
    (["mesh.shape=(8,1,1)", "train.batch_size=12"], "train.batch_size"),
    (["mesh.shape=(2,2,2)", "train.batch_size=8", "train.grad_accum=4"], "train.batch_size"),
    (["train.grad_accum=3"], "train.grad_accum"),                   # 3 does not divide 8
    (["data.seq_len=64"], "data.seq_len"),                          # model.max_len is 32
    (["loss.name=nope"], "loss.name"),
    (["model.activation=swish"], "model.activation"),
    (["model.num_heads=3"], "model.d_model"),                       # 32 is not divisible by 3
    (["train.keep_checkpoints=0"], "train.keep_checkpoints"),
])
def test_inconsistent_fields_name_their_field(overrides, field):
  with pytest.raises(config_lib.ConfigError) as e:
    _validate(*overrides)
  assert str(e.value).startswith(field + ":"), str(e.value)


def test_cli_config_error_exits_2_without_traceback(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "gptjax.main", "train", "--config", MICRO, "--workdir",
       str(tmp_path / "w"), "--config.train.stpes=3"],
      env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert "train.stpes" in proc.stderr and "did you mean 'train.steps'" in proc.stderr
  assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_validation_error_exits_2(tmp_path, capsys, cached_corpus):
  # Errors found by `validate` (after the tokenizer sets the vocabulary) take the same path.
  code = main_lib.main(["train", "--config", MICRO, "--workdir", str(tmp_path / "w"),
                        "--config.model.activation=swish", "--no_progress"])
  assert code == 2
  err = capsys.readouterr().err
  assert "config error: model.activation" in err


@pytest.mark.parametrize("spec, override, message", [
    ("reward.py:micro", "loss.tie_nu=-1.0", r"loss\.tie_nu must be >= 0"),
    ("rl.py:grpo_micro", "loss.aggregation=bogus", r"loss\.aggregation: expected one of"),
])
def test_a_bad_loss_hyperparameter_is_a_config_error_when_the_loss_is_bound(spec, override,
                                                                           message):
  """The loss's registered check runs in `bind_loss`, before anything is traced."""
  cfg = config_lib.load(os.path.join(REPO, "experiments", spec), [override])
  with pytest.raises(config_lib.ConfigError, match=message):
    common.bind_loss(cfg)


_PRESETS = {
    "shakespeare_char.py": ["micro", "tiny", "gpu"],
    "gpt2_124m.py": ["124m", "350m"],
    "sft.py": ["micro", "tiny", "gpu"],
    "reward.py": ["micro", "tiny", "gpu"],
    "rl.py": [f"{a}_{s}" for a in ("ppo", "grpo", "dpo", "ipo") for s in ("micro", "tiny", "gpu")]
             + ["ppo_overopt"],
    "shakespeare_assistant.py": ["micro", "tiny", "gpu", "tpu"],
}


@pytest.mark.parametrize("spec", [f"{f}:{p}" for f, ps in _PRESETS.items() for p in ps])
def test_every_documented_preset_loads_and_validates(spec):
  """A preset that is only run on hardware CI lacks (gpu, tpu) still has to load and be
  consistent; the pipeline's `tpu` preset once failed to load at all. The accelerator presets
  must also divide over an 8-chip slice; the CPU ones (micro, tiny) over one device."""
  cfg = config_lib.load(os.path.join(REPO, "experiments", spec))
  subs = ([cfg[k] for k in ("pretrain", "sft", "reward", "ppo", "grpo", "dpo")]
          if "pipeline" in cfg else [cfg])
  cpu = any(spec.endswith(p) for p in ("micro", "tiny", "overopt"))
  for sub in subs:
    with sub.unlocked():
      sub.model.vocab_size = sub.model.vocab_size or 1024
    config_lib.validate(sub, num_devices=1 if cpu else 8)


def test_a_later_stage_takes_the_architecture_but_keeps_its_own_run_fields(tmp_path, capsys):
  """init_from a workdir: the network's shape is that run's (a preset sized otherwise is named in
  a message), while dropout, remat and the compute dtype are this run's: a
  `--config.model.dropout_rate` given to the reward stage used to be silently replaced."""
  prev = config_lib.load(os.path.join(REPO, "experiments", "sft.py:tiny"),
                         ["model.vocab_size=1024", "model.num_layers=3", "model.remat=full"])
  (tmp_path / "config.json").write_text(config_lib.to_json(prev))
  cfg = config_lib.load(os.path.join(REPO, "experiments", "reward.py:tiny"),
                        ["model.dropout_rate=0.1", "model.dtype=bfloat16"])
  common.adopt_architecture(cfg, str(tmp_path))
  m = cfg.model
  assert (m.num_layers, m.vocab_size, m.d_model) == (3, 1024, 128)
  assert (m.dropout_rate, m.dtype, m.remat) == (0.1, "bfloat16", "none")
  assert "num_layers 4 -> 3" in capsys.readouterr().out
  with pytest.raises(config_lib.ConfigError, match="has no config.json"):
    common.adopt_architecture(cfg, str(tmp_path / "nowhere"))


def test_the_policy_losses_refuse_a_dropout_rate_they_would_not_use():
  from gptjax.stages import rl as rl_stage
  cfg = config_lib.load(os.path.join(REPO, "experiments", "rl.py:ppo_micro"),
                        ["model.dropout_rate=0.1"])
  with pytest.raises(config_lib.ConfigError, match=r"model\.dropout_rate: 0\.1 given"):
    rl_stage.validate(cfg)
