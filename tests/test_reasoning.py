"""The arithmetic-reasoning pipeline end to end on its micro preset (one run per session), the
verifier as an RL reward by configuration, and the report card's table and findings."""

import json
import os
import subprocess

import numpy as np
import pytest

from conftest import REPO, child_env, reasoning_cmd
from gptjax import reasoning, reasoning_report
from gptjax.rl import rollout
from gptjax.tasks import arithmetic as ar

STAGES = ("task_data", "tokenizer", "pretrain", "sft_direct", "sft_cot", "tool_data", "sft_tool",
          "orm_data", "orm", "grpo_cot", "ppo_orm", "reason_eval", "tot_eval", "tool_eval",
          "answer_format", "check_retry",
          "report")


def _jsonl(path):
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def test_every_stage_runs_and_the_table_has_every_method(micro_reasoning):
  run = micro_reasoning
  for stage in STAGES:
    assert os.path.exists(os.path.join(run, stage, "done.json")), stage
  res = json.load(open(os.path.join(run, "reason_eval.json")))
  # The held-out set has the training bands and one beyond them.
  assert res["bands"] == ["add-1d", "add-2d", "word-1s", "add-3d"]
  assert "add-3d" not in res["train_bands"]
  methods = [r["method"] for r in res["rows"]]
  for m in ("direct, greedy", "CoT, greedy", "CoT, 1 sample", "self-consistency@4",
            "best-of-4, ORM", "best-of-4, oracle verifier", "grpo_cot, greedy",
            "grpo_cot, 1 sample", "grpo_cot + self-consistency@2", "ppo_orm, 1 sample",
            "tool, greedy",
            "CoT, greedy, answer format forced", "CoT, 1 sample, answer format forced",
            "check-and-retry x1, rederive judge", "check-and-retry x1, orm judge"):
    assert m in methods, m
  # Format errors, with and without the constraint: constrained decoding leaves no reply
  # without its final `#### N` line, on any band (the budget closes chains that run long).
  fmt = {r["method"]: r for r in res["rows"] if r.get("metric") == "format errors"}
  assert set(fmt) == {"format errors: CoT, greedy", "format errors: CoT, 1 sample",
                      "format errors: CoT, greedy, answer format forced",
                      "format errors: CoT, 1 sample, answer format forced"}
  for m in ("format errors: CoT, greedy, answer format forced",
            "format errors: CoT, 1 sample, answer format forced"):
    assert all(c["acc"] == 0 for c in [fmt[m]["overall"], *fmt[m]["per_band"].values()]), m
  budgets = {r["method"]: r["budget"] for r in res["rows"]}
  assert budgets["check-and-retry x1, rederive judge"] == 4
  assert budgets["check-and-retry x1, orm judge"] == 2
  assert len(res["pool"]["answers"]) == res["problems"]
  for row in res["rows"]:
    for cell in [row["overall"], *row["per_band"].values()]:
      assert cell["n"] > 0 and cell["lo"] <= cell["acc"] <= cell["hi"], row["method"]
    # Tree search runs on the first problems of each band (tot_eval.problems_per_band = 3).
    n = 3 * len(res["bands"]) if row.get("stage") == "tot_eval" else res["problems"]
    assert sum(c["n"] for c in row["per_band"].values()) == row["overall"]["n"] == n
  # Tree search, each beside self-consistency and ORM best-of-k on as many generated tokens.
  tot = {r["method"]: r for r in res["rows"] if r.get("stage") == "tot_eval"}
  for name in ("tree search, beam 2x2, ORM", "tree search, best-first x2, ORM"):
    row = tot[name]
    k = row["budget"]
    label = "beam" if "beam" in name else "best-first"
    assert row["claim"]["against"] == f"{label} search's tokens: self-consistency"
    assert row["claim"]["against"] in tot
    assert tot[f"{label} search's tokens: best-of-k by the ORM"]["budget"] == k
    assert tot[row["claim"]["against"]]["budget"] == k
    assert 1 <= k <= 4 and row["tokens_per_problem"] > 0
    assert abs(row["tokens_per_problem"] - tot[row["claim"]["against"]]["tokens_per_problem"]) \
        <= tot[row["claim"]["against"]]["tokens_per_problem"] / k / 2 + 1e-9 or k in (1, 4)
    assert res["traces"][name]
  # The oracle (pass@k) bounds every method that picks one of the same k chains.
  by = {r["method"]: r["overall"]["acc"] for r in res["rows"]}
  assert by["best-of-4, oracle verifier"] >= max(by["self-consistency@4"], by["best-of-4, ORM"],
                                                  by["CoT, 1 sample"])
  cur = res["curves"]["cot_sampling"]
  assert cur["k"] == [1, 2, 4] and set(cur) >= {"self_consistency", "orm", "oracle"}
  # GRPO's curve: the SFT start (step 0) and each kept checkpoint, with pass@1 <= pass@k.
  pts = res["curves"]["grpo_cot"]
  assert [p["step"] for p in pts][0] == 0 and len(pts) >= 2
  assert all(p["pass@1"] <= p["pass@2"] and p["mean_tokens"] > 0 for p in pts)
  report = open(os.path.join(run, "report.md")).read()
  assert "| CoT, greedy | 1 |" in report and "chain-of-thought beats a direct answer" in report
  assert "| tree search, beam 2x2, ORM |" in report and "generated tokens per problem" in report
  assert "beam tree search beats self-consistency at an equal token budget" in report
  assert "| tool, greedy | 1 |" in report and "a calculator in the decode loop beats" in report
  assert "## Format errors" in report
  assert "| format errors: CoT, greedy, answer format forced | 1 |" in report
  for png in ("self_consistency.png", "rl_curves.png"):
    assert f"({png})" in report
    with open(os.path.join(run, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_no_heldout_question_reaches_training(micro_reasoning):
  data = os.path.join(micro_reasoning, "task_data")
  held = {p["question"] for p in _jsonl(os.path.join(data, "problems_heldout.jsonl"))}
  trained = set()
  for fmt in ("direct", "cot"):
    trained |= {r["messages"][0]["content"] for r in _jsonl(os.path.join(data, f"sft_{fmt}.jsonl"))}
  trained |= {r["messages"][0]["content"]
              for r in _jsonl(os.path.join(micro_reasoning, "tool_data", "sft_tool.jsonl"))}
  trained |= {r["prompt"] for r in _jsonl(os.path.join(data, "rl_prompts.jsonl"))}
  trained |= {r["prompt"] for r in _jsonl(os.path.join(micro_reasoning, "orm_data", "train.jsonl"))}
  pretrain = "".join(r["text"] for r in _jsonl(os.path.join(data, "pretrain_task.jsonl")))
  assert held and trained and not held & trained
  assert not any(f"Question: {q}\n" in pretrain for q in held)


def test_stages_start_from_each_other_and_grpo_trains_on_the_verifier(micro_reasoning):
  run = micro_reasoning
  cfg = lambda s: json.load(open(os.path.join(run, s, "config.json")))
  assert cfg("sft_cot")["train"]["init_from"] == os.path.join(run, "pretrain")
  assert cfg("sft_cot")["data"]["source"] == f"chat_jsonl:{run}/task_data/sft_cot.jsonl"
  assert cfg("grpo_cot")["train"]["init_from"] == os.path.join(run, "sft_cot")
  assert cfg("grpo_cot")["rl"]["reward"] == f"verifier:{run}/task_data/rl_prompts.jsonl"
  assert cfg("ppo_orm")["rl"]["reward_workdir"] == os.path.join(run, "orm")
  rows = _jsonl(os.path.join(run, "grpo_cot", "rl_iterations.jsonl"))
  assert rows and all(0.0 <= r["rl/score"] <= 1.0 for r in rows)
  # The ORM's records pair correct and wrong replies of one problem.
  recs = _jsonl(os.path.join(run, "orm_data", "train.jsonl"))
  assert recs and all(set(r["ranks"]) == {0, 1} for r in recs)
  assert all(ar.is_correct(x, ar.reference_answer(r["responses"][r["ranks"].index(1)]))
             for r in recs for x in [r["responses"][r["ranks"].index(1)]])


def test_the_tool_model_trains_on_calls_and_is_evaluated_with_the_calculator(micro_reasoning):
  run = micro_reasoning
  cfg = json.load(open(os.path.join(run, "sft_tool", "config.json")))
  assert cfg["train"]["init_from"] == os.path.join(run, "pretrain")      # the base of sft_cot
  assert cfg["data"]["source"] == f"chat_jsonl:{run}/tool_data/sft_tool.jsonl"
  probs = reasoning.read_problems(os.path.join(run, "task_data", "problems_train.jsonl"))
  recs = _jsonl(os.path.join(run, "tool_data", "sft_tool.jsonl"))
  assert [r["messages"] for r in recs] == [ar.messages(p, "tool") for p in probs]
  assert sum("tool_call" in m for r in recs for m in r["messages"]) == sum(
      len(ar.tool_steps(p)) for p in probs) > len(probs) / 2
  res = json.load(open(os.path.join(run, "reason_eval.json")))
  [row] = [r for r in res["rows"] if r.get("stage") == "tool_eval"]
  heldout = reasoning.read_problems(os.path.join(run, "task_data", "problems_heldout.jsonl"))
  assert row["method"] == "tool, greedy" and row["overall"]["n"] == len(heldout)
  stats = json.load(open(os.path.join(run, "tool_eval", "done.json")))
  assert set(stats) >= {"calls_per_problem", "failed_calls", "problems_without_calls", "accuracy"}
  assert stats["accuracy"] == row["overall"]["acc"]
  for t in res["traces"]["tool, greedy"]:
    assert t["correct"] == ar.is_correct(t["output"], t["answer"])


def test_a_finished_run_gains_the_tool_row_and_reuses_its_stages(micro_reasoning, tmp_path):
  """A run whose reason_eval finished before tool_eval ran: the same command adds the row,
  skips every finished stage (reason_eval too) and leaves the other rows as they were. (The
  tool model is kept, so the test does not train it again; its stages only read files that
  every earlier run has.)"""
  import shutil
  run = str(tmp_path / "old")
  shutil.copytree(micro_reasoning, run, symlinks=True)
  for stage in ("tool_eval", "report"):
    shutil.rmtree(os.path.join(run, stage))
  # As reason_eval wrote it, before the tool row was added.
  path = os.path.join(run, "reason_eval.json")
  res = json.load(open(path))
  res["rows"] = [r for r in res["rows"] if r.get("stage") != "tool_eval"]
  del res["traces"]["tool, greedy"], res["timings"]["tool_greedy_s"]
  with open(path, "w") as f:
    json.dump(res, f)
  proc = subprocess.run(reasoning_cmd(run), env=child_env(), cwd=REPO, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for stage in STAGES:
    done = f"[pipeline] {stage}: complete, skipping"
    assert (done in proc.stdout) == (stage not in ("tool_eval", "report")), stage
  old = json.load(open(os.path.join(micro_reasoning, "reason_eval.json")))
  new = json.load(open(path))
  # Every row as it was, and the tool row as the fresh run made it. A stage that adds rows
  # appends them, so in this older run the tool row comes after the rows of the stages that ran
  # after tool_eval (answer_format, check_retry) in the fresh run: compare by method.
  by_method = lambda rows: {r["method"]: r for r in rows}
  assert len(new["rows"]) == len(old["rows"])
  assert by_method(new["rows"]) == by_method(old["rows"])
  assert new["rows"][-1]["method"] == "tool, greedy"
  assert "| tool, greedy | 1 |" in open(os.path.join(run, "report.md")).read()


def test_the_verifier_is_an_rl_reward_by_configuration(tmp_path):
  probs = ar.generate(["add-2d"], 4, split="train", seed=0)
  path = tmp_path / "prompts.jsonl"
  ar.write_jsonl(str(path), ar.prompt_records(probs))
  scorer = rollout.TextScorer(rollout.make_reward_fn(f"verifier:{path}@0.5"))
  comps = [probs[0].cot, "#### 0", "no answer", probs[3].target("direct") + "\n"]
  got = scorer(prompt_texts=[p.question for p in probs], completion_texts=comps)
  np.testing.assert_allclose(got, [1.5, 0.5 * float(probs[1].answer != 0), 0.0, 1.5])
  with pytest.raises(ValueError, match="not in"):
    scorer(prompt_texts=["What is 1 + 1?"], completion_texts=["#### 2"])


def test_report_over_several_runs_uses_the_run_means(micro_reasoning, tmp_path):
  res = json.load(open(os.path.join(micro_reasoning, "reason_eval.json")))
  runs = []
  for i, shift in enumerate((0.0, 0.5)):
    r = json.loads(json.dumps(res))
    for row in r["rows"]:
      for cell in [row["overall"], *row["per_band"].values()]:
        cell["acc"] = min(1.0, cell["acc"] + shift)
    d = tmp_path / f"run{i}"
    d.mkdir()
    (d / "reason_eval.json").write_text(json.dumps(r))
    runs.append(str(d))
  path = reasoning_report.write(runs, str(tmp_path / "out"))
  text = open(path).read()
  assert "2 training seeds" in text
  cell = reasoning_report.summarise(reasoning_report._cell_values(
      reasoning_report.load(runs), "CoT, greedy", "all"))
  base = next(r for r in res["rows"] if r["method"] == "CoT, greedy")["overall"]["acc"]
  assert cell["runs"] == 2 and cell["acc"] == pytest.approx(base + 0.25)
  assert cell["lo"] < cell["acc"] < cell["hi"]
  # The pipeline's report stage pools a run's extra seeds (<run>/seeds/<seed>) the same way.
  seeds = tmp_path / "run0" / "seeds"
  seeds.mkdir()
  os.rename(runs[1], seeds / "1")
  (seeds / "2").mkdir()            # a seed whose evaluation has not run yet is left out
  text = open(reasoning.report_stage(None, runs[0])["report"]).read()
  assert "2 training seeds" in text


def test_findings_follow_the_intervals():
  bands = ["add-1d", "add-4d"]
  def row(method, accs):
    per = {b: {"acc": a, "lo": a - 0.05, "hi": a + 0.05, "n": 100} for b, a in zip(bands, accs)}
    return {"method": method, "budget": 1, "per_band": per,
            "overall": {"acc": np.mean(accs), "lo": np.mean(accs) - 0.03,
                        "hi": np.mean(accs) + 0.03, "n": 200}}
  res = [{"rows": [row("direct, greedy", [0.9, 0.1]), row("CoT, greedy", [0.5, 0.6])]}]
  [line] = reasoning_report.findings(res, bands, ["add-1d"])
  assert "holds on add-4d" in line and "is reversed on add-1d" in line
  assert "cannot be told apart on all" in line and "beyond training (add-4d)" in line


def test_a_bad_gsm8k_file_stops_the_pipeline_with_one_line(tmp_path):
  bad = tmp_path / "gsm8k.jsonl"
  bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "answer": "two"}\n')
  proc = subprocess.run(reasoning_cmd(str(tmp_path / "run"), f"--config.task_data.gsm8k_test={bad}",
                                      "--config.pipeline.stages=('task_data',)"),
                        env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip() == (f"gptjax: data error: {bad}:2: field 'answer' does not end with "
                                 "a '#### N' line (its last line is 'two')")


def test_sampling_budget_and_greedy_checks():
  with pytest.raises(ValueError, match="greedy"):
    reasoning.sample((None, None, None), ["q"], n=2, temperature=0.0, max_new_tokens=4, seed=0)


def _task_cfg(**kw):
  import ml_collections
  from gptjax import config as config_lib
  cfg = config_lib.load(os.path.join(REPO, "experiments", "arithmetic_reasoning.py") + ":micro")
  c = ml_collections.ConfigDict(cfg.task_data.to_dict())
  c.update(kw)
  return c


def test_task_files_keep_heldout_out_and_mix_shakespeare_by_characters(tmp_path):
  info = reasoning.write_task_data(_task_cfg(shakespeare_fraction=0.25), str(tmp_path))
  assert info["train"] == 3 * 64 and info["heldout_by_band"]["add-3d"] == 6
  mixed = info["pretrain_shakespeare_chars"] / (info["pretrain_shakespeare_chars"]
                                                + info["pretrain_task_chars"])
  assert mixed == pytest.approx(0.25, abs=0.01)
  shakespeare_docs = _jsonl(str(tmp_path / "pretrain_shakespeare.jsonl"))
  assert sum(len(d["text"]) for d in shakespeare_docs) == info["pretrain_shakespeare_chars"]
  # Validation problems come from the training split but are not training problems.
  train = {p.question for p in reasoning.read_problems(str(tmp_path / "problems_train.jsonl"))}
  val = reasoning.read_problems(str(tmp_path / "problems_validation.jsonl"))
  assert val and not {p.question for p in val} & train
  assert not any(ar.is_heldout(p.question, 0.2) for p in val)
  # Task alone: the Shakespeare file is gone, and the alphabet is the task's.
  info = reasoning.write_task_data(_task_cfg(), str(tmp_path))
  assert not os.path.exists(tmp_path / "pretrain_shakespeare.jsonl")
  chars = open(tmp_path / "chars.txt").read()
  assert set("0123456789+-*=#") <= set(chars) and "Q" in chars and len(chars) < 60


def test_orm_records_pair_correct_with_wrong_replies():
  probs = [ar.Problem("What is 1 + 1?", 2, "add-1d", "1+1=2\n#### 2"),
           ar.Problem("What is 2 + 2?", 4, "add-1d", "2+2=4\n#### 4"),
           ar.Problem("What is 3 + 3?", 6, "add-1d", "3+3=6\n#### 6")]
  samples = {"texts": [["#### 2", "#### 3"], ["#### 5", "#### 1"], ["#### 6", "#### 6"]],
             "ids": [[[1], [2]], [[3], [4]], [[5], [6]]],
             "ended": [[True, True], [True, False], [True, True]]}
  recs, stats = reasoning.orm_records(probs, samples, add_reference=True)
  assert [r["ranks"] for r in recs] == [[1, 0], [0, 0, 1]]        # the all-correct one gives no pair
  assert recs[1]["responses"][-1] == probs[1].cot and "response_ids" not in recs[1]
  assert recs[0]["response_ids"] == [[1], [2]]
  assert stats == {"problems": 3, "sample_accuracy": 0.5, "records": 2, "reference_added": 1}
  recs, _ = reasoning.orm_records(probs, samples, add_reference=False)
  assert [r["prompt"] for r in recs] == ["What is 1 + 1?"]


def test_table_row_cells_and_intervals():
  row = reasoning.table_row("m", 4, ["a", "a", "b"], [1.0, 0.5, 0.0])
  assert row["per_band"]["a"]["acc"] == 0.75 and row["per_band"]["a"]["n"] == 2
  assert row["overall"]["acc"] == 0.5 and row["overall"]["n"] == 3 and row["budget"] == 4
  lo, hi = ar.wilson_interval(1.5, 3)
  assert (row["overall"]["lo"], row["overall"]["hi"]) == (lo, hi)


def test_sample_groups_prompts_by_width_and_is_reproducible():
  """A long prompt does not shorten the room of a short one: each width group gets the new
  tokens that fit beside its own prompts."""
  import jax
  import jax.numpy as jnp
  from gptjax.data.tokenizers import CharTokenizer
  from gptjax.model import GPT, ModelConfig
  tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ?0123456789")
  model = GPT(ModelConfig(vocab_size=tok.vocab_size, num_layers=1, num_heads=2, d_model=16,
                          max_len=48))
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  policy = (model, params, tok)
  # 6 and 29 prompt tokens (with <bos>, the role markers and <|end|>): widths 16 and 32, so
  # room for 32 and 16 new tokens in a window of 48.
  qs = ["hi", "what is twelve plus six?"]
  a = reasoning.sample(policy, qs, n=8, temperature=1.0, max_new_tokens=40, seed=1, batch_size=8)
  b = reasoning.sample(policy, qs, n=8, temperature=1.0, max_new_tokens=40, seed=1, batch_size=8)
  assert a == b and [len(r) for r in a["texts"]] == [8, 8]
  assert max(a["lengths"][1]) <= 16 < max(a["lengths"][0]) <= 32
  with pytest.raises(ValueError, match="no room"):
    reasoning.sample(policy, ["x" * 60], n=1, temperature=1.0, max_new_tokens=4, seed=0)
  # Greedy chains do not depend on how rows are chunked or padded: chunks of 2 (the last
  # padded with a copy) against one chunk of 5 padded to 8.
  qs5 = ["hi", "ab", "what is twelve plus six?", "c", "d e"]
  greedy = [reasoning.sample(policy, qs5, n=1, temperature=0.0, max_new_tokens=12, seed=0,
                             batch_size=bs)["ids"] for bs in (2, 64)]
  assert greedy[0] == greedy[1]


def test_orm_scores_each_distinct_chain_once_and_copies_take_its_score():
  from gptjax.data.tokenizers import CharTokenizer
  tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ?0123456789")
  scored = []

  def rm(prompts, completions):
    # A function of the text (prompt and completion), like an RM; records what it was asked.
    scored.extend(zip(map(tuple, prompts), map(tuple, completions)))
    return np.asarray([sum(p) * 0.01 + sum(c) * 0.1 + len(c) for p, c in
                       zip(prompts, completions)], np.float32)

  ids = [[[5, 6], [5, 6], [7], [5, 6]], [[5, 6], [8, 9, 9], [8, 9, 9], [1]]]
  qs = ["one?", "two?"]
  got = reasoning._score_with_rm(rm, tok, qs, ids)
  # Five distinct (question, chain) pairs: the same chain under another question is distinct.
  assert len(scored) == 5
  p_ids = reasoning.prompt_ids(qs, tok)
  want = np.asarray([[float(rm([p_ids[q]], [c])[0]) for c in row] for q, row in enumerate(ids)])
  np.testing.assert_array_equal(got, want)


def test_a_later_stage_adds_rows_and_keeps_the_others(tmp_path):
  """A method measured by a stage of its own adds its rows to reason_eval.json; running it again
  replaces only its own rows, and another stage's rows stay as they were."""
  from gptjax import config as config_lib
  bands = ["a", "b"]
  base = [reasoning.table_row("CoT, greedy", 1, bands, [1.0, 0.0])]
  with pytest.raises(config_lib.ConfigError, match="run reason_eval before it"):
    reasoning.add_rows(str(tmp_path), "tot_eval", base)
  (tmp_path / "reason_eval.json").write_text(json.dumps(
      {"bands": bands, "rows": base, "traces": {"CoT, greedy": []}, "timings": {"total_s": 1.0}}))
  first = reasoning.table_row("beam", 4, bands, [0.0, 0.0])
  other = reasoning.table_row("tools", 1, bands, [1.0, 1.0])
  reasoning.add_rows(str(tmp_path), "tot_eval", [first], traces={"beam": [{"x": 1}]},
                     timings={"tot_s": 2.0})
  reasoning.add_rows(str(tmp_path), "tools_eval", [other])
  again = reasoning.table_row("beam", 4, bands, [1.0, 1.0])
  res = reasoning.add_rows(str(tmp_path), "tot_eval", [again], traces={"beam": [{"x": 2}]})
  assert [(r["method"], r.get("stage")) for r in res["rows"]] == [
      ("CoT, greedy", None), ("tools", "tools_eval"), ("beam", "tot_eval")]
  assert res["rows"][0] == base[0] and res["rows"][2]["overall"]["acc"] == 1.0
  assert res["traces"]["beam"] == [{"x": 2}] and res["timings"] == {"total_s": 1.0, "tot_s": 2.0}
  assert json.load(open(tmp_path / "reason_eval.json")) == res
  with pytest.raises(ValueError, match="'CoT, greedy' that reason_eval wrote"):
    reasoning.add_rows(str(tmp_path), "tot_eval", base)


def test_a_finished_run_gains_the_answer_format_and_check_retry_rows(micro_reasoning, tmp_path):
  """A run finished before these stages existed (no rows of theirs, no pooled samples in
  reason_eval.json) gains their rows from the same pipeline command, and nothing else moves."""
  import shutil
  run = str(tmp_path / "run")
  shutil.copytree(micro_reasoning, run)
  full = json.load(open(os.path.join(run, "reason_eval.json")))
  for stage in ("answer_format", "check_retry"):
    shutil.rmtree(os.path.join(run, stage))
  old = {k: v for k, v in full.items() if k != "pool"}
  mine = ("answer_format", "check_retry")
  old["rows"] = [r for r in full["rows"] if r.get("stage") not in mine]
  old["traces"] = {k: v for k, v in full["traces"].items() if "answer format" not in k}
  old["timings"] = {k: v for k, v in full["timings"].items()
                    if k not in ("answer_format_s", "check_retry_s")}
  old["rows"][0] = dict(old["rows"][0], note="kept as it was")   # shows a recomputation
  with open(os.path.join(run, "reason_eval.json"), "w") as f:
    json.dump(old, f)
  proc = subprocess.run(reasoning_cmd(run), env=child_env(), cwd=REPO, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "reason_eval: complete, skipping" in proc.stdout
  res = json.load(open(os.path.join(run, "reason_eval.json")))
  n_old = len(old["rows"])
  assert res["rows"][:n_old] == old["rows"]
  # The new rows are the fresh run's: the pool is drawn again with the same seed.
  assert res["rows"][n_old:] == [r for r in full["rows"] if r.get("stage") in mine]
  assert res["pool"] == full["pool"]
  assert "## Format errors" in open(os.path.join(run, "report.md")).read()


def test_check_and_retry_keeps_the_first_accepted_try_else_the_last():
  answers = [[5, 5, 7, 7], [1, 2, 3, 3], [None, None, 4, 9], [8, 8, 8, 8]]
  agree = lambda q, t: answers[q][2 * t] is not None and answers[q][2 * t + 1] == answers[q][2 * t]
  finals, used = reasoning.check_and_retry(answers, agree, retries=1, per_try=2)
  assert finals == [5, 3, 4, 8] and used == [2, 4, 4, 2]
  never = lambda q, t: False
  finals, used = reasoning.check_and_retry(answers, never, retries=3, per_try=1)
  assert finals == [7, 3, 9, 8] and used == [4, 4, 4, 4]


def test_check_retry_rows_from_a_pool():
  probs = [ar.Problem(f"q{i}", a, "add-1d", "") for i, a in enumerate([5, 3, 4, 9])]
  pool = {"answers": [[5, 5, 7, 7], [1, 2, 3, 3], [None, None, 4, 9], [8, 8, 8, 8]],
          "orm_scores": [[1.0, 0, 0, 0], [-1, -1, 2, 0], [0, 1, 0, 0], [3, 3, 3, 3]]}
  import ml_collections
  c = ml_collections.ConfigDict(dict(judges=("rederive", "orm"), retries=3, orm_threshold=0.5))
  rows, info = reasoning.check_retry_rows(c, pool, probs)
  by = {r["method"]: r for r in rows}
  # rederive: 5 (agree), 3 (second try agrees), 4 (last try), 8 (agree) -> 3 of 4 right.
  assert by["check-and-retry x1, rederive judge"]["overall"]["acc"] == 0.75
  assert by["check-and-retry x1, rederive judge"]["budget"] == 4
  # orm (threshold 0.5): 5 (first), 3 (third chain), None (second chain: 1 > 0.5), 8 -> 2 of 4.
  assert by["check-and-retry x3, orm judge"]["overall"]["acc"] == 0.5
  assert info["orm"]["mean_chains"] == (1 + 3 + 2 + 1) / 4
  # First tries: accepted q0 (right) and q3 (wrong); of the three wrong ones, q1 and q2 rejected.
  assert info["orm"]["judge_precision"] == 0.5
  assert info["orm"]["judge_recall"] == pytest.approx(2 / 3)


def test_rows_of_other_metrics_get_their_own_table(tmp_path):
  bands = ["a", "a", "b"]
  rows = [reasoning.table_row("m", 1, bands, [1, 0, 1]),
          reasoning.table_row("format errors: m", 1, bands, [0, 1, 1], metric="format errors"),
          reasoning.table_row("m forced", 1, bands, [1, 1, 0], note="a note")]
  assert "metric" not in rows[0] and rows[1]["metric"] == "format errors"
  res = {"bands": ["a", "b"], "train_bands": ["a"], "problems": 3, "samples": 1,
         "temperature": 1.0, "rows": rows, "curves": {}, "traces": {}}
  (tmp_path / "reason_eval.json").write_text(json.dumps(res))
  text = open(reasoning_report.write([str(tmp_path)], str(tmp_path))).read()
  main, fmt = text.split("## Format errors")
  assert "| m | 1 | 0.67 [" in main and "| m forced | 1 |" in main and "*m forced*: a note" in main
  assert "format errors: m" not in main
  assert "| format errors: m | 1 | 0.67 [" in fmt.split("##")[0]
  assert "format errors: m" not in text.split("## At equal sampling budget")[1]


def test_a_cell_of_all_successes_holds_its_own_estimate():
  # Wilson's upper bound at 6 of 6 rounds to 0.9999999999999999; the cell must still hold 1.
  for values in ([1] * 6, [0] * 6, [1, 0, 1]):
    c = reasoning.table_row("m", 1, ["a"] * len(values), values)["per_band"]["a"]
    assert c["lo"] <= c["acc"] <= c["hi"], c


def test_tiny_is_the_core_table_and_tiny_all_adds_the_companion_rows_at_the_same_sizes():
  from gptjax import config as config_lib
  from gptjax import pipeline
  path = os.path.join(REPO, "experiments", "arithmetic_reasoning.py")
  tiny, every = (config_lib.load(f"{path}:{p}") for p in ("tiny", "tiny_all"))
  extra = ("tool_data", "sft_tool", "tot_eval", "tool_eval", "answer_format")
  assert tuple(every.pipeline.stages) == STAGES
  assert tuple(tiny.pipeline.stages) == tuple(s for s in STAGES if s not in extra)
  # Every stage both run is configured alike, so tiny_all on a finished tiny run reuses them.
  for s in tiny.pipeline.stages:
    if s in tiny:
      assert tiny[s].to_dict() == every[s].to_dict(), s
  # A seed re-runs only stages the preset has (checked when the pipeline starts).
  assert "sft_tool" not in pipeline.seeded_stages(tiny)
  assert "sft_tool" in pipeline.seeded_stages(every)
