"""The embedded arithmetic task: generator, worked solutions, verifier, GSM8K reader, votes and
pass@k (no model; milliseconds)."""

import itertools
import json
import math
import re

import numpy as np
import pytest

from gptjax.data.errors import DataError
from gptjax.tasks import arithmetic as ar

BANDS = ("add-1d", "add-3d", "sub-2d", "mul-1d", "mul-3d", "word-1s", "word-3s")


def test_generator_is_deterministic_and_seeded():
  a = ar.generate(BANDS, 20, split="train", seed=3)
  b = ar.generate(BANDS, 20, split="train", seed=3)
  c = ar.generate(BANDS, 20, split="train", seed=4)
  assert a == b
  assert a != c
  assert {p.band for p in a} == set(BANDS)


def test_train_and_heldout_are_disjoint_whatever_the_seeds():
  train = {p.question for s in range(3) for p in ar.generate(BANDS, 50, split="train", seed=s)}
  held = {p.question for s in range(3) for p in ar.generate(BANDS, 50, split="heldout", seed=s)}
  assert train and held and not train & held
  # The rule is a property of the question, so it can be checked on any problem.
  assert all(ar.is_heldout(q, 0.2) for q in held)
  assert not any(ar.is_heldout(q, 0.2) for q in train)


def test_a_small_band_gives_what_it_has_without_repeats():
  # 1-digit addition has 100 questions, about 20 of them held out.
  held = ar.generate(["add-1d"], 500, split="heldout", seed=0)
  assert 5 < len(held) < 60
  assert len({p.question for p in held}) == len(held)


@pytest.mark.parametrize("band", BANDS + ("add-5d", "sub-4d", "mul-4d", "word-5s"))
def test_every_worked_solution_is_made_of_true_steps_and_ends_with_the_answer(band):
  for p in ar.generate([band], 30, split="train", seed=1):
    lines = p.cot.splitlines()
    assert lines[-1] == f"#### {p.answer}"
    assert ar.extract_final(p.cot) == p.answer == ar.extract_final(p.target("direct"))
    for line in lines[:-1]:
      if line.endswith(":"):            # a heading: which two partial products are added
        continue
      eq = re.sub(r" [cb]1$", "", line)
      lhs, rhs = eq.split("=")
      assert eval(lhs) == int(rhs), (p.question, line)  # noqa: S307 - digits and + - * only
    kind, n = ar.parse_band(band)
    numbers = [int(x) for x in re.findall(r"\d+", p.question)]
    if kind == "word":
      assert len(p.cot.splitlines()) == n + 1
    else:
      assert len(str(numbers[0])) == n or (n == 1 and numbers[0] < 10)
      assert eval(p.question[len("What is "):-1]) == p.answer  # noqa: S307


def test_column_addition_carries_and_subtraction_borrows():
  assert ar.column_add(347, 589) == ["7+9=16 c1", "4+8+1=13 c1", "3+5+1=9"]
  assert ar.column_add(95, 7) == ["5+7=12 c1", "9+0+1=10 c1"]
  assert ar.column_sub(402, 157) == ["12-7=5 b1", "10-5-1=4 b1", "4-1-1=2"]
  assert ar.multiply_steps(347, 89) == ["347*9=3123", "347*80=27760", "3123+27760:",
                                        "3+0=3", "2+6=8", "1+7=8", "3+7=10 c1", "0+2+1=3"]


@pytest.mark.parametrize("text,want", [
    ("#### 42", 42),
    ("step\n#### 42\n", 42),
    ("####42", 42),
    ("#### -7", -7),
    ("#### 1,234", 1234),                    # thousands separators
    ("#### $1,234.00 dollars", 1234),
    ("#### 42 apples, and 7 pears", 42),     # trailing text and several numbers after it
    ("3+4=7\n#### 12, 13", 12),              # several numbers: the first after the marker
    ("#### 5\nwait\n#### 6", 6),             # the last marker wins
    ("#### 12.5", None),                     # not an integer: never equals one
    ("#### 1,2345", None),                   # not a thousands separator, so no clean number
    ("####", None),
    ("#### lots", None),
    ("the answer is 42", None),              # no marker: no answer (strict)
    ("", None),
])
def test_verifier_on_messy_outputs(text, want):
  assert ar.extract_final(text) == want


def test_verifier_fallback_and_correctness():
  assert ar.extract_final("so 3 then 1,200 apples", fallback="last_number") == 1200
  assert ar.extract_final("no numbers", fallback="last_number") is None
  assert ar.is_correct("4+5=9\n#### 9", 9) and not ar.is_correct("4+5=9", 9)
  assert ar.is_correct("4+5=9", 9, fallback="last_number")
  with pytest.raises(ValueError, match="fallback"):
    ar.extract_final("1", fallback="first")


def test_reward_is_the_verifier_plus_an_optional_format_bonus():
  comps = ["1+1=2\n#### 2", "#### 3", "2", "#### 2 because"]
  refs = ["#### 2"] * 4
  np.testing.assert_array_equal(ar.reward([""] * 4, comps, refs), [1, 0, 0, 1])
  np.testing.assert_allclose(ar.reward([""] * 4, comps, refs, format_bonus=0.1),
                             [1.1, 0.1, 0, 1.0])
  np.testing.assert_array_equal(ar.reward(["", ""], ["#### 5", "#### 5"], [5, "x 6"]), [1, 0])
  with pytest.raises(ValueError, match="references"):
    ar.reward([""], ["#### 1"], [])


def _write(path, lines):
  path.write_text("".join(l + "\n" for l in lines))
  return str(path)


def test_gsm8k_reader_reads_the_published_format(tmp_path):
  path = _write(tmp_path / "gsm8k.jsonl", [
      json.dumps({"question": "Natalia sold 48 clips in April and half as many in May. How many?",
                  "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\n"
                            "In all 48+24 = <<48+24=72>>72.\n#### 72"}),
      "",
      json.dumps({"question": "What is 2 - 9?", "answer": "#### -7"}),
  ])
  probs = ar.read_gsm8k(path)
  assert [p.answer for p in probs] == [72, -7]
  assert probs[0].cot == "In May she sold 48/2 = 24 clips.\nIn all 48+24 = 72.\n#### 72"
  assert probs[1].cot == "#### -7" and probs[0].band == "gsm8k"
  # Checked with the same verifier as the embedded task.
  assert all(ar.is_correct(p.cot, p.answer) for p in probs)
  assert ar.reward([p.question for p in probs], [p.cot for p in probs],
                   [r["reference"] for r in ar.prompt_records(probs)]).tolist() == [1, 1]


@pytest.mark.parametrize("line,message", [
    ('{"answer": "#### 3"}', r"bad\.jsonl:2: field 'question' is missing"),
    ('{"question": "q", "answer": 3}', r"bad\.jsonl:2: field 'answer' is missing or not a string"),
    ('{"question": "q", "answer": "it is 3"}', r"bad\.jsonl:2: field 'answer' does not end with"),
    ('{"question": "q", "answer": "#### three"}', r"bad\.jsonl:2: field 'answer' ends with"),
    ('{"question": "q", "answer": "#### 2.5"}', r"bad\.jsonl:2: field 'answer' ends with"),
    ('{"question": "q", "answer": "#### 3 apples"}', r"bad\.jsonl:2: field 'answer' ends with"),
    ('{"question": "q"', r"bad\.jsonl:2: field '<line>' ends before its JSON object does"),
    ('{"question": q}', r"bad\.jsonl:2: field '<line>' is not valid JSON"),
])
def test_gsm8k_reader_names_file_line_and_field(tmp_path, line, message):
  path = _write(tmp_path / "bad.jsonl", ['{"question": "ok", "answer": "#### 1"}', line])
  with pytest.raises(DataError, match=message):
    ar.read_gsm8k(path)


def test_majority_vote_ties_and_missing_answers():
  assert ar.majority_vote([3, 5, 5, None, None, None]) == 5      # None is never a candidate
  assert ar.majority_vote([7, 3, 3, 7]) == 7                      # tie: the first sampled wins
  assert ar.majority_vote([3, 7, 7, 3]) == 3
  assert ar.majority_vote([None, None]) is None
  assert ar.majority_vote([]) is None


def test_vote_at_k_breaks_ties_at_random_over_draws():
  # Two answers, one sample each: a vote over both is a coin flip between them.
  accs = [ar.vote_at_k([1, 2], 1, 2, seed=s) for s in range(200)]
  assert 0.35 < np.mean(accs) < 0.65
  assert ar.vote_at_k([4, 4, 4, 9], 4, 4) == 1.0
  assert ar.vote_at_k([4, None, None, None], 4, 1, draws=400) == pytest.approx(0.25, abs=0.07)


def _brute_pass(n, c, k):
  samples = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(n, c, k) for n in (1, 4, 7, 10) for c in range(n + 1)
                                   for k in range(1, n + 1)])
def test_pass_at_k_matches_a_brute_force_count(n, c, k):
  assert ar.pass_at_k(n, c, k) == pytest.approx(_brute_pass(n, c, k), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
  assert ar.pass_at_k(1000, 1, 1) == pytest.approx(1e-3)
  assert ar.pass_at_k(1000, 10, 100) == pytest.approx(1 - math.comb(990, 100) / math.comb(1000, 100))
  with pytest.raises(ValueError):
    ar.pass_at_k(4, 5, 1)


def test_best_at_k_keeps_the_scorers_favourite():
  scores, correct = [0.1, 0.9, 0.5, 0.2], [False, True, False, False]
  assert ar.best_at_k(scores, correct, 4) == 1.0
  # k=1 is one random sample: accuracy 1/4 in expectation.
  assert ar.best_at_k(scores, correct, 1, draws=400) == pytest.approx(0.25, abs=0.07)
  # Brute force over every 2-subset: the favourite is correct whenever sample 1 is in it.
  assert ar.best_at_k(scores, correct, 2, draws=2000) == pytest.approx(0.5, abs=0.05)


def test_wilson_interval():
  lo, hi = ar.wilson_interval(50, 100)
  assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
  lo, hi = ar.wilson_interval(0, 20)
  assert lo == 0.0 and 0.1 < hi < 0.2


def test_data_source_records():
  probs = ar.generate(["add-2d"], 3, split="train", seed=0)
  from gptjax.data import chat
  for fmt in ar.FORMATS:
    recs = ar.sft_records(probs, fmt)
    msgs = chat.validate_messages(recs[0]["messages"])
    assert msgs[0] == {"role": "user", "content": probs[0].question}
    assert msgs[1]["content"] == probs[0].target(fmt)
  assert ar.sft_records(probs, "direct")[0]["messages"][1]["content"] == f"#### {probs[0].answer}"
  rec = ar.prompt_records(probs)[0]
  assert rec["reference"] == f"#### {probs[0].answer}" and rec["band"] == "add-2d"
  assert ar.from_jsonable(json.loads(json.dumps(ar.to_jsonable(probs[0])))) == probs[0]
  with pytest.raises(ValueError, match="format"):
    probs[0].target("long")
  with pytest.raises(ValueError, match="band"):
    ar.parse_band("div-2d")
