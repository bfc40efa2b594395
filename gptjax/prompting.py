"""Prompting strategies as small library functions over a text generator.

Every strategy takes a `generate_text` callable,

    generate_text(prompts: list[str], n: int, **controls) -> list[list[str]]   # n completions each

so it runs on a real model (`make_text_generator(model, params, tokenizer)`), on a remote API, or
on a scripted fake in a test. Strategies compose: a few-shot prompt can feed chain-of-thought,
whose answers feed self-consistency, with retrieved passages prepended.

    few_shot_prompt          examples rendered before the query
    cot_prompt, extract_answer, chain_of_thought
    self_consistency         N samples, majority vote over extracted answers, with the distribution
    best_of_n                N samples reranked by any scorer (the reward model plugs in here)
    check_and_retry          generate, check (a function or the model itself), retry up to R times
    generate_with_tools      <|tool_call|>name(arg) in the output runs a Python tool; its
                             <|tool_result|> is appended and generation continues
    BM25, retrieval_prompt   a sparse BM25 retriever that prepends the top-k passages

What does not live here: the sampler itself (`sampling.py`) and the chat template (`data/chat.py`).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Callable, Sequence

import numpy as np

GenerateText = Callable[..., list]
Scorer = Callable[[str, list], Sequence[float]]

TOOL_CALL = "<|tool_call|>"
TOOL_RESULT = "<|tool_result|>"


# --------------------------------------------------------------------------------------------
# A text generator over (model, params, tokenizer).
# --------------------------------------------------------------------------------------------

def encode_with_specials(tok, text: str) -> list[int]:
  """Encodes text in which special tokens are written by name ("<|tool_result|>"), mapping those
  names to their ids. `tok.encode` alone never produces special ids from text, by design; the
  strategies here write markers into prompts, so they need this explicit path."""
  names = sorted(getattr(tok, "special_ids", {}), key=len, reverse=True)
  if not names:
    return list(tok.encode(text))
  ids = []
  for piece in re.split("(" + "|".join(re.escape(n) for n in names) + ")", text):
    if piece in tok.special_ids:
      ids.append(tok.special_ids[piece])
    elif piece:
      ids.extend(tok.encode(piece))
  return ids


def make_text_generator(model, params, tokenizer, *, seed: int = 0, max_new_tokens: int = 128,
                        add_bos: bool = True, prompt_bucket: int = 32, **defaults) -> GenerateText:
  """A `generate_text` over a model. Controls are `sampling.generate`'s, plus `stop`: strings
  that end a completion (tokenized as stop sequences, and cut from the returned text).

  Each call draws a fresh key from `seed` and a call counter, so a sequence of calls is
  reproducible and no two calls repeat each other. Prompts are padded up to a multiple of
  `prompt_bucket` tokens so a few compiled programs serve any prompt lengths; a prompt longer than
  the model's window keeps its last tokens.
  """
  import jax
  from gptjax import sampling

  cfg = model.cfg.resolved()
  calls = [0]
  eos = tuple(i for i in (tokenizer.eos_id, tokenizer.special_ids.get("<|end|>")) if i is not None)

  def generate_text(prompts: list[str], n: int = 1, **controls) -> list[list[str]]:
    kw = dict(defaults, **controls)
    new = int(kw.pop("max_new_tokens", max_new_tokens))
    stop_strings = tuple(kw.pop("stop", ()))
    kw.setdefault("eos_ids", eos)
    kw.setdefault("pad_id", tokenizer.pad_id)
    kw["stop_sequences"] = tuple(kw.get("stop_sequences", ())) + tuple(
        tuple(encode_with_specials(tokenizer, s)) for s in stop_strings if s)
    room = cfg.max_len - new
    if room <= 0:
      raise ValueError(f"max_new_tokens={new} leaves no room for a prompt in max_len={cfg.max_len}")
    rows = []
    for p in prompts:
      bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
      ids = bos + encode_with_specials(tokenizer, p)
      rows.extend([ids[-room:]] * n)
    width = min(room, -(-max(len(r) for r in rows) // prompt_bucket) * prompt_bucket)
    batch = np.full((len(rows), width), tokenizer.pad_id, np.int32)
    for i, r in enumerate(rows):
      batch[i, :len(r)] = r
    lengths = np.asarray([len(r) for r in rows], np.int32)
    key = jax.random.fold_in(jax.random.key(seed), calls[0])
    calls[0] += 1
    out = jax.device_get(sampling.generate(model, params, batch, lengths, rng=key,
                                           max_new_tokens=new, **kw))
    texts = []
    for row, length in zip(out.completion, out.lengths):
      ids = [int(t) for t in row[:length] if int(t) not in kw["eos_ids"]]
      texts.append(truncate_at_stop(tokenizer.decode(ids), stop_strings))
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

  return generate_text


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
  """Cuts text at the earliest stop string (the stop string itself is dropped)."""
  cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
  return text[:cut]


# --------------------------------------------------------------------------------------------
# Few-shot and chain of thought.
# --------------------------------------------------------------------------------------------

def few_shot_prompt(examples: Sequence[tuple[str, str]], query: str, *, instruction: str = "",
                    template: str = "Q: {input}\nA: {output}", separator: str = "\n\n") -> str:
  """Instruction, then each (input, output) example through `template`, then the query with an
  empty output, so the model continues right where an answer starts."""
  parts = [instruction] if instruction else []
  parts += [template.format(input=x, output=y) for x, y in examples]
  open_query = template.format(input=query, output="").rstrip(" ")
  return separator.join(parts + [open_query])


COT_TRIGGER = "Let's think step by step."
ANSWER_PATTERN = r"(?:answer is|Answer:)\s*\$?([-+]?[\d,]*\.?\d+|[^\n.]+)"
_NUMBER = re.compile(r"[-+]?\d[\d,]*\.?\d*|[-+]?\.\d+")


def cot_prompt(question: str, *, trigger: str = COT_TRIGGER,
               examples: Sequence[tuple[str, str]] = (), template: str = "Q: {input}\nA: {output}",
               separator: str = "\n\n") -> str:
  """A chain-of-thought prompt: worked examples (their outputs hold the reasoning and end with
  "The answer is X."), then the question, with the trigger phrase opening the answer (zero-shot
  CoT, Kojima et al. 2022, when there are no examples)."""
  prompt = few_shot_prompt(examples, question, template=template, separator=separator)
  return f"{prompt} {trigger}" if trigger else prompt


def normalize_answer(answer: str | None) -> str | None:
  """Canonical form for voting: trimmed, lower case, no trailing period; numbers without
  thousands separators and without a trailing .0 ("1,000.0" == "1000")."""
  if answer is None:
    return None
  a = answer.strip().rstrip(".").strip().lower()
  if _NUMBER.fullmatch(a):
    a = a.replace(",", "")
    try:
      x = float(a)
      a = str(int(x)) if x == int(x) else repr(x)
    except (ValueError, OverflowError):
      pass
  return a or None


def extract_answer(text: str, *, pattern: str | None = ANSWER_PATTERN,
                   fallback: str = "last_number") -> str | None:
  """The answer in a completion: the last match of `pattern` (its first group, or the whole match),
  else by `fallback`: "last_number" (the last number in the text), "last_line", or "none"."""
  if pattern:
    matches = list(re.finditer(pattern, text, flags=re.IGNORECASE))
    if matches:
      m = matches[-1]
      return (m.group(1) if m.groups() else m.group(0)).strip()
  if fallback == "last_number":
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None
  if fallback == "last_line":
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None
  if fallback == "none":
    return None
  raise ValueError(f"extract_answer.fallback: expected last_number, last_line or none, "
                   f"got {fallback!r}")


@dataclasses.dataclass
class Reasoned:
  reasoning: str
  answer: str | None


def chain_of_thought(generate_text: GenerateText, questions: Sequence[str], *,
                     trigger: str = COT_TRIGGER, examples: Sequence[tuple[str, str]] = (),
                     pattern: str | None = ANSWER_PATTERN, fallback: str = "last_number",
                     **controls) -> list[Reasoned]:
  """One reasoning chain per question, with its extracted answer."""
  prompts = [cot_prompt(q, trigger=trigger, examples=examples) for q in questions]
  outs = generate_text(prompts, 1, **controls)
  return [Reasoned(o[0], extract_answer(o[0], pattern=pattern, fallback=fallback)) for o in outs]


# --------------------------------------------------------------------------------------------
# Sampling several answers: self-consistency and best-of-N.
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Vote:
  answer: str | None              # the majority answer (normalised); None when nothing was found
  distribution: dict              # answer -> fraction of the samples that gave an answer
  counts: dict                    # answer -> count
  samples: list                   # the raw completions
  answers: list                   # the answer extracted from each sample (None when missing)


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, dict]:
  """Most common non-missing answer; ties go to the answer seen first. Returns (answer, counts)."""
  counts = collections.Counter(a for a in answers if a is not None)
  if not counts:
    return None, {}
  order = {a: i for i, a in reversed(list(enumerate(answers)))}
  best = max(counts, key=lambda a: (counts[a], -order[a]))
  return best, dict(counts)


def self_consistency(generate_text: GenerateText, prompts: Sequence[str], *, n: int = 8,
                     extract: Callable[[str], str | None] = extract_answer,
                     normalize: Callable[[str | None], str | None] = normalize_answer,
                     **controls) -> list[Vote]:
  """Samples n reasoning chains per prompt and votes over their extracted answers (Wang et al.
  2022). Sample at temperature > 0; n greedy chains would all agree."""
  outs = generate_text(list(prompts), n, **controls)
  votes = []
  for samples in outs:
    answers = [normalize(extract(s)) for s in samples]
    best, counts = majority_vote(answers)
    total = sum(counts.values())
    votes.append(Vote(answer=best, counts=counts,
                      distribution={a: c / total for a, c in counts.items()},
                      samples=list(samples), answers=answers))
  return votes


@dataclasses.dataclass
class Ranked:
  best: str
  scores: list
  completions: list               # in sampling order, aligned with scores


def best_of_n(generate_text: GenerateText, prompts: Sequence[str], *, n: int, scorer: Scorer,
              **controls) -> list[Ranked]:
  """Samples n completions per prompt and keeps the one `scorer(prompt, completions)` rates
  highest (first one on ties). A reward model plugs in as the scorer."""
  outs = generate_text(list(prompts), n, **controls)
  ranked = []
  for prompt, completions in zip(prompts, outs):
    scores = [float(s) for s in scorer(prompt, list(completions))]
    if len(scores) != len(completions):
      raise ValueError(f"best_of_n.scorer returned {len(scores)} scores for "
                       f"{len(completions)} completions")
    ranked.append(Ranked(completions[int(np.argmax(scores))], scores, list(completions)))
  return ranked


# --------------------------------------------------------------------------------------------
# Check and retry.
# --------------------------------------------------------------------------------------------

CHECK_TEMPLATE = ("{prompt}{completion}\n\nIs the answer above correct? Reply yes or no.\n"
                  "Reply:")


def model_checker(generate_text: GenerateText, *, template: str = CHECK_TEMPLATE,
                  accept: str = r"^\s*yes\b", **controls) -> Callable[[str, str], bool]:
  """A checker that asks the model itself (or any generator) to judge a completion; the verdict
  passes when it matches `accept`. Greedy by default, so a verdict is repeatable."""
  controls = {"temperature": 0.0, "max_new_tokens": 8, **controls}

  def check(prompt: str, completion: str) -> bool:
    verdict = generate_text([template.format(prompt=prompt, completion=completion)], 1,
                            **controls)[0][0]
    return re.search(accept, verdict, flags=re.IGNORECASE) is not None

  return check


@dataclasses.dataclass
class Checked:
  completion: str                 # the first accepted completion, else the last one tried
  ok: bool
  tries: int
  history: list                   # every (completion, ok) in order


def check_and_retry(generate_text: GenerateText, prompt: str, *,
                    check: Callable[[str, str], bool], max_tries: int = 3,
                    feedback: str | None = None, **controls) -> Checked:
  """Generates, checks, and regenerates on failure, up to `max_tries` generations. With
  `feedback` (a format string with {completion}), each retry's prompt also shows the rejected
  attempt, e.g. "\\nA previous attempt was wrong: {completion}\\nTry again:"."""
  history = []
  current = prompt
  for _ in range(max_tries):
    completion = generate_text([current], 1, **controls)[0][0]
    ok = bool(check(prompt, completion))
    history.append((completion, ok))
    if ok:
      break
    if feedback:
      current = prompt + feedback.format(completion=completion)
  completion, ok = history[-1]
  return Checked(completion=completion, ok=ok, tries=len(history), history=history)


# --------------------------------------------------------------------------------------------
# Tools.
# --------------------------------------------------------------------------------------------

_TOOL_NAME = re.compile(re.escape(TOOL_CALL) + r"\s*(\w+)\(")


def parse_tool_call(text: str) -> tuple[str, str, int] | None:
  """The first `<|tool_call|>name(argument)` in text, as (name, argument, end index), matching
  parentheses so an argument may hold its own ("calculator(2*(3+4))"); None when there is no
  complete call."""
  m = _TOOL_NAME.search(text)
  if m is None:
    return None
  depth = 1
  for i in range(m.end(), len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return m.group(1), text[m.end():i], i + 1
  return None


@dataclasses.dataclass
class ToolTranscript:
  text: str                       # the whole completion: calls, results and the final answer
  calls: list                     # (tool name, argument, result) in order


def generate_with_tools(generate_text: GenerateText, prompt: str, *,
                        tools: dict[str, Callable[[str], Any]], max_calls: int = 4,
                        parse_call: Callable[[str], tuple | None] = parse_tool_call,
                        result_marker: str = TOOL_RESULT, result_end: str = "\n",
                        **controls) -> ToolTranscript:
  """Generates; when the output holds a tool call (`<|tool_call|>name(argument)` by default), the
  text after the call is dropped, the tool runs on the argument string, and
  `<|tool_result|>{result}` is appended before generation continues from there. Stops when an
  output has no call or after `max_calls` calls. `parse_call(text) -> (name, argument, end)`
  swaps in another call syntax. An unknown tool or a tool that raises yields an
  error message as its result, so the model can see what went wrong."""
  text, calls = "", []
  for _ in range(max_calls + 1):
    out = generate_text([prompt + text], 1, **controls)[0][0]
    call = parse_call(out)
    if call is None or len(calls) >= max_calls:
      return ToolTranscript(text + out, calls)
    name, arg, end = call
    if name not in tools:
      result = f"error: unknown tool {name!r}; tools: {', '.join(sorted(tools))}"
    else:
      try:
        result = tools[name](arg)
      except Exception as e:                        # the model should see the failure, not crash
        result = f"error: {type(e).__name__}: {e}"
    calls.append((name, arg, str(result)))
    text += out[:end] + result_marker + str(result) + result_end
  return ToolTranscript(text, calls)


def calculator(expression: str) -> str:
  """A safe arithmetic tool: + - * / // % ** and parentheses over numbers, nothing else."""
  import ast
  import operator
  ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
         ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
         ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}

  def ev(node):
    if isinstance(node, ast.Expression):
      return ev(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
      return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in ops:
      if isinstance(node.op, ast.Pow) and abs(ev(node.right)) > 64:
        raise ValueError("exponent too large")
      return ops[type(node.op)](ev(node.left), ev(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in ops:
      return ops[type(node.op)](ev(node.operand))
    raise ValueError(f"unsupported expression: {ast.dump(node)[:40]}")

  value = ev(ast.parse(expression.strip(), mode="eval"))
  return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


# --------------------------------------------------------------------------------------------
# Retrieval.
# --------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+")


def word_tokens(text: str) -> list[str]:
  return _WORD.findall(text.lower())


class BM25:
  """Okapi BM25 over a fixed list of passages (Robertson & Zaragoza 2009), with scipy sparse
  matrices, so a corpus of a hundred thousand passages indexes in seconds and memory in
  proportion to its words (a dense passages × vocabulary table of the plays would take GBs).

  score(q, d) = Σ_{t∈q} idf(t) · tf(t,d)·(k1+1) / (tf(t,d) + k1·(1 − b + b·|d|/avgdl)),
  idf(t) = ln(1 + (N − df(t) + 0.5) / (df(t) + 0.5)), the always-positive variant (as in Lucene).
  """

  def __init__(self, passages: Sequence[str], *, k1: float = 1.5, b: float = 0.75,
               tokenize: Callable[[str], list[str]] = word_tokens):
    import scipy.sparse

    if not passages:
      raise ValueError("BM25.passages: need at least one passage")
    self.passages = list(passages)
    self.k1, self.b, self.tokenize = k1, b, tokenize
    self.vocab: dict[str, int] = {}
    rows, cols = [], []
    for i, p in enumerate(self.passages):
      for w in tokenize(p):
        rows.append(i)
        cols.append(self.vocab.setdefault(w, len(self.vocab)))
    n = len(self.passages)
    shape = (n, max(len(self.vocab), 1))
    # COO -> CSR sums repeated (passage, word) entries: the term frequencies.
    tf = scipy.sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)
    df = np.diff(tf.tocsc().indptr)
    self.idf = np.log(1.0 + (n - df + 0.5) / (df + 0.5)).astype(np.float32)
    lengths = np.asarray(tf.sum(1)).ravel()
    norm = k1 * (1.0 - b + b * lengths / max(float(lengths.mean()), 1e-9))
    row_of = np.repeat(np.arange(n), np.diff(tf.indptr))
    f = tf.data
    w = self.idf[tf.indices] * f * (k1 + 1.0) / (f + norm[row_of])
    # Term weights are fixed per passage, so scoring a query is a sum over its words' columns
    # (column slices are cheap in CSC).
    self.weights = scipy.sparse.csr_matrix((w.astype(np.float32), tf.indices, tf.indptr),
                                           shape=shape).tocsc()

  def scores(self, query: str) -> np.ndarray:
    """BM25 score of every passage for the query [num_passages]; repeated query words count
    again, as in the formula's sum over query terms."""
    cols = [self.vocab[w] for w in self.tokenize(query) if w in self.vocab]
    if not cols:
      return np.zeros(len(self.passages), np.float32)
    return np.asarray(self.weights[:, cols].sum(1), np.float32).ravel()

  def top_k(self, query: str, k: int = 3) -> list[tuple[int, float]]:
    """The k best (passage index, score), best first; ties keep passage order; zero scores drop."""
    s = self.scores(query)
    if k < len(s):
      # Only the passages at or above the k-th best score are sorted (a corpus-wide sort per
      # query would dominate retrieval over many passages).
      kth = np.partition(s, len(s) - k)[len(s) - k]
      idx = np.flatnonzero(s >= kth)
    else:
      idx = np.arange(len(s))
    order = idx[np.argsort(-s[idx], kind="stable")][:k]
    return [(int(i), float(s[i])) for i in order if s[i] > 0]


RETRIEVAL_TEMPLATE = "{passages}\n\n{prompt}"


def retrieval_prompt(retriever: BM25, prompt: str, *, k: int = 3, query: str | None = None,
                     template: str = RETRIEVAL_TEMPLATE,
                     passage_template: str = "[{rank}] {passage}") -> str:
  """Prepends the top-k passages for `query` (the prompt itself by default) to the prompt."""
  hits = retriever.top_k(prompt if query is None else query, k)
  if not hits:
    return prompt
  passages = "\n".join(passage_template.format(rank=r + 1, passage=retriever.passages[i])
                       for r, (i, _) in enumerate(hits))
  return template.format(passages=passages, prompt=prompt)


def generate_with_retrieval(generate_text: GenerateText, retriever: BM25, prompts: Sequence[str],
                            *, n: int = 1, k: int = 3, **controls) -> list[list[str]]:
  """`generate_text` with each prompt first augmented by its top-k passages."""
  return generate_text([retrieval_prompt(retriever, p, k=k) for p in prompts], n, **controls)
