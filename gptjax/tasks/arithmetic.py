"""An embedded arithmetic task with one exact integer answer per problem, and its verifier.

    problems = generate(["add-2d", "mul-2d", "word-3s"], 100, split="train", seed=0)
    problems[0].question      'What is 47 + 85?'
    problems[0].cot           '7+5=12 c1\\n4+8+1=13 c1\\n#### 132'
    is_correct("... #### 132", problems[0].answer)  -> True

Bands say the kind and its difficulty knob: `add-Nd`, `sub-Nd`, `mul-Nd` (N-digit operands; the
multiplier of `mul` has min(N, 2) digits) and `word-Ns` (a word problem of N operations on numbers
below 100). Train and held-out problems are disjoint by construction: a question belongs to the
held-out split when a hash of its text says so, whatever the seed, so no seed or band choice can
leak a held-out question into training. A band beyond the training ones (more digits, more steps)
measures length generalisation.

Two target formats. `direct` is the final line alone, `#### N`. `cot` works the problem first:
column addition with carries (`c1`), column subtraction with borrows (`b1`), multiplication by
partial products that are then added column by column, one equation per word-problem step; then
`#### N`. Both end in the same marker, so one verifier reads both.

A third format, `tool`, is a conversation rather than a text (`messages(p, "tool")`): each step's
result comes from a calculator call in the chat template's tool turns (gptjax/tools.py), one call
per operation of the problem (`347*86`; a word problem's steps `6*14`, `84+23`, ...), then the
assistant's `#### N`. Its calls use only characters of the same problem's CoT, so adding it
changes no vocabulary.

The verifier (`extract_final`) reads the first integer after the last `####`; commas between
digit groups are thousands separators; anything after the number is ignored; no marker means no
answer unless a fallback is asked for. `read_gsm8k` reads GSM8K's published JSONL (`question`,
`answer` ending in `#### N`) into the same Problem type: the real-data path.

As a data source: `sft_records` (chat records for `chat_jsonl:`), `prompt_records` (for
`prompts_jsonl:`, the answer in `reference`) and `pretrain_text`. As a reward: `reward(prompts,
completions, references)` is 1 for a verified answer, else 0, plus an optional format bonus.
Sample-based metrics live here too: the unbiased pass@k, self-consistency and best-of-N at k over
n samples, and a Wilson interval for an accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random
import re
from typing import Iterable, Sequence

import numpy as np

from gptjax.data.errors import DataError

MARKER = "####"
KINDS = ("add", "sub", "mul", "word")
FORMATS = ("direct", "cot")                # text targets (pretraining text, the tokenizer)
SFT_FORMATS = FORMATS + ("tool",)          # `tool`: calculator calls in chat turns


@dataclasses.dataclass(frozen=True)
class Problem:
  question: str
  answer: int
  band: str                       # add-3d | sub-2d | mul-2d | word-3s | gsm8k
  cot: str                        # the worked solution, ending with the `#### N` line

  def target(self, fmt: str) -> str:
    if fmt == "direct":
      return final_line(self.answer)
    if fmt == "cot":
      return self.cot
    raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")


def final_line(answer: int) -> str:
  return f"{MARKER} {answer}"


# --------------------------------------------------------------------------------------------
# Bands: kind and difficulty.
# --------------------------------------------------------------------------------------------

_BAND = re.compile(r"(add|sub|mul)-([1-9])d|(word)-([1-9])s")


def parse_band(band: str) -> tuple[str, int]:
  """'add-3d' -> ('add', 3); 'word-2s' -> ('word', 2)."""
  m = _BAND.fullmatch(band)
  if m is None:
    raise ValueError(f"band {band!r}: expected add-Nd, sub-Nd, mul-Nd (N digits, 1-9) or "
                     "word-Ns (N steps, 1-9)")
  kind = m.group(1) or m.group(3)
  return kind, int(m.group(2) or m.group(4))


def band_difficulty(band: str) -> int:
  return parse_band(band)[1]


# --------------------------------------------------------------------------------------------
# Worked solutions.
# --------------------------------------------------------------------------------------------

def _digits(x: int) -> list[int]:
  """Least significant first."""
  return [int(c) for c in reversed(str(x))]


def column_add(a: int, b: int) -> list[str]:
  """One line per column, right to left: `7+9+1=17 c1` (the carry in, when there is one, and
  `c1` when one goes out)."""
  da, db = _digits(a), _digits(b)
  lines, carry = [], 0
  for i in range(max(len(da), len(db))):
    x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
    s = x + y + carry
    lines.append(f"{x}+{y}{'+1' if carry else ''}={s}" + (" c1" if s >= 10 else ""))
    carry = int(s >= 10)
  return lines


def column_sub(a: int, b: int) -> list[str]:
  """a >= b; one line per column of a, right to left. A column that must borrow shows the ten
  it borrows (`14-8-1=5 b1`), so every line is a true equation."""
  assert a >= b >= 0
  da, db = _digits(a), _digits(b)
  lines, borrow = [], 0
  for i in range(len(da)):
    x, y = da[i], (db[i] if i < len(db) else 0)
    out = int(x - y - borrow < 0)
    v = x + 10 * out - y - borrow
    lines.append(f"{x + 10 * out}-{y}{'-1' if borrow else ''}={v}" + (" b1" if out else ""))
    borrow = out
  return lines


def multiply_steps(a: int, b: int) -> list[str]:
  """Partial products of a by each digit of b (`347*80=27760`), then their running sum, column
  by column."""
  db = _digits(b)
  lines, partials = [], []
  for i, d in enumerate(db):
    p = a * d * 10 ** i
    lines.append(f"{a}*{d}{'0' * i}={p}")
    partials.append(p)
  total = partials[0]
  for p in partials[1:]:
    lines.append(f"{total}+{p}:")
    lines += column_add(total, p)
    total += p
  return lines


# --------------------------------------------------------------------------------------------
# Generators.
# --------------------------------------------------------------------------------------------

def _number(rng: random.Random, digits: int) -> int:
  """A number with exactly `digits` digits (1 digit: 0-9)."""
  if digits == 1:
    return rng.randint(0, 9)
  return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def _arithmetic(kind: str, digits: int, rng: random.Random) -> Problem:
  band = f"{kind}-{digits}d"
  a = _number(rng, digits)
  if kind == "add":
    b = _number(rng, digits)
    return Problem(f"What is {a} + {b}?", a + b, band,
                   "\n".join(column_add(a, b) + [final_line(a + b)]))
  if kind == "sub":
    b = _number(rng, digits)
    a, b = max(a, b), min(a, b)
    return Problem(f"What is {a} - {b}?", a - b, band,
                   "\n".join(column_sub(a, b) + [final_line(a - b)]))
  b = _number(rng, min(digits, 2))
  return Problem(f"What is {a} * {b}?", a * b, band,
                 "\n".join(multiply_steps(a, b) + [final_line(a * b)]))


_NAMES = ("Ann", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun")
_ITEMS = ("apples", "pens", "cards", "shells", "coins", "books", "stamps", "eggs")
_CONTAINERS = ("boxes", "bags", "crates", "jars")


def _word(steps: int, rng: random.Random) -> Problem:
  """`steps` operations in a story; a product can only open it, so values stay below ~10^4.

  "Ann has 6 bags of 14 shells. She gets 23 more. She gives away 9. How many shells does Ann
  have now?" -> 6*14=84, 84+23=107, 107-9=98."""
  name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
  lines = []
  if rng.random() < 0.5:
    a, b = rng.randint(2, 9), rng.randint(11, 49)
    value = a * b
    text = [f"{name} has {a} {rng.choice(_CONTAINERS)} of {b} {item}."]
    lines.append(f"{a}*{b}={value}")
    left = steps - 1
  else:
    value = rng.randint(11, 99)
    text = [f"{name} has {value} {item}."]
    left = steps
  for _ in range(left):
    if value > 10 and rng.random() < 0.5:
      b = rng.randint(1, min(value, 99))
      text.append(rng.choice((f"{name} gives away {b}.", f"{name} loses {b}.",
                              f"{name} sells {b}.")))
      lines.append(f"{value}-{b}={value - b}")
      value -= b
    else:
      b = rng.randint(2, 99)
      text.append(rng.choice((f"{name} gets {b} more.", f"{name} finds {b} more.",
                              f"{name} buys {b} more.")))
      lines.append(f"{value}+{b}={value + b}")
      value += b
  text.append(f"How many {item} does {name} have now?")
  return Problem(" ".join(text), value, f"word-{steps}s", "\n".join(lines + [final_line(value)]))


def make_problem(band: str, rng: random.Random) -> Problem:
  kind, n = parse_band(band)
  return _word(n, rng) if kind == "word" else _arithmetic(kind, n, rng)


def is_heldout(question: str, fraction: float) -> bool:
  """Whether a question belongs to the held-out split: a hash of its text, not of any seed."""
  h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big")
  return h % 10_000 < int(round(fraction * 10_000))


def generate(bands: Sequence[str], n_per_band: int, *, split: str, seed: int,
             heldout_fraction: float = 0.2, unique: bool = True,
             max_tries_per_problem: int = 200) -> list[Problem]:
  """`n_per_band` problems of each band for `split` ('train' or 'heldout'), bands interleaved.

  The same (bands, n, split, seed) always gives the same list. With `unique`, a question appears
  once per band; a band with fewer possible questions than asked (1-digit addition has 100)
  gives what it has, which is why the search stops after `max_tries_per_problem` × n draws.
  """
  if split not in ("train", "heldout"):
    raise ValueError(f"split: expected 'train' or 'heldout', got {split!r}")
  want_heldout = split == "heldout"
  per_band = []
  for band in bands:
    parse_band(band)
    # A string seed is hashed by `random` (SHA-512), so it is stable across runs and platforms.
    rng = random.Random(f"gptjax-arithmetic:{seed}:{band}:{split}")
    got, seen = [], set()
    for _ in range(max_tries_per_problem * n_per_band):
      if len(got) == n_per_band:
        break
      p = make_problem(band, rng)
      if is_heldout(p.question, heldout_fraction) != want_heldout:
        continue
      if unique and p.question in seen:
        continue
      seen.add(p.question)
      got.append(p)
    per_band.append(got)
  return [p for group in itertools.zip_longest(*per_band) for p in group if p is not None]


# --------------------------------------------------------------------------------------------
# The verifier.
# --------------------------------------------------------------------------------------------

# An integer with optional thousands separators (a comma followed by exactly three digits) and an
# optional decimal part; `$` may precede it.
_FINAL_NUMBER = re.compile(r"\s*\$?\s*([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?![\d,]*\d)")
_ANY_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def parse_integer(text: str) -> int | None:
  """'1,234' -> 1234, '-7' -> -7, '12.0' -> 12; '2.5' and non-numbers -> None."""
  t = text.replace(",", "")
  try:
    if "." in t:
      x = float(t)
      return int(x) if x.is_integer() else None
    return int(t)
  except ValueError:
    return None


def extract_final(text: str, *, marker: str = MARKER, fallback: str = "none") -> int | None:
  """The final answer of a completion: the first number after the last `marker`.

  `fallback` applies when there is no marker: 'none' (no answer: the format was not followed)
  or 'last_number' (the last number anywhere in the text).
  """
  at = text.rfind(marker)
  if at >= 0:
    m = _FINAL_NUMBER.match(text, at + len(marker))
    return parse_integer(m.group(1)) if m else None
  if fallback == "last_number":
    numbers = _ANY_NUMBER.findall(text)
    return parse_integer(numbers[-1]) if numbers else None
  if fallback != "none":
    raise ValueError(f"extract_final.fallback: expected 'none' or 'last_number', got {fallback!r}")
  return None


def is_correct(text: str, answer: int, **kw) -> bool:
  got = extract_final(text, **kw)
  return got is not None and got == int(answer)


def has_format(text: str) -> bool:
  """The completion ends with a `#### N` line and nothing after it."""
  lines = text.strip().splitlines()
  return bool(lines) and re.fullmatch(rf"{re.escape(MARKER)} [-+]?\d+", lines[-1].strip()) is not None


def reward(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str], *,
           format_bonus: float = 0.0) -> np.ndarray:
  """The verifiable reward [B]: 1 when the completion's final answer equals the reference's,
  plus `format_bonus` when the completion ends with a well-formed `#### N` line. A reference is
  a solution or answer text read by the same verifier (`#### 132`), or a bare integer."""
  del prompts
  if len(completions) != len(references):
    raise ValueError(f"reward: {len(completions)} completions but {len(references)} references")
  out = np.zeros(len(completions), np.float32)
  for i, (c, r) in enumerate(zip(completions, references)):
    want = reference_answer(r)
    out[i] = float(want is not None and is_correct(c, want))
    if format_bonus:
      out[i] += format_bonus * has_format(c)
  return out


def verifier_reward(prompts_path: str, *, format_bonus: float = 0.0):
  """`reward_fn(prompt_texts, completion_texts)` for the RL stages (`rl.reward='verifier:PATH'`):
  the reference of each prompt is looked up by its text in the prompts JSONL at `prompts_path`
  (the file the RL stage reads its prompts from), so the rollout code needs nothing new to
  carry answers. A prompt missing from the file is an error, never a silent zero."""
  from gptjax.data import records
  table = {}
  for lineno, obj in records.read_jsonl(prompts_path):
    prompt, ref = obj.get("prompt"), obj.get("reference")
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
      prompt = prompt[-1].get("content")
    if not isinstance(prompt, str):
      raise DataError(f"{prompts_path}:{lineno}: field 'prompt' expected a string or messages")
    if reference_answer(ref) is None:
      raise DataError(f"{prompts_path}:{lineno}: field 'reference' expected an answer such as "
                      f"'{MARKER} 12', got {ref!r}")
    if table.get(prompt, ref) != ref:
      raise DataError(f"{prompts_path}:{lineno}: field 'reference' differs from an earlier line "
                      "with the same prompt")
    table[prompt] = ref

  def fn(prompt_texts, completion_texts):
    missing = [p for p in prompt_texts if p not in table]
    if missing:
      raise ValueError(f"verifier reward: prompt {missing[0][:60]!r} is not in {prompts_path}")
    return reward(prompt_texts, completion_texts, [table[p] for p in prompt_texts],
                  format_bonus=format_bonus)
  return fn


def reference_answer(reference) -> int | None:
  if isinstance(reference, (int, np.integer)):
    return int(reference)
  return extract_final(str(reference), fallback="last_number")


# --------------------------------------------------------------------------------------------
# GSM8K's published format.
# --------------------------------------------------------------------------------------------

_CALCULATOR = re.compile(r"<<[^<>]*>>")


def read_gsm8k(path: str) -> list[Problem]:
  """Problems from a GSM8K-format JSONL file: {"question": str, "answer": "...\\n#### N"}.

  The solution's calculator annotations (`<<48/2=24>>`) are dropped from the CoT: they are a tool
  format, and the embedded task's chains have none. A bad line raises DataError naming
  `path:line` and the field.
  """
  from gptjax.data import records
  out = []
  for lineno, obj in records.read_jsonl(path):
    where = f"{path}:{lineno}"
    q, a = obj.get("question"), obj.get("answer")
    if not isinstance(q, str) or not q.strip():
      raise DataError(f"{where}: field 'question' is missing or not a non-empty string")
    if not isinstance(a, str):
      raise DataError(f"{where}: field 'answer' is missing or not a string; expected a "
                      f"solution ending with '{MARKER} N'")
    last = a.strip().splitlines()[-1].strip() if a.strip() else ""
    if not last.startswith(MARKER):
      raise DataError(f"{where}: field 'answer' does not end with a '{MARKER} N' line "
                      f"(its last line is {last[:40]!r})")
    value = extract_final(last)
    if value is None or _FINAL_NUMBER.fullmatch(last[len(MARKER):]) is None:
      raise DataError(f"{where}: field 'answer' ends with {last[:40]!r}; expected "
                      f"'{MARKER} N' with N an integer")
    steps = _CALCULATOR.sub("", a.strip().rsplit("\n", 1)[0]) if "\n" in a.strip() else ""
    cot = (steps.strip() + "\n" if steps.strip() else "") + final_line(value)
    out.append(Problem(q.strip(), value, "gsm8k", cot))
  if not out:
    raise DataError(f"{path}: no problems (the file is empty)")
  return out


# --------------------------------------------------------------------------------------------
# As a data source.
# --------------------------------------------------------------------------------------------

_QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")
_STEP = re.compile(r"(\d+)([-+*])(\d+)=(\d+)")


def tool_steps(problem: Problem) -> list[tuple[str, int]]:
  """(calculator expression, value) of each operation of a problem: the question's one
  operation for add/sub/mul, each line of a word problem's chain. A problem with no steps known
  (GSM8K's, whose calculator annotations are dropped) has none."""
  kind = problem.band.split("-")[0]
  if kind in ("add", "sub", "mul"):
    m = _QUESTION.fullmatch(problem.question)
    if m:
      return [(f"{m.group(1)}{m.group(2)}{m.group(3)}", problem.answer)]
  if kind == "word":
    steps = [_STEP.fullmatch(line) for line in problem.cot.splitlines()[:-1]]
    if steps and all(steps):
      return [(f"{m.group(1)}{m.group(2)}{m.group(3)}", int(m.group(4))) for m in steps]
  return []


def tool_messages(problem: Problem) -> list[dict]:
  """The assistant's side of the `tool` format: a call per step, the calculator's answer in a
  tool turn after it, then the final line. A problem without known steps (`tool_steps`) answers
  with its CoT, so every problem has a target."""
  steps = tool_steps(problem)
  if not steps:
    return [{"role": "assistant", "content": problem.cot}]
  out = []
  for expression, value in steps:
    out += [{"role": "assistant", "content": "", "tool_call": expression},
            {"role": "tool", "content": str(value)}]
  return out + [{"role": "assistant", "content": final_line(problem.answer)}]


def messages(problem: Problem, fmt: str | None = None) -> list[dict]:
  """The chat of one problem: the question as the user's turn, then (with `fmt`) the answer."""
  m = [{"role": "user", "content": problem.question}]
  if fmt == "tool":
    return m + tool_messages(problem)
  if fmt is not None:
    m.append({"role": "assistant", "content": problem.target(fmt)})
  return m


def sft_records(problems: Iterable[Problem], fmt: str) -> list[dict]:
  """Chat records for the SFT stage's `chat_jsonl:` source."""
  return [{"messages": messages(p, fmt)} for p in problems]


def prompt_records(problems: Iterable[Problem]) -> list[dict]:
  """Prompt records for `prompts_jsonl:` (RL): the question, and the answer line as reference,
  plus the band so results can be broken down by difficulty."""
  return [{"prompt": p.question, "reference": final_line(p.answer), "band": p.band}
          for p in problems]


def pretrain_text(problem: Problem, fmt: str) -> str:
  """One problem as a plain document, for pretraining on the task's text."""
  return f"Question: {problem.question}\nAnswer:\n{problem.target(fmt)}\n"


def write_jsonl(path: str, rows: Iterable[dict]) -> int:
  n = 0
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
      n += 1
  return n


def to_jsonable(problem: Problem) -> dict:
  return dataclasses.asdict(problem)


def from_jsonable(d: dict) -> Problem:
  return Problem(d["question"], int(d["answer"]), d["band"], d["cot"])


# --------------------------------------------------------------------------------------------
# Metrics over sampled answers.
# --------------------------------------------------------------------------------------------

def majority_vote(answers: Sequence[int | None]) -> int | None:
  """The most common answer among those found (None = no answer, never voted for); a tie goes to
  the tied answer sampled first, so a vote over samples in random order breaks ties at random."""
  counts: dict = {}
  first: dict = {}
  for i, a in enumerate(answers):
    if a is None:
      continue
    counts[a] = counts.get(a, 0) + 1
    first.setdefault(a, i)
  if not counts:
    return None
  return max(counts, key=lambda a: (counts[a], -first[a]))


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k (Chen et al. 2021): the chance that k of n samples, drawn without
  replacement, hold at least one of the c correct ones: 1 - C(n-c, k) / C(n, k)."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
  if n - c < k:
    return 1.0
  # The ratio as a product, which stays exact in floating point where the binomials overflow.
  return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def subset_rows(n: int, k: int, draws: int, seed: int) -> np.ndarray:
  """[draws, k] random k-subsets of range(n), each in random order (a fixed function of seed)."""
  rng = np.random.default_rng([seed, n, k])
  return np.stack([rng.permutation(n)[:k] for _ in range(draws)])


def vote_at_k(answers: Sequence[int | None], answer: int, k: int, *, draws: int = 16,
              seed: int = 0) -> float:
  """Self-consistency accuracy with k of the n sampled answers, averaged over `draws` random
  k-subsets (all n at k = n: one vote)."""
  n = len(answers)
  rows = subset_rows(n, k, 1 if k == n else draws, seed)
  return float(np.mean([majority_vote([answers[i] for i in r]) == answer for r in rows]))


def best_at_k(scores: Sequence[float], correct: Sequence[bool], k: int, *, draws: int = 16,
              seed: int = 0) -> float:
  """Best-of-k accuracy: among k of the n samples, the one the scorer rates highest (the first
  drawn on ties) is kept; averaged over `draws` random k-subsets."""
  n = len(scores)
  rows = subset_rows(n, k, 1 if k == n else draws, seed)
  s, c = np.asarray(scores, np.float64), np.asarray(correct, bool)
  return float(np.mean([c[r[np.argmax(s[r])]] for r in rows]))


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
  """The 95% Wilson score interval of a proportion (sound near 0 and 1, unlike p ± 1.96·se)."""
  if n == 0:
    return 0.0, 1.0
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return max(0.0, centre - half), min(1.0, centre + half)
