"""SFT: the loss mask, the dialogue conversations, and the stage end to end with exact resume."""

import json
import os

import jax
import numpy as np
import pytest

from gptjax import checkpoint as ckpt_lib
from gptjax import config as config_lib
from gptjax.data import chat, dialogue, packing
from gptjax.data.tokenizers import CharTokenizer
from gptjax.stages import pretrain, sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,!?'")


def load(name, *overrides):
  return config_lib.load(os.path.join(ROOT, "experiments", name), overrides)


def test_mask_covers_exactly_the_assistant_tokens():
  ex = {"prompt": "Who goes there? Nay, answer me.", "reply": "Long live the king!",
        "prompt_speaker": "BERNARDO", "reply_speaker": "FRANCISCO"}
  messages = dialogue.dialogue_messages(ex, prompt_chars=24, persona=True)
  assert messages[0] == {"role": "system", "content": "You are Francisco."}
  assert messages[1]["content"] == "me."                # the speech's last words within budget
  ids, mask = chat.render(messages, TOK)
  batch, stats = packing.pack_examples([(ids, mask), (ids, mask)], seq_len=96, pad_id=TOK.pad_id)
  assert stats.truncated == 0 and stats.rows == 1       # both fit one row, whole
  trained = batch["targets"][batch["loss_mask"] > 0]
  end = TOK.special_ids["<|end|>"]
  one = TOK.encode("Long live the king!") + [end]
  assert trained.tolist() == one + one                  # reply and its <|end|>, nothing else
  assert TOK.pad_id != TOK.eos_id
  assert not np.any(batch["targets"][(batch["loss_mask"] > 0)] == TOK.pad_id)


def test_tail_words_and_budget():
  assert dialogue.tail_words("to be or not to be", 9) == "to be"
  assert dialogue.tail_words("short", 9) == "short"
  cfg = load("sft.py:tiny")
  chars = dialogue.prompt_char_budget(cfg)
  # A maximal conversation fits a training row, and a prompt leaves the reply budget free.
  assert 4 + chars + cfg.sft.max_reply_chars + 1 <= cfg.data.seq_len + 1
  assert 4 + chars + cfg.sft.reply_tokens <= cfg.model.max_len


def test_dialogue_split_is_by_play():
  train = {e["play"] for e in dialogue.dialogue_examples("train")}
  val = {e["play"] for e in dialogue.dialogue_examples("validation")}
  assert train and val and not train & val


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("pre"))
  pretrain.run(load("shakespeare_char.py:micro", "train.steps=4", "train.eval_every=0",
                    "train.checkpoint_every=0"), wd, progress=False)
  return wd


def sft_cfg(prev, *overrides):
  return load("sft.py:micro", f"train.init_from={prev}", "optim.decay_steps=8",
              "train.eval_every=0", *overrides)


def params_of(state):
  return jax.tree.leaves(jax.device_get(state.params))


def test_sft_end_to_end_and_exact_resume(pretrained, tmp_path):
  straight = sft.run(sft_cfg(pretrained, "train.steps=8", "sft.eval_prompts=0"),
                     str(tmp_path / "a"), progress=False)
  half = str(tmp_path / "b")
  sft.run(sft_cfg(pretrained, "train.steps=4", "sft.eval_prompts=0"), half, progress=False)
  resumed = sft.run(sft_cfg(pretrained, "train.steps=8", "sft.eval_prompts=0"), half,
                    progress=False)
  assert resumed.step == straight.step == 8
  for a, b in zip(params_of(straight.state), params_of(resumed.state)):
    np.testing.assert_array_equal(a, b)
  # Model and tokenizer came from the pretraining workdir.
  assert open(os.path.join(half, "tokenizer.json")).read() == \
      open(os.path.join(pretrained, "tokenizer.json")).read()
  with open(os.path.join(half, "config.json")) as f:
    assert json.load(f)["model"]["d_model"] == 32


def test_sft_through_grain_resumes_onto_the_packed_loaders_weights(pretrained, tmp_path):
  # data.loader=grain: the same batches through a grain pipeline, its state in the checkpoint.
  straight = sft.run(sft_cfg(pretrained, "train.steps=8", "sft.eval_prompts=0"),
                     str(tmp_path / "ours"), progress=False)
  half = str(tmp_path / "grain")
  grain = ("data.loader=grain", "sft.eval_prompts=0")
  sft.run(sft_cfg(pretrained, "train.steps=4", *grain), half, progress=False)
  resumed = sft.run(sft_cfg(pretrained, "train.steps=8", *grain), half, progress=False)
  assert resumed.step == straight.step == 8
  for a, b in zip(params_of(straight.state), params_of(resumed.state)):
    np.testing.assert_array_equal(a, b)
  # It resumed (a fresh start would log steps 1-4 twice) from grain's own iterator state.
  steps = [json.loads(line)["step"] for line in open(os.path.join(half, "metrics.jsonl"))
           if "train/loss" in line]
  assert steps == sorted(set(steps)) and steps[-1] == 8
  data_dir = os.path.join(half, "checkpoints", "4", "data")
  saved = "".join(open(os.path.join(d, f)).read() for d, _, fs in os.walk(data_dir) for f in fs)
  assert '"grain"' in saved and '"worker_count"' in saved


def test_sft_eval_report(pretrained, tmp_path):
  wd = str(tmp_path / "sft")
  res = sft.run(sft_cfg(pretrained, "train.steps=2", "sft.eval_prompts=4"), wd, progress=False)
  with open(os.path.join(wd, "eval.json")) as f:
    report = json.load(f)
  assert report == res.eval
  assert report["stage"] == "sft" and report["step"] == 2
  assert np.isfinite(report["eval/loss"]) and report["eval/tokens"] > 0
  assert report["eval_prompts"] == 4
  assert 0 <= report["end_of_turn_fraction"] <= 1
  assert 0 <= report["base_end_of_turn_fraction"] <= 1
  assert 0 <= report["pack_train"]["padding_fraction"] < 1
  samples = json.load(open(os.path.join(wd, "samples.json")))
  assert len(samples) == 4 and {"prompt", "reference", "base", "sft"} <= set(samples[0])
  assert "base:" in open(os.path.join(wd, "samples.md")).read()
  # The trained parameters load back for inference, with the tokenizer copied into the workdir.
  _, params, tok, _ = ckpt_lib.load_for_inference(wd)
  np.testing.assert_array_equal(params["embed"]["embedding"],
                                jax.device_get(res.state.params["embed"]["embedding"]))
  assert tok.vocab_size <= params["embed"]["embedding"].shape[0]
