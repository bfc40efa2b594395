"""Tree-of-thought search: expand several next steps of a chain, score the partial chains, keep the
best (Yao et al. 2023), by beam search or best-first search.

    outcomes = beam_search(num_problems, expand=expand, score=score, beam_width=4, max_depth=8)
    outcomes[q].best.text      the chain chosen for problem q
    outcomes[q].tokens         the tokens generated for problem q (every candidate, kept or not)

The core is model-free. It sees chains as tuples of `Step`s and calls two functions, each once
per round for every problem still searching, so a model serves all problems in one batch:

    expand(nodes: list[Node]) -> list[list[Step]]     candidate next steps of each node
    score(nodes: list[Node]) -> list[float]           higher is better; partial or complete

Tests drive it with scripted fakes; `model_expand` (a policy sampling one line per step) and
`reward_score` (the outcome RM read on a partial chain) plug a model in. Every step carries the
number of tokens generated to make it, so a search is compared with sampling at an equal token
budget (`tot_eval_stage` does this on the arithmetic task and adds rows to its report).

What does not live here: sampling (`sampling.py`), the RM (`reward_model.py`), the task.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Step:
  text: str                       # what the step adds to the chain (a line, its newline included)
  ids: tuple[int, ...] = ()       # its token ids, when a model made it
  tokens: int = 0                 # tokens generated to make it
  final: bool = False             # the chain ends here (an answer, or no room to go on)


@dataclasses.dataclass(frozen=True)
class Node:
  problem: int
  steps: tuple[Step, ...] = ()
  score: float = -math.inf

  @property
  def text(self) -> str:
    return "".join(s.text for s in self.steps)

  @property
  def ids(self) -> list[int]:
    return [i for s in self.steps for i in s.ids]

  @property
  def final(self) -> bool:
    return bool(self.steps) and self.steps[-1].final

  def child(self, step: Step) -> "Node":
    return Node(self.problem, self.steps + (step,))


Expand = Callable[[list[Node]], Sequence[Sequence[Step]]]
Score = Callable[[list[Node]], Sequence[float]]


@dataclasses.dataclass
class Outcome:
  best: Node                      # the best complete chain found, else the best partial one
  tokens: int = 0                 # tokens generated for this problem
  expansions: int = 0             # nodes expanded
  scored: int = 0                 # nodes scored
  complete: int = 0               # distinct complete chains found
  stopped_by: str = ""            # why the search ended: 'done', 'depth', 'expansions', 'budget'


def _children(nodes: list[Node], expand: Expand, outcomes: list[Outcome]) -> list[Node]:
  """Expands `nodes` in one call; counts every candidate's tokens to its problem, and merges
  identical siblings (the same text from one parent), which would only crowd a beam."""
  cands = expand(nodes)
  if len(cands) != len(nodes):
    raise ValueError(f"expand returned candidates for {len(cands)} nodes, asked for {len(nodes)}")
  out = []
  for node, steps in zip(nodes, cands):
    outcomes[node.problem].expansions += 1
    seen = set()
    for s in steps:
      outcomes[node.problem].tokens += s.tokens
      if s.text not in seen:
        seen.add(s.text)
        out.append(node.child(s))
  return out


def _scored(nodes: list[Node], score: Score, outcomes: list[Outcome]) -> list[Node]:
  if not nodes:
    return []
  values = [float(v) for v in score(nodes)]
  if len(values) != len(nodes):
    raise ValueError(f"score returned {len(values)} values for {len(nodes)} nodes")
  for n in nodes:
    outcomes[n.problem].scored += 1
  return [dataclasses.replace(n, score=v) for n, v in zip(nodes, values)]


def _over_budget(o: Outcome, token_budget: int | None) -> bool:
  return token_budget is not None and o.tokens >= token_budget


def _finish(outcomes, completed, fallback) -> list[Outcome]:
  """Each problem's answer: its best-scoring complete chain (the first found on ties), else its
  best partial one."""
  for q, o in enumerate(outcomes):
    done = completed[q]
    o.complete = len({n.text for n in done})
    pool = done or fallback[q]
    o.best = max(pool, key=lambda n: n.score) if pool else Node(q)
  return outcomes


def beam_search(num_problems: int, *, expand: Expand, score: Score, beam_width: int,
                max_depth: int, token_budget: int | None = None) -> list[Outcome]:
  """Beam search over steps, all problems in lockstep.

  Each round expands every unfinished chain in a problem's beam, scores the new chains, and
  keeps the `beam_width` best of the new chains and the complete ones already in the beam. A
  problem stops when its beam holds only complete chains, after `max_depth` rounds, or once it
  has spent `token_budget` generated tokens (the round that crosses the budget is counted in
  full). Its answer is the best-scoring complete chain seen in any round.
  """
  if beam_width < 1 or max_depth < 1:
    raise ValueError(f"beam_search: beam_width and max_depth must be >= 1, got {beam_width} "
                     f"and {max_depth}")
  outcomes = [Outcome(Node(q)) for q in range(num_problems)]
  beams = [[Node(q)] for q in range(num_problems)]
  completed = [[] for _ in range(num_problems)]
  active = set(range(num_problems))
  for _ in range(max_depth):
    todo = [n for q in sorted(active) for n in beams[q] if not n.final]
    if not todo:
      break
    children = _scored(_children(todo, expand, outcomes), score, outcomes)
    pools = {q: [n for n in beams[q] if n.final] for q in active}
    for c in children:
      pools[c.problem].append(c)
      if c.final:
        completed[c.problem].append(c)
    for q in list(active):
      # A stable sort: among equal scores the chains kept earlier, then the first made, win.
      beams[q] = sorted(pools[q], key=lambda n: -n.score)[:beam_width]
      if all(n.final for n in beams[q]):
        outcomes[q].stopped_by = "done"
        active.discard(q)
      elif _over_budget(outcomes[q], token_budget):
        outcomes[q].stopped_by = "budget"
        active.discard(q)
    if not active:
      break
  for q in active:
    outcomes[q].stopped_by = "depth"
  return _finish(outcomes, completed, beams)


def best_first_search(num_problems: int, *, expand: Expand, score: Score, max_expansions: int,
                      token_budget: int | None = None, max_depth: int = 64) -> list[Outcome]:
  """Best-first search over steps: each round pops every unfinished problem's best-scoring
  chain from its frontier. A complete chain popped is the answer (nothing left on the frontier
  scores higher); a partial one is expanded and its children are scored and pushed. A problem
  also stops after `max_expansions` expansions, at `token_budget` tokens or with an empty
  frontier; its answer is then the best complete chain found so far, if any. Chains of
  `max_depth` steps are not expanded further.
  """
  if max_expansions < 1:
    raise ValueError(f"best_first_search: max_expansions must be >= 1, got {max_expansions}")
  outcomes = [Outcome(Node(q)) for q in range(num_problems)]
  # Heap entries (-score, order, node): ties go to the chain pushed first.
  frontier = [[(0.0, 0, Node(q))] for q in range(num_problems)]
  order = 1
  completed = [[] for _ in range(num_problems)]
  seen = [[] for _ in range(num_problems)]
  answer: dict[int, Node] = {}
  active = set(range(num_problems))
  while active:
    todo = []
    for q in sorted(active):
      if not frontier[q]:
        outcomes[q].stopped_by = "done"
        active.discard(q)
        continue
      node = heapq.heappop(frontier[q])[2]
      if node.final:
        answer[q] = node
        outcomes[q].stopped_by = "done"
        active.discard(q)
      elif len(node.steps) < max_depth:
        todo.append(node)
    if not todo:
      continue
    children = _scored(_children(todo, expand, outcomes), score, outcomes)
    for c in children:
      heapq.heappush(frontier[c.problem], (-c.score, order, c))
      order += 1
      seen[c.problem].append(c)
      if c.final:
        completed[c.problem].append(c)
    for q in {n.problem for n in todo}:
      o = outcomes[q]
      if q in active and (o.expansions >= max_expansions or _over_budget(o, token_budget)):
        o.stopped_by = "budget" if _over_budget(o, token_budget) else "expansions"
        active.discard(q)
  out = _finish(outcomes, completed, seen)
  for q, node in answer.items():
    out[q].best = node
  return out


# --------------------------------------------------------------------------------------------
# A model as `expand` and `score`.
# --------------------------------------------------------------------------------------------

def model_expand(policy, prompt_ids: Sequence[Sequence[int]], *, branch: int, temperature: float,
                 max_step_tokens: int, max_chain_tokens: int, seed: int, batch_size: int = 256,
                 width_bucket: int = 32, step_end: str = "\n") -> Expand:
  """`expand` from a policy (model, params, tokenizer): `branch` sampled continuations of each
  node, each one step long: up to and including the next `step_end` (a newline: one line of the
  task's chain), or the end of the reply. A step is final when it ends the reply, or when the
  chain reaches `max_chain_tokens` or the model's window. `prompt_ids[q]` is problem q's prompt
  (the chat template's generation prompt).

  Rows are padded to widths that are multiples of `width_bucket` (narrower within a step of the
  window's end, so every row can still take its whole step) in fixed `batch_size` batches, so a
  few compiled programs serve every round; call i's batch b uses fold_in(fold_in(seed, i),
  b), so a search is reproducible. A candidate's tokens are the ones it keeps: sampling past a
  chain's cap within the step is cut and not counted (at most `max_step_tokens` per candidate).
  """
  import jax
  import numpy as np

  from gptjax import sampling
  from gptjax.data import chat

  model, params, tok = policy
  max_len = model.cfg.resolved().max_len
  stops = tuple(chat.reply_stop_ids(tok))
  end_ids = tok.encode(step_end)
  if len(end_ids) != 1:
    raise ValueError(f"model_expand: the step end {step_end!r} is {len(end_ids)} tokens for "
                     "this tokenizer; a step must end at a single token")
  calls = [0]

  def expand(nodes: list[Node]) -> list[list[Step]]:
    rows = [list(prompt_ids[n.problem]) + n.ids for n in nodes for _ in range(branch)]
    full = [len(r) for r in rows if len(r) >= max_len]
    if full:
      raise ValueError(f"model_expand: a chain of {max(full)} tokens leaves no room in "
                       f"max_len={max_len}")
    chain_len = [len(n.ids) for n in nodes for _ in range(branch)]
    # A row's padded width plus its step must fit the window. Near the window's end the bucket's
    # width is narrowed to leave the row its whole step (max_step_tokens, or up to the window):
    # capping the step by the bucket's width instead would cut it short of what fits, and the
    # cut step would be neither final nor at a step end.
    widths = [min(-(-len(r) // width_bucket) * width_bucket,
                  max_len - min(max_step_tokens, max_len - len(r))) for r in rows]
    out_ids = [None] * len(rows)
    key = jax.random.fold_in(jax.random.key(seed), calls[0])
    calls[0] += 1
    b = 0
    for width in sorted(set(widths)):
      members = [i for i, w in enumerate(widths) if w == width]
      # At least every member's own step: a narrowed width is the one its members' steps need.
      new = min(max_step_tokens, max_len - width)
      for start in range(0, len(members), batch_size):
        chunk = members[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        arr, lengths = sampling.pad_prompts([rows[i] for i in padded], pad_id=tok.pad_id,
                                            rows=batch_size, width=width)
        res = sampling.generate(model, params, arr, lengths,
                                rng=jax.random.fold_in(key, b), max_new_tokens=new,
                                temperature=temperature, eos_ids=stops + tuple(end_ids),
                                pad_id=tok.pad_id)
        b += 1
        comp, mask = jax.device_get((res.completion, res.completion_mask))
        for j, i in enumerate(chunk):
          out_ids[i] = [int(t) for t in np.asarray(comp[j])[np.asarray(mask[j]) > 0]]
    steps = []
    for i, ids in enumerate(out_ids):
      room = min(max_chain_tokens - chain_len[i], max_len - len(rows[i]))
      ids = ids[:max(room, 0)]
      ended = bool(ids) and ids[-1] in stops
      # A step cut at max_step_tokens mid-line is not final: the next round goes on with it.
      final = (ended or not ids or chain_len[i] + len(ids) >= max_chain_tokens
               or len(rows[i]) + len(ids) >= max_len)
      text = tok.decode([t for t in ids if t not in stops and t != tok.pad_id])
      steps.append(Step(text, tuple(ids), len(ids), final))
    return [steps[k * branch:(k + 1) * branch] for k in range(len(nodes))]

  return expand


def reward_score(scorer, prompt_ids: Sequence[Sequence[int]], *, batch_size: int = 256,
                 width_bucket: int = 64) -> Score:
  """`score` from a reward model scorer (`reward_model.load_reward_model`): the chain so far as
  the completion of problem q's prompt, read as the scorer reads any reply (the same values as
  `scorer(prompts, completions)`). A partial chain is scored as it stands, without the end of
  turn, so an outcome RM reads it as a value estimate of the chain's prefix.

  Every call is cut into `batch_size` rows padded to a multiple of `width_bucket` tokens: a
  search's rounds score varying numbers of chains of growing length, and these few shapes keep
  them to a few compiled programs."""
  import jax
  import numpy as np

  from gptjax.reward_model import sequence_ids

  pad = scorer.tokenizer.pad_id

  def score(nodes: list[Node]) -> list[float]:
    seqs = [sequence_ids(prompt_ids[n.problem], n.ids, seq_len=scorer.seq_len) for n in nodes]
    width = min(scorer.seq_len, -(-max(len(x) for x in seqs) // width_bucket) * width_bucket)
    out = []
    for start in range(0, len(seqs), batch_size):
      chunk = seqs[start:start + batch_size]
      tokens = np.full((batch_size, width), pad, np.int32)
      mask = np.zeros((batch_size, width), np.float32)
      for i, x in enumerate(chunk):
        tokens[i, :len(x)] = x
        mask[i, :len(x)] = 1
      out.append(np.asarray(jax.device_get(scorer.score_tokens(tokens, mask)))[:len(chunk)])
    return [float(x) for x in np.concatenate(out)]

  return score


# --------------------------------------------------------------------------------------------
# Measured on the arithmetic task: a pipeline stage that adds rows to the reasoning report.
# --------------------------------------------------------------------------------------------

def _subset(problems, per_band: int):
  """The first `per_band` problems of each band (all with 0), in their order."""
  if not per_band:
    return list(problems)
  count: dict = {}
  out = []
  for p in problems:
    count[p.band] = count.get(p.band, 0) + 1
    if count[p.band] <= per_band:
      out.append(p)
  return out


def run_search(method: str, c, num_problems: int, *, expand: Expand, score: Score) -> list[Outcome]:
  """`method` ('beam' or 'best_first') with the sizes of the `tot_eval` config `c`."""
  if method == "beam":
    return beam_search(num_problems, expand=expand, score=score, beam_width=c.beam_width,
                       max_depth=c.max_depth)
  if method == "best_first":
    return best_first_search(num_problems, expand=expand, score=score,
                             max_expansions=c.max_expansions, max_depth=c.max_depth)
  from gptjax.config import ConfigError
  raise ConfigError(f"tot_eval.methods: unknown method {method!r}; expected 'beam' or "
                    "'best_first'")


def method_name(method: str, c) -> str:
  if method == "beam":
    return f"tree search, beam {c.beam_width}x{c.branch}, ORM"
  return f"tree search, best-first x{c.branch}, ORM"


def tot_eval_stage(cfg, run_dir: str, progress: bool = True) -> dict:
  """Tree-of-thought search on held-out problems against self-consistency and ORM best-of-k at
  an equal token budget; adds its rows to `<run>/reason_eval.json` (`reasoning.add_rows`).

  Both searches expand `branch` sampled lines of the CoT SFT model per chain and score partial
  chains with the outcome RM. Each search's budget is what it generated: its mean tokens per
  problem over the mean tokens of one sampled chain gives k, and self-consistency and best-of-k
  (the RM's pick) are read on k of `samples` chains per problem drawn from the same model.
  Generated tokens are counted for every method alike; the search also re-reads (prefills) its
  prefix at every step, which sampling a whole chain does once, and that cost is not counted.
  """
  import os
  import time

  import numpy as np

  from gptjax import config as config_lib
  from gptjax import pipeline, reasoning
  from gptjax.tasks import arithmetic as ar

  c = pipeline.with_run_dir(cfg.tot_eval.copy_and_resolve_references(), run_dir)
  if not os.path.exists(os.path.join(c.orm, "done.json")):
    raise config_lib.ConfigError(f"tot_eval.orm: no finished reward model in {c.orm}; the "
                                 "search scores its chains with the outcome RM")
  t0 = time.time()
  probs = _subset(reasoning.read_problems(
      os.path.join(run_dir, "task_data", "problems_heldout.jsonl")), c.problems_per_band)
  questions, bands = [p.question for p in probs], [p.band for p in probs]
  gold = [p.answer for p in probs]
  policy = reasoning.load_policy(c.policy)
  rm = reasoning.load_reward_scorer(c.orm)
  prompts = reasoning.prompt_ids(questions, policy[2])
  timings = {}

  # The sampled baseline: `samples` whole chains per problem, their tokens and RM scores.
  t = time.time()
  s = reasoning.sample(policy, questions, n=c.samples, temperature=c.temperature,
                       max_new_tokens=c.max_new_tokens, seed=c.seed, batch_size=c.batch_size)
  answers = reasoning.answers_of(s["texts"])
  correct = [[a == g for a in row] for row, g in zip(answers, gold)]
  rm_scores = reasoning._score_with_rm(rm, policy[2], questions, s["ids"])
  chain_tokens = float(np.mean(s["lengths"]))
  timings["tot_eval_sampling_s"] = time.time() - t

  rows, traces, info = [], {}, {}
  for i, method in enumerate(c.methods):
    t = time.time()
    expand = model_expand(policy, prompts, branch=c.branch, temperature=c.temperature,
                          max_step_tokens=c.max_step_tokens, max_chain_tokens=c.max_new_tokens,
                          seed=c.seed + 1 + i, batch_size=c.batch_size)
    outcomes = run_search(method, c, len(probs), expand=expand,
                          score=reward_score(rm, prompts, batch_size=c.batch_size))
    texts = [o.best.text for o in outcomes]
    values = [float(ar.is_correct(x, g)) for x, g in zip(texts, gold)]
    tokens = float(np.mean([o.tokens for o in outcomes]))
    k = int(min(max(round(tokens / max(chain_tokens, 1e-9)), 1), c.samples))
    name = method_name(method, c)
    # Named after the search first: the report reads `self-consistency@k` and `best-of-k, ORM`
    # rows as reason_eval's own. No k in the name: k follows the search's token count, which
    # differs between training seeds, and the report pools rows of one name across seeds (k is
    # the row's budget and is in its note).
    label = method.replace("_", "-")
    sc_name = f"{label} search's tokens: self-consistency"
    bo_name = f"{label} search's tokens: best-of-k by the ORM"
    sc = [ar.vote_at_k(a, g, k, draws=c.draws, seed=c.seed + j)
          for j, (a, g) in enumerate(zip(answers, gold))]
    bo = [ar.best_at_k(r, cc, k, draws=c.draws, seed=c.seed + j)
          for j, (r, cc) in enumerate(zip(rm_scores, correct))]
    note = (f"{tokens:.0f} generated tokens per problem; k={k} sampled chains of "
            f"{chain_tokens:.1f} tokens on average ({k * chain_tokens:.0f})")
    row = reasoning.table_row(name, k, bands, values, family="CoT", note=note)
    row.update(tokens_per_problem=tokens, claim={
        "against": sc_name, "text": f"{label} tree search beats self-consistency at an equal "
        "token budget"})
    rows += [row,
             dict(reasoning.table_row(sc_name, k, bands, sc, family="CoT", note=note),
                  tokens_per_problem=k * chain_tokens),
             dict(reasoning.table_row(bo_name, k, bands, bo, family="CoT", note=note),
                  tokens_per_problem=k * chain_tokens)]
    traces[name] = reasoning._traces(probs, texts, values)
    timings[f"tot_eval_{method}_s"] = time.time() - t
    info[method] = {"accuracy": float(np.mean(values)), "tokens_per_problem": tokens, "k": k,
                    "complete": float(np.mean([o.complete for o in outcomes])),
                    "stopped_by": {r: sum(o.stopped_by == r for o in outcomes)
                                   for r in ("done", "depth", "expansions", "budget")}}
    print(f"[tot_eval] {name}: accuracy {np.mean(values):.3f} with {tokens:.0f} tokens per "
          f"problem; self-consistency@{k} {np.mean(sc):.3f}, best-of-{k} ORM {np.mean(bo):.3f}",
          flush=True)
  timings["tot_eval_total_s"] = time.time() - t0
  reasoning.add_rows(run_dir, "tot_eval", rows, traces=traces, timings=timings)
  return {"problems": len(probs), "chain_tokens": chain_tokens, "methods": info}
