"""Tree-of-thought search with scripted expanders and scorers: the planted best path is found by
beam and best-first search where greedy step choice misses it, an exhaustive search equals brute
force, every generated token is counted, and a token budget stops the search; then the model
adapters on a small random model."""

import itertools
import random

import pytest

from gptjax import search

DIGITS = "012"


def tree_expand(depth: int, tokens_per_step: int = 2, calls=None):
  """Every chain branches into the steps '0', '1', '2'; chains of `depth` steps are complete."""
  def expand(nodes):
    if calls is not None:
      calls.append([(n.problem, n.text) for n in nodes])
    return [[search.Step(d, tokens=tokens_per_step, final=len(n.steps) + 1 == depth)
             for d in DIGITS] for n in nodes]
  return expand


def table_score(tables):
  """Problem q's chain scores tables[q][text], 0 when absent."""
  return lambda nodes: [tables[n.problem].get(n.text, 0.0) for n in nodes]


# The planted path 2-0-1 starts below the decoy 0, whose children all score low: choosing each
# step greedily (a beam of one) ends in the decoy's subtree.
PLANTED = {"0": 0.9, "2": 0.5, "20": 0.8, "201": 1.0, "00": 0.1, "01": 0.1, "02": 0.1,
           "000": 0.2, "010": 0.15}


def test_beam_search_finds_the_planted_path_that_greedy_misses():
  greedy = search.beam_search(1, expand=tree_expand(3), score=table_score([PLANTED]),
                              beam_width=1, max_depth=3)[0]
  assert greedy.best.text == "000" and greedy.best.score == 0.2
  calls = []
  [o] = search.beam_search(1, expand=tree_expand(3, calls=calls), score=table_score([PLANTED]),
                           beam_width=2, max_depth=3)
  assert o.best.text == "201" and o.best.score == 1.0 and o.best.final
  # The kept chains of each round are the ones expanded next.
  assert calls == [[(0, "")], [(0, "0"), (0, "2")], [(0, "20"), (0, "00")]]
  # Tokens: 1 + 2 + 2 nodes expanded, 3 candidates each, 2 tokens a candidate.
  assert (o.expansions, o.tokens, o.scored, o.complete, o.stopped_by) == (5, 30, 15, 6, "done")


def test_best_first_search_finds_the_planted_path_and_stops_at_it():
  calls = []
  [o] = search.best_first_search(1, expand=tree_expand(3, calls=calls),
                                 score=table_score([PLANTED]), max_expansions=100)
  assert o.best.text == "201" and o.stopped_by == "done"
  # root, the decoy (best first), its children all below 0.5, then down the planted path.
  assert [c[0][1] for c in calls] == ["", "0", "2", "20"]
  assert (o.expansions, o.tokens, o.scored) == (4, 24, 12)


def test_problems_search_in_one_batch_with_their_own_budgets():
  other = {"1": 1.0, "11": 1.0, "111": 1.0, "2": 0.9, "22": 0.9, "222": 2.0}
  calls = []
  outs = search.beam_search(2, expand=tree_expand(3, calls=calls),
                            score=table_score([PLANTED, other]), beam_width=2, max_depth=3)
  assert [o.best.text for o in outs] == ["201", "222"]
  assert all(len({p for p, _ in c}) == 2 for c in calls)     # every round serves both problems
  assert [o.tokens for o in outs] == [30, 30]


@pytest.mark.parametrize("seed", range(5))
def test_an_exhaustive_search_equals_brute_force(seed):
  rng = random.Random(seed)
  leaves = ["".join(p) for p in itertools.product(DIGITS, repeat=3)]
  scores = {"".join(p[:k]): rng.random() for p in itertools.product(DIGITS, repeat=3)
            for k in (1, 2, 3)}
  best = max(leaves, key=lambda t: scores[t])
  beam = search.beam_search(1, expand=tree_expand(3), score=table_score([scores]),
                            beam_width=27, max_depth=3)[0]
  assert beam.best.text == best and beam.complete == 27 and beam.tokens == (1 + 3 + 9) * 6
  # With admissible scores (a chain never scores above its prefix), best-first's first complete
  # chain is the best one; the budget never binds.
  mono = {t: min(scores[t[:k]] for k in range(1, len(t) + 1)) for t in scores}
  top = max(mono[t] for t in leaves)
  bf = search.best_first_search(1, expand=tree_expand(3), score=table_score([mono]),
                                max_expansions=1000)[0]
  assert bf.best.final and bf.best.score == top and mono[bf.best.text] == top
  assert bf.stopped_by == "done" and bf.tokens == 6 * bf.expansions


def test_a_token_budget_stops_the_search_after_the_round_that_crosses_it():
  [o] = search.beam_search(1, expand=tree_expand(3), score=table_score([PLANTED]), beam_width=2,
                           max_depth=3, token_budget=15)
  # Round 1 spends 6 tokens, round 2 twelve more (18 >= 15): no complete chain, so the best
  # partial one is the answer.
  assert (o.tokens, o.stopped_by, o.complete) == (18, "budget", 0)
  assert o.best.text == "20" and not o.best.final
  [o] = search.best_first_search(1, expand=tree_expand(3), score=table_score([PLANTED]),
                                 max_expansions=100, token_budget=12)
  assert (o.tokens, o.expansions, o.stopped_by) == (12, 2, "budget")
  [o] = search.best_first_search(1, expand=tree_expand(3), score=table_score([PLANTED]),
                                 max_expansions=3)
  # No complete chain: the best-scoring partial one.
  assert (o.expansions, o.stopped_by, o.best.text) == (3, "expansions", "0")


def test_identical_siblings_are_one_chain_but_all_their_tokens_count():
  def expand(nodes):
    return [[search.Step("a", tokens=3, final=True)] * 4 for _ in nodes]
  [o] = search.beam_search(1, expand=expand, score=lambda ns: [1.0] * len(ns), beam_width=4,
                           max_depth=2)
  assert (o.tokens, o.scored, o.complete, o.best.text) == (12, 1, 1, "a")


def test_bad_callables_are_named():
  with pytest.raises(ValueError, match="expand returned candidates for 0 nodes, asked for 1"):
    search.beam_search(1, expand=lambda ns: [], score=lambda ns: [], beam_width=1, max_depth=1)
  with pytest.raises(ValueError, match="score returned 1 values for 3 nodes"):
    search.beam_search(1, expand=tree_expand(2), score=lambda ns: [0.0], beam_width=1,
                       max_depth=1)
  with pytest.raises(ValueError, match="beam_width and max_depth"):
    search.beam_search(1, expand=tree_expand(2), score=lambda ns: [], beam_width=0, max_depth=1)


def test_greedy_steps_of_a_model_rebuild_its_greedy_chain_and_count_its_tokens():
  """Expanding one greedy line at a time (a beam of one) gives the tokens of one greedy decode
  of the whole reply, cut into steps at the step-end token, each counted once."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from gptjax import sampling
  from gptjax.data import chat
  from gptjax.data.tokenizers import CharTokenizer
  from gptjax.model import GPT, ModelConfig
  tok = CharTokenizer.from_text("abcdefgh\n")
  model = GPT(ModelConfig(vocab_size=tok.vocab_size, num_layers=1, num_heads=2, d_model=16,
                          max_len=64))
  # Weights scaled up: a freshly initialised model's greedy reply repeats one token, and these
  # replies should hold several steps.
  params = jax.tree.map(lambda x: 3.0 * x, model.init(jax.random.key(1),
                                                      jnp.zeros((1, 8), jnp.int32))["params"])
  prompts = [chat.render_prompt("abc", tok), chat.render_prompt("hgfedcba", tok)]
  stops = chat.reply_stop_ids(tok)
  fulls = []
  for p in prompts:
    out = jax.device_get(sampling.generate(model, params, np.asarray([p], np.int32),
                                           np.asarray([len(p)], np.int32), rng=0,
                                           max_new_tokens=30, temperature=0.0, eos_ids=stops,
                                           pad_id=tok.pad_id))
    fulls.append([int(t) for t in out.completion[0][:int(out.lengths[0])]])
  [end] = tok.encode("h")
  assert all(full.count(end) >= 2 and full[-1] not in stops for full in fulls)
  calls = []
  expand = search.model_expand((model, params, tok), prompts, branch=1, temperature=0.0,
                               max_step_tokens=4, max_chain_tokens=30, seed=0, batch_size=4,
                               step_end="h")
  outs = search.beam_search(2, expand=lambda ns: calls.append(len(ns)) or expand(ns),
                            score=lambda ns: [0.0] * len(ns), beam_width=1, max_depth=40)
  for o, full in zip(outs, fulls):
    assert o.best.ids == full and o.tokens == len(full) and o.best.final
    for st in o.best.steps[:-1]:
      # A step ends at the step-end token, or is cut at max_step_tokens.
      assert st.ids[-1] == end or len(st.ids) == 4
  assert len(calls) > 2 and calls[0] == 2
  with pytest.raises(ValueError, match="a step must end at a single token"):
    search.model_expand((model, params, tok), prompts, branch=1, temperature=0.0,
                        max_step_tokens=4, max_chain_tokens=30, seed=0, step_end="ab")


def test_the_reward_score_of_a_chain_is_the_scorers_score_of_its_ids():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from gptjax.data.tokenizers import CharTokenizer
  from gptjax.model import GPT, ModelConfig
  from flax import linen as nn
  from gptjax.reward_model import RewardScorer
  tok = CharTokenizer.from_text("abcdefgh\n")
  model = GPT(ModelConfig(vocab_size=tok.vocab_size, num_layers=1, num_heads=2, d_model=16,
                          max_len=40, scalar_head=True))
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  rm = RewardScorer(model, params, tok, seq_len=40, bias=0.5)
  prompts = [tok.encode("abc"), tok.encode("hgfedcbahgfedcba")]
  nodes = [search.Node(0), search.Node(0).child(search.Step("ab\n", tuple(tok.encode("ab\n")))),
           search.Node(1).child(search.Step("h" * 30, tuple(tok.encode("h" * 30))))]
  got = search.reward_score(rm, prompts, batch_size=2, width_bucket=16)(nodes)
  want = rm([prompts[n.problem] for n in nodes], [n.ids for n in nodes])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert len(set(np.round(got, 5))) == 3
