"""The lm-eval adapter against direct computation, and lm-eval's evaluator and CLIs over a task
defined here (a YAML file over a JSONL file the test writes; nothing is downloaded)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, child_env

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from gptjax import checkpoint, lm_harness, prompting, sampling  # noqa: E402


@pytest.fixture(scope="module")
def loaded(micro_run):
  workdir, _ = micro_run
  return workdir, checkpoint.load_for_inference(workdir)


def _direct_logprobs(model, params, ids):
  """log p(ids[t+1] | ids[:t+1]) for one unpadded sequence, from a plain forward in float64."""
  logits = np.asarray(model.apply({"params": params}, np.asarray([ids[:-1]], np.int32)).logits,
                      np.float64)[0]
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return logits[np.arange(len(ids) - 1), ids[1:]] - logz, logits.argmax(-1) == np.asarray(ids[1:])


def _req(kind, *args):
  return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_equals_a_direct_forward(loaded):
  workdir, (model, params, tok, _) = loaded
  lm = lm_harness.GptjaxLM(workdir=workdir, batch_size=3)
  pairs = [("ROMEO:", " What light"), ("", "To be"), ("KING HENRY:\nO ", "God"),
           ("Now is the winter of our discontent made glorious summer", " by this son"),
           ("a", "b")]
  got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
  assert len(got) == len(pairs)
  for (context, cont), (lp, greedy) in zip(pairs, got):
    ctx = [tok.bos_id] + tok.encode(context.rstrip())
    cont_ids = tok.encode(context[len(context.rstrip()):] + cont)
    full = (ctx + cont_ids)[-(model.cfg.max_len + 1):]     # the 56-char context is cut from the left
    direct, hits = _direct_logprobs(model, params, full)
    np.testing.assert_allclose(lp, direct[-len(cont_ids):].sum(), rtol=2e-5, atol=2e-5)
    assert greedy == bool(hits[-len(cont_ids):].all())
    assert lp < 0


def test_a_greedy_continuation_is_reported_as_greedy(loaded):
  workdir, (model, params, tok, _) = loaded
  lm = lm_harness.GptjaxLM(workdir=workdir)
  context = "ROMEO:\n"
  ids = [tok.bos_id] + tok.encode(context)
  out = sampling.generate(model, params, np.asarray([ids], np.int32), [len(ids)], rng=0,
                          max_new_tokens=4, temperature=0.0, pad_id=tok.pad_id)
  greedy_text = tok.decode(np.asarray(out.completion)[0])
  (lp, greedy), = lm.loglikelihood([_req("loglikelihood", context, greedy_text)])
  assert greedy
  (_, other), = lm.loglikelihood([_req("loglikelihood", context, greedy_text[:-1] + "#")])
  assert not other


def test_rolling_loglikelihood_predicts_every_token_once(loaded):
  workdir, (model, params, tok, _) = loaded
  lm = lm_harness.GptjaxLM(workdir=workdir, batch_size=2)
  short = "To be, or not"
  long = "Now is the winter of our discontent made glorious summer by this sun of York. " * 2
  got = lm.loglikelihood_rolling([_req("loglikelihood_rolling", short),
                                  _req("loglikelihood_rolling", long)])
  direct_short, _ = _direct_logprobs(model, params, [tok.bos_id] + tok.encode(short))
  np.testing.assert_allclose(got[0], direct_short.sum(), rtol=2e-5)
  # The long text spans several 32-token windows: the predicted tokens, window after window, are
  # the text exactly, and each window's score is a direct forward over its own tokens.
  windows = lm.rolling_windows(long)
  assert len(windows) > 2
  assert [t for _, cont in windows for t in cont] == tok.encode(long)
  total = 0.0
  for ctx, cont in windows:
    full = ctx + cont
    assert len(full) - 1 <= model.cfg.max_len
    total += _direct_logprobs(model, params, full)[0][-len(cont):].sum()
  np.testing.assert_allclose(got[1], total, rtol=2e-5)


def test_generate_until_is_our_greedy_sampler_cut_at_the_stop_string(loaded):
  workdir, (model, params, tok, _) = loaded
  lm = lm_harness.GptjaxLM(workdir=workdir, batch_size=2, max_gen_toks=12)
  contexts = ["ROMEO:\n", "First Citizen:\nBefore we proceed", "K"]
  got = lm.generate_until([_req("generate_until", c, {"until": ["\n\n"], "max_gen_toks": 12})
                           for c in contexts])
  for context, text in zip(contexts, got):
    # The prompt keeps its last 32 - 12 tokens, so prompt and reply fit the learned positions.
    ids = ([tok.bos_id] + tok.encode(context))[-(model.cfg.max_len - 12):]
    out = sampling.generate(model, params, np.asarray([ids], np.int32), [len(ids)], rng=0,
                            max_new_tokens=12, temperature=0.0, eos_ids=(tok.eos_id,),
                            pad_id=tok.pad_id)
    n = int(out.lengths[0])
    full = tok.decode([t for t in np.asarray(out.completion)[0, :n] if t != tok.eos_id])
    assert text == prompting.truncate_at_stop(full, ["\n\n"])
  # A stop string that greedy decoding produces ends the text before it.
  (free,) = lm.generate_until([_req("generate_until", contexts[0], {"until": [],
                                                                     "max_gen_toks": 12})])
  assert len(free) >= 3
  stop = free[2]
  (cut,) = lm.generate_until([_req("generate_until", contexts[0],
                                   {"until": [stop], "max_gen_toks": 12})])
  assert cut == free[:free.index(stop)]


def test_the_adapter_takes_a_model_params_tokenizer_triple(loaded):
  workdir, (model, params, tok, _) = loaded
  a = lm_harness.GptjaxLM(model=model, params=params, tokenizer=tok)
  b = lm_harness.GptjaxLM(workdir=workdir)
  req = [_req("loglikelihood", "ROMEO:", " O")]
  assert a.loglikelihood(req) == b.loglikelihood(req)
  with pytest.raises(ValueError, match="unknown model_args"):
    lm_harness.GptjaxLM(workdir=workdir, temperature=1)


def _write_task(tmp_path):
  """A multiple-choice task over a JSONL file: which continuation of a line is more likely."""
  rows = [{"context": "ROMEO:\nWhat light through yonder", "choices": [" window", " qzxv"],
           "label": 0},
          {"context": "JULIET:\nO Romeo, Romeo", "choices": ["!zq", "! wherefore"], "label": 1},
          {"context": "HAMLET:\nTo be, or not", "choices": [" to be", " xx"], "label": 0},
          {"context": "KING:\nMy lord", "choices": [",", "q"], "label": 1}]
  data = tmp_path / "tiny_choice.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  tasks = tmp_path / "tasks"
  tasks.mkdir()
  (tasks / "tiny_choice.yaml").write_text(f"""task: gptjax_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
""")
  return rows, str(tasks)


def _direct_accuracy(lm, rows):
  hits = []
  for r in rows:
    scores = [lp for lp, _ in lm.loglikelihood([_req("loglikelihood", r["context"], c)
                                                 for c in r["choices"]])]
    hits.append(int(np.argmax(scores)) == r["label"])
  return float(np.mean(hits))


def _hf_env(tmp_path):
  return child_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                   HF_HOME=str(tmp_path / "hf_home"), TOKENIZERS_PARALLELISM="false")


def test_gptjax_eval_and_lm_evals_own_cli_run_a_local_task(loaded, tmp_path):
  workdir, _ = loaded
  rows, tasks = _write_task(tmp_path)
  expected = _direct_accuracy(lm_harness.GptjaxLM(workdir=workdir), rows)
  out = tmp_path / "results.json"
  proc = subprocess.run(
      [sys.executable, "-m", "gptjax.main", "eval", "--workdir", workdir, "--tasks",
       "gptjax_tiny_choice", "--include_path", tasks, "--limit", "4", "--output", str(out)],
      env=_hf_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(out.read_text())["results"]["gptjax_tiny_choice"]
  assert res["acc,none"] == pytest.approx(expected)
  assert "gptjax_tiny_choice" in proc.stdout

  lm_out = tmp_path / "lm_eval_out"
  proc = subprocess.run(
      [sys.executable, "-m", "gptjax.lm_harness", "run", "--model", "gptjax", "--model_args",
       f"workdir={workdir}", "--batch_size", "4", "--tasks", "gptjax_tiny_choice", "--include_path",
       tasks, "--output_path", str(lm_out)],
      env=_hf_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  files = [os.path.join(d, f) for d, _, fs in os.walk(lm_out) for f in fs
           if f.startswith("results")]
  assert len(files) == 1
  res = json.load(open(files[0]))["results"]["gptjax_tiny_choice"]
  assert res["acc,none"] == pytest.approx(expected)


def test_gptjax_eval_names_an_unknown_task(loaded, tmp_path):
  workdir, _ = loaded
  proc = subprocess.run(
      [sys.executable, "-m", "gptjax.main", "eval", "--workdir", workdir, "--tasks",
       "no_such_task_here"], env=_hf_env(tmp_path), cwd=REPO, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 2
  assert "no_such_task_here" in proc.stderr and "Traceback" not in proc.stderr


def test_an_imported_hugging_face_model_scores_as_transformers_does(tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import hf_tiny  # tests/helpers
  directory = str(tmp_path / "qwen2")
  reference = hf_tiny.write_model("qwen2", directory)
  lm = lm_harness.GptjaxLM(workdir="hf:" + directory, batch_size=2)
  pairs = [("the cat sat", " on the mat"), ("hello", " world"), ("", "a b c")]
  got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
  for (context, cont), (lp, _) in zip(pairs, got):
    ctx_ids, cont_ids = lm.encode_pair(context, cont)
    assert cont_ids
    full = ctx_ids + cont_ids
    with torch.no_grad():
      logits = reference(input_ids=torch.tensor([full[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, -1)[torch.arange(len(full) - 1), torch.tensor(full[1:])]
    np.testing.assert_allclose(lp, float(logp[-len(cont_ids):].sum()), rtol=1e-4, atol=1e-4)
