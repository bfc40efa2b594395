"""The README's promises: its two commands are the ones CI runs, and its worked example of a new
objective (SLiC's hinge loss, registered in one file) really trains through the unchanged loop
from the command line."""

import json
import os
import re
import subprocess
import sys

from conftest import REPO, child_env

README = open(os.path.join(REPO, "README.md")).read()


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
  blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
  assert blocks[0].strip().startswith("pip install -e . && gptjax pipeline --config "
                                      "experiments/shakespeare_assistant.py:tiny")
  test_cmd = blocks[1].strip()
  assert test_cmd == "pip install -e '.[test]' && python -m pytest -q tests"
  assert test_cmd in open(os.path.join(REPO, ".ci", "run")).read()


def test_one_file_objective_example_trains_from_the_command_line(tmp_path):
  code = re.search(r"```python\n# my_losses.py\n(.*?)```", README, re.S).group(1)
  assert len(code.strip().splitlines()) <= 30
  (tmp_path / "my_losses.py").write_text(code)
  pairs = tmp_path / "pairs.jsonl"
  with open(pairs, "w") as f:
    for i in range(16):
      f.write(json.dumps({"prompt": ["hi", "say", "well", "now"][i % 4],
                          "chosen": "i love it", "rejected": "i hate it"}) + "\n")
  cmd = [sys.executable, "-m", "gptjax.main", "train", "--import", str(tmp_path / "my_losses.py"),
         "--config", os.path.join(REPO, "experiments", "rl.py") + ":dpo_micro",
         "--workdir", str(tmp_path / "run"), "--no_progress", "--config.loss.name=hinge",
         f"--config.data.train_source=preference_jsonl:{pairs}", "--config.train.steps=8",
         "--config.train.log_every=1", "--config.optim.lr=0.003", "--config.rl.eval_prompts=2",
         "--config.rl.prompt_len=8", "--config.rl.max_new_tokens=4"]
  proc = subprocess.run(cmd, env=child_env(), cwd=str(tmp_path), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert "hinge/margin" in rows[0] and losses[-1] < losses[0]


def test_a_loss_hyperparameter_the_loss_does_not_take_is_a_config_error(tmp_path):
  cmd = [sys.executable, "-m", "gptjax.main", "train", "--config",
         os.path.join(REPO, "experiments", "shakespeare_char.py") + ":micro", "--workdir",
         str(tmp_path / "run"), "--config.loss.name=dpo", "--config.loss.z_loss=0.1"]
  proc = subprocess.run(cmd, env=child_env(), cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2
  assert "loss.z_loss" in proc.stderr and "Traceback" not in proc.stderr
