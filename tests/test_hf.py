"""Hugging Face import and export against transformers itself (tiny random models, CPU).

Every family: fp32 logits within 1e-5 of transformers on a left-padded batch, with GQA, tied and
untied heads, biases and perturbed norm scales (tests/helpers/hf_tiny.py). Export: transformers
loads what we write and gives the same logits; import -> export -> import is bitwise. Then
sharded checkpoints, a reward model, the chat-template mask, greedy decoding, bad inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_tiny  # noqa: E402  (tests/helpers)

from conftest import child_env, REPO  # noqa: E402
from gptjax import hf  # noqa: E402

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma3_text")
TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """family -> (directory, torch model), written once per module."""
  out = {}
  for fam in FAMILIES:
    d = str(tmp_path_factory.mktemp(fam))
    out[fam] = (d, hf_tiny.write_model(fam, d))
  return out


def batch(seed=0, t=12):
  """Two rows, the second left-padded by 3: ids, attention mask, positions (counting real
  tokens only, as transformers' generate does)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, hf_tiny.VOCAB, (2, t))
  mask = np.ones((2, t), np.int64)
  mask[1, :3] = 0
  pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
  return ids, mask, pos


def torch_logits(model, ids, mask, pos):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()


def our_logits(model, params, ids, mask, pos):
  out = model.apply({"params": params}, jnp.asarray(ids), positions=jnp.asarray(pos),
                    segment_ids=jnp.asarray(mask))
  return np.asarray(out.logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny, family):
  d, ref_model = tiny[family]
  model, params, tok = hf.load_pretrained(d)
  ids, mask, pos = batch()
  ref = torch_logits(ref_model, ids, mask, pos)
  ours = our_logits(model, params, ids, mask, pos)
  real = mask.astype(bool)
  assert np.abs(ref[real]).max() > 1.0          # logits large enough for 1e-5 to mean something
  np.testing.assert_allclose(ours[real], ref[real], atol=TOL, rtol=0)
  cfg = model.cfg.resolved()
  assert cfg.hf_family == family
  if family != "gpt2":
    assert cfg.num_kv_heads < cfg.num_heads                      # GQA is exercised
  assert cfg.tie_embeddings == (family in ("gpt2", "qwen2", "gemma3_text"))
  assert tok is not None and tok.pad_id not in tok.stop_ids


def test_export_round_trip_through_transformers(tiny, tmp_path):
  # Export writes the older rope_theta/rope_scaling form that Hub configs carry, so this also
  # reads that form (llama3 and linear scaling, Gemma's rope_local_base_freq).
  for family in ("gpt2", "llama", "qwen3", "gemma3_text"):
    d, ref_model = tiny[family]
    model, params, tok = hf.load_pretrained(d)
    out = str(tmp_path / family)
    files = hf.save_pretrained(model, params, tok, out)
    assert {"config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json"} <= set(files)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    ids, mask, pos = batch(1)
    real = mask.astype(bool)
    np.testing.assert_allclose(torch_logits(back, ids, mask, pos)[real],
                               our_logits(model, params, ids, mask, pos)[real], atol=TOL, rtol=0)
    model2, params2, _ = hf.load_pretrained(out)
    assert model2.cfg == model.cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_checkpoints_both_ways(tiny, tmp_path):
  d, ref_model = tiny["llama"]
  sharded = str(tmp_path / "sharded")
  ref_model.save_pretrained(sharded, max_shard_size="60KB")
  assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
  model, params, _ = hf.load_pretrained(sharded)
  _, params_single, _ = hf.load_pretrained(d)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_single)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  out = str(tmp_path / "out")
  files = hf.save_pretrained(model, params, None, out, max_shard_bytes=100_000)
  assert "model.safetensors.index.json" in files and len(files) > 4
  back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  ids, mask, pos = batch(2)
  real = mask.astype(bool)
  np.testing.assert_allclose(torch_logits(back, ids, mask, pos)[real],
                             torch_logits(ref_model, ids, mask, pos)[real], atol=TOL, rtol=0)


def test_gpt2_hub_layout(tiny, tmp_path):
  """The Hub's gpt2 checkpoint is a GPT2Model: names without 'transformer.', and the causal-mask
  buffers `h.N.attn.bias` stored beside the weights."""
  from safetensors.numpy import load_file, save_file
  d, _ = tiny["gpt2"]
  hub = str(tmp_path / "hub")
  shutil.copytree(d, hub)
  tensors = {k.removeprefix("transformer."): v
             for k, v in load_file(os.path.join(d, "model.safetensors")).items()}
  tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
  save_file(tensors, os.path.join(hub, "model.safetensors"))
  _, want, _ = hf.load_pretrained(d)
  _, got, _ = hf.load_pretrained(hub)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_load_on_eight_devices(tiny):
  """Each device gets its slice of a tensor-parallel mesh; the logits stay transformers'."""
  d, _ = tiny["qwen3"]
  code = f"""
import numpy as np, jax, jax.numpy as jnp
from gptjax import hf, sharding as shd
mesh = shd.make_mesh((2, 2, 2))
model, params, _ = hf.load_pretrained({d!r}, mesh=mesh)
q = params["blocks"]["attn"]["query"]["kernel"]
assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape != q.shape, q.sharding
m1, p1, _ = hf.load_pretrained({d!r})
for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p1)):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
print("ok")
"""
  proc = subprocess.run([sys.executable, "-c", code], env=child_env(8), cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_reward_model_in_and_out(tmp_path):
  d = str(tmp_path / "rm")
  ref = hf_tiny.write_model("qwen2", d, head="score")
  model, params, tok = hf.load_pretrained(d)
  assert model.cfg.scalar_head
  mask = (np.arange(12)[None] < np.array([[9], [4]])).astype(np.int64)    # right-padded
  ids = batch(3)[0] * mask                                                    # pad id 0
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()[:, 0]
  values = np.asarray(model.apply({"params": params}, jnp.asarray(ids),
                                  segment_ids=jnp.asarray(mask)).values)
  last = mask.sum(1) - 1
  np.testing.assert_allclose(values[np.arange(2), last], want, atol=TOL, rtol=0)
  # A gptjax RM whose head has a bias exports exactly when the final norm can absorb it.
  out = str(tmp_path / "rm_out")
  hf.save_pretrained(model, params, tok, out)      # the tokenizer's pad id goes to config.json
  back = transformers.AutoModelForSequenceClassification.from_pretrained(out)
  assert type(back).__name__ == "Qwen2ForSequenceClassification"
  with torch.no_grad():
    got = back(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()[:, 0]
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_gpt2_reward_bias_folds_into_final_norm(tmp_path):
  d = str(tmp_path / "rm")
  hf_tiny.write_model("gpt2", d, head="score", tokenizer=False)
  model, params, _ = hf.load_pretrained(d)
  params["scalar_head"]["bias"] = jnp.array([0.75])
  ids = np.random.default_rng(0).integers(5, hf_tiny.VOCAB, (1, 8))
  want = np.asarray(model.apply({"params": params}, jnp.asarray(ids)).values)[0, -1]
  out = str(tmp_path / "out")
  hf.save_pretrained(model, params, None, out)
  back = transformers.AutoModelForSequenceClassification.from_pretrained(out)
  with torch.no_grad():
    got = back(input_ids=torch.tensor(ids)).logits.numpy()[0, 0]
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_chat_template_mask(tmp_path):
  """The mask from `{% generation %}` equals transformers' assistant mask, and the mask found by
  rendering one message at a time (a template without the tag) equals it too."""
  from gptjax.hf.tokenizer import HFTokenizer
  tagged, plain = str(tmp_path / "tagged"), str(tmp_path / "plain")
  for d, template in ((tagged, hf_tiny.TEMPLATE), (plain, hf_tiny.PLAIN_TEMPLATE)):
    os.makedirs(d)
    hf_tiny.write_tokenizer(d, template=template)
  msgs = [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": "Hello there, how are you?"},
          {"role": "assistant", "content": "I am fine, thank you."},
          {"role": "user", "content": "To be, or not to be?"},
          {"role": "assistant", "content": "That is the question."}]
  ref_tok = transformers.AutoTokenizer.from_pretrained(tagged)
  ref = ref_tok.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                    return_assistant_tokens_mask=True)
  ids, mask = HFTokenizer(tagged, quiet=True).render_chat(msgs)
  assert ids == list(ref["input_ids"]) and mask == list(ref["assistant_masks"])
  assert 0 < sum(mask) < len(mask)
  plain_ids, plain_mask = HFTokenizer(plain, quiet=True).render_chat(msgs)
  assert plain_ids == ids and plain_mask == mask
  # The generation prompt renders as transformers renders it.
  prompt = HFTokenizer(plain, quiet=True).render_chat(msgs[:2], add_generation_prompt=True)[0]
  assert prompt == list(ref_tok.apply_chat_template(msgs[:2], tokenize=True,
                                                    add_generation_prompt=True,
                                                    return_dict=True)["input_ids"])
  # Plain encode never makes a special token out of text.
  tok = HFTokenizer(plain, quiet=True)
  # A reply's ids (DPO and RM pairs) are what the template adds after the generation prompt.
  from gptjax.data import chat
  reply = chat.reply_ids(tok, msgs[:2], msgs[2]["content"])
  assert prompt + reply == tok.render_chat(msgs[:3])[0]
  assert tok.special_ids["<|im_end|>"] in reply
  assert tok.eos_id not in tok.encode("a <|im_end|> b")
  assert tok.decode(tok.encode("To be, or not")) == "To be, or not"


def test_greedy_decoding_matches_generate(tiny):
  from gptjax import sampling
  for family in ("gemma3_text", "mistral"):
    d, ref_model = tiny[family]
    model, params, tok = hf.load_pretrained(d)
    prompt = [5, 17, 42, 9, 77, 31]
    with torch.no_grad():
      want = ref_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 6,
                                dtype=torch.long), do_sample=False, max_new_tokens=10,
                                min_new_tokens=10, pad_token_id=0)[0, 6:].tolist()
    got = sampling.generate(model, params, np.array([prompt]), [len(prompt)], rng=0,
                            max_new_tokens=10, temperature=0.0)
    assert np.asarray(got.completion[0]).tolist() == want, family


def test_cached_decode_equals_forward(tiny):
  """Gemma 3's local and global layers through the KV cache: prefill then one token at a time."""
  from gptjax.model import init_cache
  d, _ = tiny["gemma3_text"]
  model, params, _ = hf.load_pretrained(d)
  ids = jnp.asarray(batch(4)[0][:1])
  full = np.asarray(model.apply({"params": params}, ids).logits)[0]
  cache = init_cache(model.cfg, 1, ids.shape[1])
  out = model.apply({"params": params}, ids[:, :5], cache=cache, cache_index=0)
  steps = [np.asarray(out.logits)[0]]
  cache = out.cache
  for t in range(5, ids.shape[1]):
    out = model.apply({"params": params}, ids[:, t:t + 1], positions=jnp.array([[t]]),
                      cache=cache, cache_index=t)
    cache = out.cache
    steps.append(np.asarray(out.logits)[0])
  np.testing.assert_allclose(np.concatenate(steps), full, atol=TOL, rtol=0)


def _import_fails(model_dir, tmp_path, capsys):
  from gptjax import main
  capsys.readouterr()                      # drop what writing the fixture printed
  rc = main.main(["import-hf", "--model", str(model_dir), "--workdir", str(tmp_path / "w")])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and "\n" not in err and "Traceback" not in err, err
  return err


def _copy(tiny, family, tmp_path):
  d = str(tmp_path / "bad")
  shutil.copytree(tiny[family][0], d)
  return d


def _edit_config(d, **fields):
  path = os.path.join(d, "config.json")
  with open(path) as f:
    c = json.load(f)
  c.update(fields)
  with open(path, "w") as f:
    json.dump(c, f)


def test_bad_inputs_exit_2_with_one_line(tiny, tmp_path, capsys):
  d = _copy(tiny, "llama", tmp_path)
  _edit_config(d, model_type="falcon")
  assert "config.json: field 'model_type' = 'falcon' is not supported" in _import_fails(
      d, tmp_path, capsys)

  _edit_config(d, model_type="llama", rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                       "rope_theta": 1e4})
  assert ("config.json: field 'rope_parameters.rope_type' = 'yarn' is not supported "
          "(supported: default, linear, llama3)") in _import_fails(d, tmp_path, capsys)

  _edit_config(d, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
               attn_logit_softcapping=30.0)
  assert "field 'attn_logit_softcapping' = 30.0" in _import_fails(d, tmp_path, capsys)

  _edit_config(d, attn_logit_softcapping=None, hidden_size=48, head_dim=16)
  err = _import_fails(d, tmp_path, capsys)
  assert err.startswith("gptjax: model.safetensors: tensor ") and "config.json implies" in err

  sharded = str(tmp_path / "sharded")
  tiny["qwen2"][1].save_pretrained(sharded, max_shard_size="60KB")
  with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
  os.remove(os.path.join(sharded, shard))
  err = _import_fails(sharded, tmp_path, capsys)
  assert "model.safetensors.index.json: field 'weight_map." in err and shard in err


def test_import_export_commands_and_sft_from_hf(tiny, tmp_path):
  """`gptjax import-hf`, then SFT with train.init_from=hf:DIR (its tokenizer and chat template),
  then `gptjax export-hf`: transformers loads the fine-tuned model and agrees with gptjax."""
  from gptjax import checkpoint as ckpt_lib
  from gptjax import main
  d, _ = tiny["qwen2"]
  w = str(tmp_path / "imported")
  assert main.main(["import-hf", "--model", d, "--workdir", w]) == 0
  model, params, tok, _ = ckpt_lib.load_for_inference(w)
  model0, params0, _ = hf.load_pretrained(d)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params0)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  sft = str(tmp_path / "sft")
  rc = main.main(["train", "--config", "experiments/hf_post_train.py:sft_tiny", "--workdir", sft,
                  f"--config.train.init_from=hf:{d}", "--no_progress"])
  assert rc == 0
  out = str(tmp_path / "exported")
  assert main.main(["export-hf", "--workdir", sft, "--out", out]) == 0
  back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  model, params, tok, _ = ckpt_lib.load_for_inference(sft)
  assert tok.kind == "hf"
  ids, mask, pos = batch(5)
  real = mask.astype(bool)
  ours = our_logits(model, params, ids, mask, pos)
  np.testing.assert_allclose(torch_logits(back, ids, mask, pos)[real], ours[real], atol=TOL,
                             rtol=0)
  assert np.abs(ours - our_logits(model0, params0, ids, mask, pos))[real].max() > 1e-3  # trained


def test_ppo_from_hf_policy_driven_by_hf_reward_model(tiny, tmp_path):
  """PPO starts from an HF causal LM and is rewarded by an HF sequence-classification model,
  both given as hf:DIR; the RM it scores with is the imported one."""
  from gptjax import checkpoint as ckpt_lib
  from gptjax import main
  rm_dir = str(tmp_path / "rm")
  hf_tiny.write_model("qwen2", rm_dir, head="score", seed=1)
  w = str(tmp_path / "ppo")
  rc = main.main(["train", "--config", "experiments/hf_post_train.py:ppo_tiny", "--workdir", w,
                  f"--config.train.init_from=hf:{tiny['qwen2'][0]}", "--config.rl.reward=rm",
                  f"--config.rl.reward_workdir=hf:{rm_dir}", "--config.rl.iterations=1",
                  "--no_progress"])
  assert rc == 0
  with open(os.path.join(w, "rl_iterations.jsonl")) as f:
    scores = [json.loads(line)["rl/score"] for line in f]
  assert scores and all(np.isfinite(scores))
  _, rm_params, _, _ = ckpt_lib.load_for_inference(os.path.join(w, "hf_init", "reward"))
  _, want, _ = hf.load_pretrained(rm_dir)
  np.testing.assert_array_equal(np.asarray(rm_params["scalar_head"]["kernel"]),
                                np.asarray(want["scalar_head"]["kernel"]))


def test_a_gptjax_pretrained_model_exports_as_gpt2(micro_run, tmp_path, capsys):
  """A model gptjax trained itself (GPT-2 variant, char tokenizer) exports as GPT2LMHeadModel
  with the same logits; its tokenizer has no HF form and the export says so."""
  from gptjax import checkpoint as ckpt_lib
  from gptjax import main
  workdir, _ = micro_run
  out = str(tmp_path / "gpt2")
  assert main.main(["export-hf", "--workdir", workdir, "--out", out]) == 0
  assert "has no Hugging Face form" in capsys.readouterr().out
  model, params, _, _ = ckpt_lib.load_for_inference(workdir)
  back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  assert type(back).__name__ == "GPT2LMHeadModel"
  ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, 16))
  mask, pos = np.ones_like(ids), np.broadcast_to(np.arange(16), (2, 16))
  np.testing.assert_allclose(torch_logits(back, ids, mask, pos),
                             our_logits(model, params, ids, mask, pos), atol=TOL, rtol=0)
