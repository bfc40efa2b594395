"""Prompting strategies against scripted generators (no model), plus one run of the real text
generator on a tiny random model with a character tokenizer."""

import itertools

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from gptjax import prompting
from gptjax.data.tokenizers import CharTokenizer


def scripted(replies):
  """A generate_text that returns the given replies in order, and records the prompts it saw.
  `replies` is a list of strings or a function prompt -> string."""
  seen = []
  it = iter(replies) if not callable(replies) else None

  def generate_text(prompts, n=1, **controls):
    out = []
    for p in prompts:
      seen.append((p, controls))
      out.append([replies(p) if it is None else next(it) for _ in range(n)])
    return out

  generate_text.seen = seen
  return generate_text


def test_few_shot_prompt_layout():
  p = prompting.few_shot_prompt([("2+2", "4"), ("3+3", "6")], "5+5", instruction="Add.")
  assert p == "Add.\n\nQ: 2+2\nA: 4\n\nQ: 3+3\nA: 6\n\nQ: 5+5\nA:"


@pytest.mark.parametrize("text,answer", [
    ("3 apples plus 4 is 7. The answer is 7.", "7"),
    ("so... Answer: 1,250", "1,250"),
    ("first 3, then 5, finally 12", "12"),          # fallback: last number
    ("no digits at all", None),
    ("The answer is Paris.", "Paris"),
])
def test_extract_answer(text, answer):
  assert prompting.extract_answer(text) == answer


def test_extract_answer_custom_pattern_and_fallbacks():
  assert prompting.extract_answer("#### 42\nmore", pattern=r"####\s*(\d+)") == "42"
  assert prompting.extract_answer("a\nlast line\n", pattern=None, fallback="last_line") == \
      "last line"
  with pytest.raises(ValueError, match="fallback"):
    prompting.extract_answer("x", pattern=None, fallback="bogus")


def test_chain_of_thought_uses_trigger_and_extracts():
  gen = scripted(["Two and two make four. The answer is 4."])
  [r] = prompting.chain_of_thought(gen, ["What is 2+2?"], temperature=0.0)
  assert r.answer == "4"
  prompt, controls = gen.seen[0]
  assert prompt.endswith("A: Let's think step by step.") and controls == {"temperature": 0.0}


def test_self_consistency_vote_and_distribution():
  gen = scripted(["... the answer is 12.", "the answer is 12", "answer is 1,2", "the answer is 7",
                  "no idea", "The answer is 12.0", "the answer is 7.", "the answer is 1,000",
                  "The answer is 1000"])
  [v1] = prompting.self_consistency(gen, ["q1"], n=5, temperature=0.8)
  assert v1.answers == ["12", "12", "12", "7", None]   # "1,2" normalises to 12
  assert v1.answer == "12" and v1.counts == {"12": 3, "7": 1}
  assert v1.distribution == {"12": 0.75, "7": 0.25}
  [v2] = prompting.self_consistency(gen, ["q2"], n=4)
  # 12.0 == 12, and 1,000 == 1000; the tie (12 once, 7 once, 1000 twice) goes to the count.
  assert v2.answer == "1000" and v2.counts == {"12": 1, "7": 1, "1000": 2}


def test_majority_vote_tie_goes_to_first_seen():
  assert prompting.majority_vote(["b", "a", "a", "b", None]) == ("b", {"a": 2, "b": 2})
  assert prompting.majority_vote([None, None]) == (None, {})


def test_best_of_n_takes_the_best_score():
  gen = scripted(["short", "a much longer reply", "mid reply"])
  [r] = prompting.best_of_n(gen, ["p"], n=3, scorer=lambda p, cs: [len(c) for c in cs])
  assert r.best == "a much longer reply" and r.scores == [5.0, 19.0, 9.0]
  with pytest.raises(ValueError, match="scorer"):
    prompting.best_of_n(scripted(["x", "y"]), ["p"], n=2, scorer=lambda p, cs: [1.0])


def test_check_and_retry_stops_at_first_pass_and_feeds_back():
  gen = scripted(["41", "43", "42", "99"])
  r = prompting.check_and_retry(gen, "6*7=", check=lambda p, c: c == "42", max_tries=5,
                                feedback="\nWrong: {completion}\n")
  assert r.ok and r.completion == "42" and r.tries == 3
  assert [p for p, _ in gen.seen] == ["6*7=", "6*7=\nWrong: 41\n", "6*7=\nWrong: 43\n"]
  r = prompting.check_and_retry(scripted(["1", "2"]), "q", check=lambda p, c: False, max_tries=2)
  assert not r.ok and r.tries == 2 and r.completion == "2"


def test_model_checker_reads_a_yes():
  judge = scripted(lambda p: " Yes, it is." if "42" in p else " no")
  check = prompting.model_checker(judge)
  assert check("6*7=", "42") and not check("6*7=", "41")
  assert judge.seen[0][1]["temperature"] == 0.0


def test_tools_run_and_results_are_appended():
  def reply(prompt):
    if "<|tool_result|>" not in prompt:
      return "Let me compute. <|tool_call|>calculator(12*(3+4)) and then I hallucinate"
    return " So it is 84."
  gen = scripted(reply)
  t = prompting.generate_with_tools(gen, "Q: 12*7?\nA:", tools={"calculator": prompting.calculator})
  assert t.calls == [("calculator", "12*(3+4)", "84")]
  assert t.text == ("Let me compute. <|tool_call|>calculator(12*(3+4))<|tool_result|>84\n"
                    " So it is 84.")
  assert gen.seen[1][0] == "Q: 12*7?\nA:" + t.text[:-len(" So it is 84.")]


def test_tools_unknown_tool_errors_and_call_limit():
  gen = scripted(lambda p: "<|tool_call|>search(cats)")
  t = prompting.generate_with_tools(gen, "q", tools={"calculator": prompting.calculator},
                                    max_calls=2)
  assert len(t.calls) == 2 and t.calls[0][2].startswith("error: unknown tool 'search'")
  assert t.text.endswith("<|tool_call|>search(cats)")
  assert prompting.calculator("2**10 - 24 / 4") == "1018"
  with pytest.raises(ValueError):
    prompting.calculator("__import__('os')")


def test_bm25_against_hand_computed_scores():
  passages = ["the cat sat on the mat", "dogs chase cats", "the dog sat", "quantum physics"]
  bm = prompting.BM25(passages, k1=1.2, b=0.75)
  docs = [p.split() for p in passages]
  avgdl = np.mean([len(d) for d in docs])

  def ref(query, d):
    s = 0.0
    for t in query.split():
      df = sum(t in x for x in docs)
      idf = np.log(1 + (4 - df + 0.5) / (df + 0.5))
      tf = d.count(t)
      s += idf * tf * 2.2 / (tf + 1.2 * (1 - 0.75 + 0.75 * len(d) / avgdl))
    return s

  for q in ["the cat sat", "dog", "physics cat", "unseen words"]:
    np.testing.assert_allclose(bm.scores(q), [ref(q, d) for d in docs], rtol=1e-5, atol=1e-6)
  assert [i for i, _ in bm.top_k("the dog sat", 2)] == [2, 0]
  assert bm.top_k("unseen", 3) == []


def test_retrieval_prompt_prepends_top_passages():
  bm = prompting.BM25(["Paris is the capital of France.", "Berlin is in Germany.",
                       "The Seine flows through Paris."])
  p = prompting.retrieval_prompt(bm, "Which river flows through Paris?", k=2)
  assert p == ("[1] The Seine flows through Paris.\n[2] Paris is the capital of France.\n\n"
               "Which river flows through Paris?")
  gen = scripted(lambda prompt: "Paris")
  assert prompting.generate_with_retrieval(gen, bm, ["capital of France?"], n=2, k=1) == \
      [["Paris", "Paris"]]
  assert gen.seen[0][0].startswith("[1] Paris is the capital")


def test_strategies_compose():
  """Retrieval + few-shot + CoT prompt, then self-consistency over a scripted model."""
  bm = prompting.BM25(["Each box holds 6 eggs."])
  q = "How many eggs are in 2 boxes?"
  prompt = prompting.retrieval_prompt(
      bm, prompting.cot_prompt(q, examples=[("1 box?", "One box holds 6. The answer is 6.")]),
      query=q)
  replies = itertools.cycle(["6+6. The answer is 12.", "The answer is 12", "The answer is 10."])
  [v] = prompting.self_consistency(scripted(lambda p: next(replies)), [prompt], n=3)
  assert prompt.startswith("[1] Each box") and v.answer == "12"


def test_text_generator_on_a_tiny_model():
  from gptjax.model import GPT, ModelConfig
  tok = CharTokenizer("abcdefghij +=?0123456789")
  model = GPT(ModelConfig(vocab_size=tok.vocab_size, num_layers=1, num_heads=2, d_model=16,
                          max_len=64))
  params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 4), jnp.int32))["params"]))(
      jax.random.key(0))
  gen = prompting.make_text_generator(model, params, tok, seed=0, max_new_tokens=8)
  a = gen(["ab", "1+1="], 2, temperature=1.0, stop=["="])
  assert len(a) == 2 and all(len(x) == 2 for x in a)
  assert all(isinstance(s, str) and "=" not in s for x in a for s in x)
  b = prompting.make_text_generator(model, params, tok, seed=0, max_new_tokens=8)(
      ["ab", "1+1="], 2, temperature=1.0, stop=["="])
  assert a == b                                                    # same seed, same call order
  assert prompting.encode_with_specials(tok, "a<|tool_result|>b") == [
      tok.encode("a")[0], tok.special_ids["<|tool_result|>"], tok.encode("b")[0]]
