"""The arithmetic-reasoning recipe's library: its pipeline stages that do not train, and the table.

    gptjax pipeline --config experiments/arithmetic_reasoning.py:tiny --workdir runs/reason

The training stages are the ordinary runners (pretrain, SFT, reward, PPO, GRPO) pointed at this
task's files by configuration. What lives here:

    task_data_stage   the task's files: problems (train / validation / held-out), pretraining
                      text, SFT chats in the direct and CoT formats, RL prompts with references
    tokenizer_stage   a character vocabulary of the training text (digits are single tokens)
    orm_data_stage    CoT samples of the SFT model on training problems, labelled correct or not
                      by the verifier: preference records for the reward stage (an outcome RM)
    evaluate_stage    every method on the same held-out problems: `reason_eval.json` (with the
                      pool of sampled CoT chains' answers, format and ORM scores)
    tool_data_stage   SFT chats in the `tool` format (calculator calls in the chain)
    tool_eval_stage   the tool model, greedy, with the calculator in its decode loop: a row
                      added to `reason_eval.json` (`add_rows`)
    answer_format_stage  rows: the CoT reply forced into its answer format (constrained
                      decoding), accuracy and format errors with and without it
    check_retry_stage rows: check-and-retry over the pooled chains, judged by re-derivation or
                      by the outcome RM
    sample            k completions per question from any policy, in fixed-shape batches
    sample_with_tools greedy completions with a tool loop (`gptjax.tools`), by the engine

The table is a list of rows {method, budget, per_band: {band: {acc, lo, hi, n}}, overall}; a new
method (tools, constrained decoding, search, retrieval) is one more row made by `table_row` from
its per-problem scores, and the report card (`reasoning_report.py`) shows every row it finds. A
method measured by a pipeline stage of its own adds its rows with `add_rows`, so adding that stage
to a finished run adds the rows and leaves every other row as it was.
Validation problems come from the training split (never the held-out one), so presets can be
chosen on them without touching the held-out set.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from gptjax import checkpoint as ckpt_lib
from gptjax import sampling
from gptjax.data import chat, tokenizers
from gptjax.tasks import arithmetic as ar

RESULTS_FILE = "reason_eval.json"


def _dir(run_dir, *parts):
  return os.path.join(run_dir, *parts)


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def read_problems(path: str) -> list[ar.Problem]:
  with open(path) as f:
    return [ar.from_jsonable(json.loads(l)) for l in f if l.strip()]


# --------------------------------------------------------------------------------------------
# The task's files and tokenizer.
# --------------------------------------------------------------------------------------------

def write_task_data(c, out_dir: str) -> dict:
  """Writes the task's files into `out_dir` from the `task_data` config; returns their counts."""
  os.makedirs(out_dir, exist_ok=True)
  kw = dict(seed=c.seed, heldout_fraction=c.heldout_fraction)
  train = ar.generate(list(c.train_bands), c.train_per_band, split="train", **kw)
  seen = {p.question for p in train}
  validation = [p for p in ar.generate(list(c.train_bands), c.validation_per_band, split="train",
                                       **{**kw, "seed": c.seed + 1})
                if p.question not in seen]
  heldout = ar.generate(list(c.heldout_bands), c.heldout_per_band, split="heldout", **kw)
  if c.gsm8k_train:
    train += ar.read_gsm8k(c.gsm8k_train)
  if c.gsm8k_test:
    heldout += ar.read_gsm8k(c.gsm8k_test)[:c.heldout_per_band]
  for name, probs in (("train", train), ("validation", validation), ("heldout", heldout)):
    ar.write_jsonl(os.path.join(out_dir, f"problems_{name}.jsonl"), map(ar.to_jsonable, probs))
  for fmt in ar.FORMATS:
    ar.write_jsonl(os.path.join(out_dir, f"sft_{fmt}.jsonl"), ar.sft_records(train, fmt))
  rl = train if not c.rl_prompts else train[:c.rl_prompts]
  ar.write_jsonl(os.path.join(out_dir, "rl_prompts.jsonl"), ar.prompt_records(rl))
  # Pretraining text: every training problem in each of `pretrain_formats`, one document per
  # line of a text_files JSONL (so its validation split, by a hash of the line, is never empty).
  # Held-out problems never appear.
  docs = [ar.pretrain_text(p, fmt) for p in train for fmt in c.pretrain_formats]
  ar.write_jsonl(os.path.join(out_dir, "pretrain_task.jsonl"), ({"text": d} for d in docs))
  task_chars = sum(map(len, docs))
  shakespeare_chars = 0
  extra = os.path.join(out_dir, "pretrain_shakespeare.jsonl")
  chars = {ch for d in docs for ch in d}
  if c.shakespeare_fraction > 0:
    from gptjax.data import shakespeare
    want = int(task_chars * c.shakespeare_fraction / (1 - c.shakespeare_fraction))
    text = shakespeare.corpus_text("train")[:want]
    # Scenes are long; documents of ~1000 characters cut at speech boundaries mix better.
    pieces = [x + "\n\n" for x in text.split("\n\n") if x.strip()]
    shakespeare_docs, cur = [], ""
    for x in pieces:
      cur += x
      if len(cur) > 1000:
        shakespeare_docs.append(cur)
        cur = ""
    shakespeare_docs += [cur] if cur else []
    ar.write_jsonl(extra, ({"text": d} for d in shakespeare_docs))
    shakespeare_chars = sum(map(len, shakespeare_docs))
    chars |= set(text)
  elif os.path.exists(extra):
    os.remove(extra)
  # The tokenizer's characters: the training text's only, so nothing about held-out problems
  # (even their alphabet) reaches training. Digits and operators are in every band.
  for fmt in ar.FORMATS:
    chars |= {ch for p in train for ch in p.target(fmt) + p.question}
  with open(os.path.join(out_dir, "chars.txt"), "w") as f:
    f.write("".join(sorted(chars)))
  by_band = lambda probs: {b: sum(p.band == b for p in probs) for b in dict.fromkeys(
      p.band for p in probs)}
  return {"train": len(train), "validation": len(validation), "heldout": len(heldout),
          "rl_prompts": len(rl), "pretrain_task_chars": task_chars,
          "pretrain_shakespeare_chars": shakespeare_chars, "heldout_by_band": by_band(heldout),
          "train_by_band": by_band(train)}


def task_data_stage(cfg, run_dir: str, progress: bool = True) -> dict:
  return write_task_data(cfg.task_data, _dir(run_dir, "task_data"))


def tokenizer_stage(cfg, run_dir: str, progress: bool = True) -> dict:
  with open(_dir(run_dir, "task_data", "chars.txt")) as f:
    tok = tokenizers.CharTokenizer.from_text(f.read())
  tok.save(_dir(run_dir, "tokenizer"))
  return {"vocab_size": tok.vocab_size}


# --------------------------------------------------------------------------------------------
# Policies and sampling.
# --------------------------------------------------------------------------------------------

def load_policy(workdir: str, step: int | None = None):
  """(GPT, params, tokenizer) of any stage's policy at `step` (default: the last); of an
  actor-critic PPO run, the policy alone."""
  return ckpt_lib.load_for_inference(workdir, step)[:3]


def checkpoint_steps(workdir: str) -> list[int]:
  d = ckpt_lib.checkpoint_dir(workdir)
  if not os.path.isdir(d):
    return []
  return sorted(int(x) for x in os.listdir(d) if x.isdigit())


def load_reward_scorer(workdir: str):
  """The outcome RM as `scorer(prompt_ids, completion_ids) -> [B]`, normalised as trained."""
  from gptjax.reward_model import load_reward_model
  return load_reward_model(workdir)


def prompt_ids(questions, tok) -> list[list[int]]:
  return [chat.render_prompt([{"role": "user", "content": q}], tok) for q in questions]


def sample(policy, questions, *, n: int, temperature: float, max_new_tokens: int, seed: int,
           batch_size: int = 256, width_bucket: int = 16, constraint=None) -> dict:
  """n completions per question (temperature 0: greedy, then n is 1). Returns {'texts' [Q][n],
  'ids' [Q][n] (with the stop token), 'lengths' [Q][n] tokens, 'ended' [Q][n]}. `constraint`
  (constraints.Constraint, compiled with the chat's stop ids) keeps every reply in its pattern.

  Rows are the questions repeated n times, in fixed-shape batches per prompt width; batch b's key
  is fold_in(seed, b), so the same call always gives the same samples.
  """
  model, params, tok = policy
  if temperature == 0 and n != 1:
    raise ValueError(f"sample: greedy decoding gives one completion per question, asked for {n}")
  stops = chat.reply_stop_ids(tok)
  prompts = prompt_ids(questions, tok)
  rows = [p for p in prompts for _ in range(n)]
  max_len = model.cfg.resolved().max_len
  # Rows are grouped by prompt width (rounded up to `width_bucket`), so a long word problem does not take
  # the room a short multiplication needs for its long chain: each group gets the new tokens
  # that fit beside its own prompts. Short groups are padded with copies to a power of two, so
  # calls over different question sets reuse a few compiled programs.
  widths = [min(-(-len(p) // width_bucket) * width_bucket, max_len - 1) for p in rows]
  too_long = [len(p) for p, w in zip(rows, widths) if len(p) > w]
  if too_long:
    raise ValueError(f"sample: a prompt of {max(too_long)} tokens leaves no room in "
                     f"max_len={max_len}")
  ids, lengths, ended = [None] * len(rows), [0] * len(rows), [False] * len(rows)
  b = 0
  for width in sorted(set(widths)):
    members = [i for i, w in enumerate(widths) if w == width]
    new = min(max_new_tokens, max_len - width)
    for start in range(0, len(members), batch_size):
      chunk = members[start:start + batch_size]
      # A chunk smaller than batch_size is padded only to the next power of two (at least 8):
      # padding a 60-row group to 512 decoded 8x the rows (the tiny run's greedy rows spent
      # most of their time on copies). Powers of two keep the compiled shapes few.
      bs = min(batch_size, max(8, 1 << (len(chunk) - 1).bit_length()))
      chunk = chunk + [chunk[-1]] * (bs - len(chunk))
      arr = np.full((bs, width), tok.pad_id, np.int32)
      for j, i in enumerate(chunk):
        arr[j, :len(rows[i])] = rows[i]
      out = sampling.generate(model, params, arr,
                              np.asarray([len(rows[i]) for i in chunk], np.int32),
                              rng=jax.random.fold_in(jax.random.key(seed), b),
                              max_new_tokens=new, temperature=temperature, eos_ids=stops,
                              pad_id=tok.pad_id, constraint=constraint)
      b += 1
      comp, mask = jax.device_get((out.completion, out.completion_mask))
      for j, i in enumerate(members[start:start + batch_size]):
        row = [int(t) for t in np.asarray(comp[j])[np.asarray(mask[j]) > 0]]
        ids[i], lengths[i] = row, len(row)
        ended[i] = bool(row) and row[-1] in stops
  texts = [chat.parse_reply(r, tok) for r in ids]
  shape = lambda xs: [xs[q * n:(q + 1) * n] for q in range(len(questions))]
  return {"texts": shape(texts), "ids": shape(ids), "lengths": shape(lengths),
          "ended": shape(ended)}


def answers_of(texts) -> list[list[int | None]]:
  return [[ar.extract_final(t) for t in row] for row in texts]


# --------------------------------------------------------------------------------------------
# The outcome RM's data.
# --------------------------------------------------------------------------------------------

def orm_records(problems, samples: dict, *, add_reference: bool) -> tuple[list[dict], dict]:
  """Preference records (the reward stage's 'responses' + 'ranks' form) from verified samples:
  rank 1 for a correct final answer, 0 otherwise, so every (correct, wrong) pair of one problem
  trains the Bradley–Terry RM. With `add_reference`, a problem none of whose samples is correct
  gets its reference solution as the correct reply, so it still gives pairs. Problems whose
  replies are all correct (or all wrong, without add_reference) give no pair and are left out."""
  recs, n_correct, n_all, kept_mixed, added = [], 0, 0, 0, 0
  for p, texts, ids, ended in zip(problems, samples["texts"], samples["ids"], samples["ended"]):
    ok = [int(ar.is_correct(t, p.answer)) for t in texts]
    n_correct += sum(ok)
    n_all += len(ok)
    responses, response_ids, ends = list(texts), [list(x) for x in ids], list(ended)
    if not any(ok) and add_reference:
      responses.append(p.cot)
      response_ids.append(None)
      ends.append(True)
      ok.append(1)
      added += 1
    if len(set(ok)) < 2:
      continue
    kept_mixed += 1
    rec = {"prompt": p.question, "responses": responses, "ranks": ok,
           "scores": [float(x) for x in ok], "ended": ends, "band": p.band}
    if all(x is not None for x in response_ids):
      rec["response_ids"] = response_ids
    recs.append(rec)
  return recs, {"problems": len(problems), "sample_accuracy": n_correct / max(n_all, 1),
                "records": kept_mixed, "reference_added": added}


def orm_data_stage(cfg, run_dir: str, progress: bool = True) -> dict:
  from gptjax import pipeline
  c = pipeline.with_run_dir(cfg.orm_data.copy_and_resolve_references(), run_dir)
  policy = load_policy(c.policy)
  out_dir = _dir(run_dir, "orm_data")
  os.makedirs(out_dir, exist_ok=True)
  info = {}
  for split, count in (("train", c.train_problems), ("validation", c.validation_problems)):
    probs = read_problems(_dir(run_dir, "task_data", f"problems_{split}.jsonl"))[:count]
    s = sample(policy, [p.question for p in probs], n=c.samples_per_problem,
               temperature=c.temperature, max_new_tokens=c.max_new_tokens,
               seed=c.seed + (split == "validation"), batch_size=c.batch_size)
    recs, stats = orm_records(probs, s, add_reference=c.add_reference)
    if not recs:
      raise ValueError(f"orm_data: no {split} problem gave both a correct and a wrong reply "
                       f"(sample accuracy {stats['sample_accuracy']:.3f}); set "
                       "orm_data.add_reference=True or sample more replies")
    ar.write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), recs)
    info[split] = stats
    print(f"[orm_data] {split}: {stats['records']} records from {stats['problems']} problems; "
          f"sample accuracy {stats['sample_accuracy']:.3f}", flush=True)
  return info


# --------------------------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------------------------

def table_row(method: str, budget: int, bands: list[str], values, *, family: str = "",
              note: str = "", metric: str = "accuracy") -> dict:
  """A row of the method table from per-problem scores in [0, 1] (1/0 for one answer; a mean
  over subsets for sampled methods), aligned with `bands`. Intervals are Wilson 95% with the
  summed scores as successes (for fractional scores this is a close, slightly wide interval).
  `metric` names what the scores measure when it is not accuracy (e.g. 'format errors': the
  report shows such rows in their own table)."""
  values = np.asarray(values, np.float64)

  def cell(mask):
    n = int(mask.sum())
    s = float(values[mask].sum())
    lo, hi = ar.wilson_interval(s, n)
    acc = s / n if n else None
    if acc is not None:
      # Wilson's bound at s = n (or 0) is 1 (or 0) only up to rounding (6 of 6 gave hi
      # 0.9999999999999999 < acc): the interval must hold its own estimate.
      lo, hi = min(lo, acc), max(hi, acc)
    return {"acc": acc, "lo": lo, "hi": hi, "n": n}

  bands_arr = np.asarray(bands)
  row = {"method": method, "budget": int(budget), "family": family, "note": note,
         "per_band": {b: cell(bands_arr == b) for b in dict.fromkeys(bands)},
         "overall": cell(np.ones(len(values), bool))}
  if metric != "accuracy":
    row["metric"] = metric          # accuracy rows keep the form they always had
  return row


def _traces(problems, texts, values, k: int = 3) -> list[dict]:
  """The first k problems' outputs, plus the first wrong one if none of those is wrong."""
  idx = list(range(min(k, len(problems))))
  wrong = [i for i, v in enumerate(values) if v < 1]
  if wrong and not any(values[i] < 1 for i in idx):
    idx.append(wrong[0])
  return [{"question": problems[i].question, "answer": problems[i].answer, "band": problems[i].band,
           "output": texts[i], "correct": bool(values[i] >= 1)} for i in idx]


def _score_with_rm(rm, policy_tok, questions, ids) -> np.ndarray:
  """ORM scores [Q, n] of sampled completion ids.

  Each distinct (question, completion) is scored once: at a modest temperature many of a
  problem's chains are the same text (most correct ones are), and the RM is a function of the
  text, so the copies take their original's score."""
  p_ids = prompt_ids(questions, policy_tok)
  where, flat_p, flat_c = [], [], []
  first = {}
  for q, row in enumerate(ids):
    for c in row:
      key = (q, tuple(c))
      if key not in first:
        first[key] = len(flat_c)
        flat_p.append(p_ids[q])
        flat_c.append(c)
      where.append(first[key])
  scores = []
  for start in range(0, len(flat_p), 512):
    scores.append(np.asarray(rm(flat_p[start:start + 512], flat_c[start:start + 512])))
  return np.concatenate(scores)[np.asarray(where, np.int64)].reshape(len(ids), -1)


def _draw_pool(e, cot_pol, questions) -> tuple[dict, dict, dict]:
  """The N sampled CoT chains per problem that every sampled method reads: (samples as `sample`
  returns them, the pool kept in reason_eval.json, timings). The pool holds per chain its final
  answer, whether it ended in a well-formed answer line, and its ORM score (when there is an
  outcome RM): what stages that add rows later (check-and-retry) need, without sampling again."""
  timings = {}
  t = time.time()
  s = sample(cot_pol, questions, n=e.samples, temperature=e.temperature,
             max_new_tokens=e.max_new_tokens, seed=e.seed, batch_size=e.batch_size)
  timings["cot_samples_s"] = time.time() - t
  pool = {"answers": answers_of(s["texts"]),
          "formatted": [[ar.has_format(t) for t in row] for row in s["texts"]],
          "orm_scores": None}
  if e.orm and os.path.exists(os.path.join(e.orm, "done.json")):
    t = time.time()
    scores = _score_with_rm(load_reward_scorer(e.orm), cot_pol[2], questions, s["ids"])
    pool["orm_scores"] = [[float(x) for x in row] for row in scores]
    timings["orm_scoring_s"] = time.time() - t
  return s, pool, timings


def evaluate(cfg, run_dir: str) -> dict:
  """Every method on the held-out problems; writes `<run>/reason_eval.json`; see the module doc."""
  from gptjax import pipeline
  e = pipeline.with_run_dir(cfg.reason_eval.copy_and_resolve_references(), run_dir)
  t0 = time.time()
  probs = read_problems(_dir(run_dir, "task_data", "problems_heldout.jsonl"))
  questions = [p.question for p in probs]
  bands = [p.band for p in probs]
  gold = [p.answer for p in probs]
  rows, traces, curves, timings = [], {}, {}, {}
  kw = dict(seed=e.seed, batch_size=e.batch_size)

  def greedy(name, workdir, max_new):
    pol = load_policy(workdir)
    s = sample(pol, questions, n=1, temperature=0.0, max_new_tokens=max_new, **kw)
    texts = [t[0] for t in s["texts"]]
    v = [float(ar.is_correct(t, a)) for t, a in zip(texts, gold)]
    rows.append(table_row(f"{name}, greedy", 1, bands, v, family=name))
    traces[f"{name}, greedy"] = _traces(probs, texts, v)
    return pol, s

  t = time.time()
  greedy("direct", e.direct, e.direct_max_new_tokens)
  cot_pol, _ = greedy("CoT", e.cot, e.max_new_tokens)
  timings["greedy_s"] = time.time() - t

  # N sampled chains per problem from the CoT model; every sampled method reads these same
  # samples, so their differences are the method's, not the draw's.
  n = e.samples
  s, pool, drawn = _draw_pool(e, cot_pol, questions)
  timings.update(drawn)
  answers = pool["answers"]
  correct = [[a == g for a in row] for row, g in zip(answers, gold)]
  rm_scores = None if pool["orm_scores"] is None else np.asarray(pool["orm_scores"])
  ks = [k for k in e.ks if k <= n]
  curve = {"k": ks, "self_consistency": {}, "oracle": {}, "orm": {}}
  per_k = {}
  for k in ks:
    sc = [ar.vote_at_k(a, g, k, draws=e.draws, seed=e.seed + i)
          for i, (a, g) in enumerate(zip(answers, gold))]
    oracle = [ar.pass_at_k(n, int(sum(c)), k) for c in correct]
    per_k[k] = {"self_consistency": sc, "oracle": oracle}
    if rm_scores is not None:
      per_k[k]["orm"] = [ar.best_at_k(r, c, k, draws=e.draws, seed=e.seed + i)
                         for i, (r, c) in enumerate(zip(rm_scores, correct))]
    for what, v in per_k[k].items():
      curve[what][str(k)] = table_row(what, k, bands, v)
  curves["cot_sampling"] = curve
  rows.append(table_row("CoT, 1 sample", 1, bands, [float(np.mean(c)) for c in correct],
                        family="CoT"))
  traces["CoT, 1 sample"] = _traces(probs, [t[0] for t in s["texts"]],
                                    [float(c[0]) for c in correct])
  for k in e.table_ks:
    if k not in per_k:
      continue
    rows.append(table_row(f"self-consistency@{k}", k, bands, per_k[k]["self_consistency"],
                          family="CoT"))
    if "orm" in per_k[k]:
      rows.append(table_row(f"best-of-{k}, ORM", k, bands, per_k[k]["orm"], family="CoT"))
    rows.append(table_row(f"best-of-{k}, oracle verifier", k, bands, per_k[k]["oracle"],
                          family="CoT", note="pass@k, unbiased; the verifier's ceiling"))
  if rm_scores is not None:
    best = [int(np.argmax(r)) for r in rm_scores]
    traces[f"best-of-{n}, ORM"] = _traces(
        probs, [t[b] for t, b in zip(s["texts"], best)],
        [float(c[b]) for c, b in zip(correct, best)])

  # The RL policies: greedy, one sample, and a vote over rl_samples, beside their curves over
  # training on a fixed subset of the held-out problems.
  for name, workdir in e.rl_stages.items():
    if not os.path.exists(os.path.join(workdir, "done.json")):
      continue
    t = time.time()
    pol, _ = greedy(name, workdir, e.max_new_tokens)
    m = e.rl_samples
    rs = sample(pol, questions, n=m, temperature=e.temperature, max_new_tokens=e.max_new_tokens,
                **kw)
    ra = answers_of(rs["texts"])
    rc = [[a == g for a in row] for row, g in zip(ra, gold)]
    # One sample's accuracy, estimated from all m samples (pass@1), as the CoT row is.
    rows.append(table_row(f"{name}, 1 sample", 1, bands, [float(np.mean(c)) for c in rc],
                          family=name))
    rows.append(table_row(f"{name} + self-consistency@{m}", m, bands,
                          [ar.vote_at_k(a, g, m) for a, g in zip(ra, gold)], family=name))
    rows.append(table_row(f"{name}, best-of-{m} oracle verifier", m, bands,
                          [ar.pass_at_k(m, int(sum(c)), m) for c in rc], family=name,
                          note="pass@k"))
    traces[f"{name}, 1 sample"] = _traces(probs, [x[0] for x in rs["texts"]],
                                          [float(c[0]) for c in rc])
    curves[name] = training_curve(cfg, e, name, workdir, probs)
    timings[f"{name}_s"] = time.time() - t
  timings["total_s"] = time.time() - t0
  out = {"bands": list(dict.fromkeys(bands)), "problems": len(probs),
         "train_bands": list(cfg.task_data.train_bands), "samples": n,
         "temperature": e.temperature, "rows": rows, "curves": curves, "traces": traces,
         "timings": timings, "pool": pool}
  # Rows that later stages added (`add_rows`) survive this stage being run again: those stages
  # are complete and will not run again to put them back.
  path = _dir(run_dir, RESULTS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    for row in old.get("rows", []):
      if row.get("stage"):
        out["rows"].append(row)
        if row["method"] in old.get("traces", {}):
          out["traces"][row["method"]] = old["traces"][row["method"]]
    for key, value in old.get("timings", {}).items():
      out["timings"].setdefault(key, value)
  if jax.process_index() == 0:
    _write_json(path, out)
  return out


def add_rows(run_dir: str, stage: str, rows: list[dict], *, traces: dict | None = None,
             timings: dict | None = None) -> dict:
  """Adds the rows of a method measured by a stage of its own (tree search, tools, retrieval,
  ...) to `<run>/reason_eval.json`, so a finished run gains them by running that stage alone
  and the report card shows them with the rest. Rows already there from other stages are kept
  as they are; this stage's earlier rows are replaced. Each row is marked with `stage`.
  Returns the updated results."""
  path = _dir(run_dir, RESULTS_FILE)
  if not os.path.exists(path):
    from gptjax.config import ConfigError
    raise ConfigError(f"pipeline.stages: stage {stage!r} adds rows to {path}, which does not "
                      "exist; run reason_eval before it")
  with open(path) as f:
    res = json.load(f)
  mine = {r["method"] for r in rows}
  clash = [r for r in res["rows"] if r["method"] in mine and r.get("stage") != stage]
  if clash:
    raise ValueError(f"add_rows: stage {stage!r} would replace the row {clash[0]['method']!r} "
                     f"that {clash[0].get('stage') or 'reason_eval'} wrote; name its method "
                     "differently")
  dropped = {r["method"] for r in res["rows"] if r.get("stage") == stage}
  res["rows"] = [r for r in res["rows"] if r["method"] not in dropped]
  res["rows"] += [dict(r, stage=stage) for r in rows]
  res["traces"] = {m: t for m, t in res.get("traces", {}).items() if m not in dropped}
  res["traces"].update(traces or {})
  res.setdefault("timings", {}).update(timings or {})
  if jax.process_index() == 0:
    _write_json(path, res)
  return res


def training_curve(cfg, e, name: str, workdir: str, probs) -> list[dict]:
  """pass@1, pass@k (k = rl_samples) and mean completion tokens of the RL policy at each kept
  checkpoint (and at its start, the CoT SFT model), on the first `curve_problems` held-out
  problems per band, with the training-time reward of the iterations logged up to that step."""
  by_band = {}
  for p in probs:
    by_band.setdefault(p.band, [])
    if len(by_band[p.band]) < e.curve_problems:
      by_band[p.band].append(p)
  subset = [p for group in by_band.values() for p in group]
  m = e.rl_samples
  r = cfg[name].rl
  steps_per_iteration = r.epochs * (r.prompts_per_iteration * r.group_size
                                    // cfg[name].train.batch_size)
  points = [(0, e.cot)] + [(st, workdir) for st in checkpoint_steps(workdir)]
  logged = []
  path = os.path.join(workdir, "rl_iterations.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      logged = [json.loads(l) for l in f if l.strip()]
  out = []
  for step, wd in points:
    pol = load_policy(wd, None if step == 0 else step)
    s = sample(pol, [p.question for p in subset], n=m, temperature=e.temperature,
               max_new_tokens=e.max_new_tokens, seed=e.seed + 17, batch_size=e.batch_size)
    c = [[ar.is_correct(t, p.answer) for t in row] for row, p in zip(s["texts"], subset)]
    p1 = np.asarray([ar.pass_at_k(m, int(sum(x)), 1) for x in c])
    pk = np.asarray([ar.pass_at_k(m, int(sum(x)), m) for x in c])
    se = lambda v: float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    point = {"step": step, "pass@1": float(p1.mean()), "pass@1_se": se(p1),
             f"pass@{m}": float(pk.mean()), f"pass@{m}_se": se(pk),
             "mean_tokens": float(np.mean(s["lengths"])), "problems": len(subset)}
    done = step // steps_per_iteration
    if done and logged:
      # The mean reward of the (up to) three iterations that led to this checkpoint.
      point["train_reward"] = float(np.mean([x["rl/score"] for x in logged[:done]][-3:]))
    out.append(point)
  return out


# --------------------------------------------------------------------------------------------
# Tools in the decode loop.
# --------------------------------------------------------------------------------------------

def tool_data_stage(cfg, run_dir: str, progress: bool = True) -> dict:
  """`<run>/tool_data/sft_tool.jsonl`: the training problems in the `tool` format. A stage of its
  own (not task_data's) so that a run finished before the format existed can gain it; the
  run's tokenizer must encode every record (the format adds no character, so it does)."""
  from gptjax.data.errors import DataError
  probs = read_problems(_dir(run_dir, "task_data", "problems_train.jsonl"))
  tok = tokenizers.load_tokenizer(_dir(run_dir, "tokenizer"))
  recs = ar.sft_records(probs, "tool")
  for i, r in enumerate(recs):
    ids, _ = chat.render(r["messages"], tok)
    if tok.unk_id in ids:
      raise DataError(f"{_dir(run_dir, 'task_data', 'problems_train.jsonl')}:{i + 1}: field "
                      "'question' has a character the run's tokenizer does not know")
  out_dir = _dir(run_dir, "tool_data")
  os.makedirs(out_dir, exist_ok=True)
  ar.write_jsonl(os.path.join(out_dir, "sft_tool.jsonl"), recs)
  calls = [sum("tool_call" in m for m in r["messages"]) for r in recs]
  return {"records": len(recs), "calls": int(sum(calls)),
          "without_calls": int(sum(c == 0 for c in calls))}


def sample_with_tools(policy, questions, *, max_new_tokens: int, seed: int,
                      batch_size: int = 256, max_calls: int = 8) -> dict:
  """Greedy completions with the calculator in the decode loop (`tools.calculator_loop`), one per
  question, by the continuous-batching engine. Prompts are grouped by width as in `sample`, so
  each group gets the new tokens that fit beside its prompts. Returns {'texts' (readable
  transcripts: calls as [calculator: EXPR = RESULT]), 'ids' (tool tokens included), 'calls'
  [(expression, result)] per question, 'tool_tokens' per question, 'ended'}."""
  from gptjax import engine, tools
  model, params, tok = policy
  loop = tools.calculator_loop(tok, max_calls=max_calls)
  stops = chat.reply_stop_ids(tok)
  rows = prompt_ids(questions, tok)
  max_len = model.cfg.resolved().max_len
  widths = [min(-(-len(p) // 16) * 16, max_len - 1) for p in rows]
  too_long = [len(p) for p, w in zip(rows, widths) if len(p) > w]
  if too_long:
    raise ValueError(f"sample_with_tools: a prompt of {max(too_long)} tokens leaves no room in "
                     f"max_len={max_len}")
  ids, injected = [None] * len(rows), [0] * len(rows)
  for g, width in enumerate(sorted(set(widths))):
    members = [i for i, w in enumerate(widths) if w == width]
    arr, lengths = sampling.pad_prompts([rows[i] for i in members], pad_id=tok.pad_id,
                                        width=width)
    stats = engine.EngineStats()
    out = engine.generate(model, params, arr, lengths,
                          rng=jax.random.fold_in(jax.random.key(seed), g),
                          max_new_tokens=min(max_new_tokens, max_len - width), temperature=0.0,
                          eos_ids=stops, pad_id=tok.pad_id, slots=min(batch_size, len(members)),
                          tools=loop, stats=stats)
    comp, n = jax.device_get((out.completion, out.lengths))
    for j, i in enumerate(members):
      ids[i] = [int(t) for t in np.asarray(comp[j])[:int(n[j])]]
      injected[i] = sum(e - s for s, e in stats.tool_spans.get(j, []))
  scripts = [tools.read_transcript(r, tok) for r in ids]
  return {"texts": [t.text for t in scripts], "ids": ids, "calls": [t.calls for t in scripts],
          "tool_tokens": injected, "ended": [bool(r) and r[-1] in stops for r in ids]}


def tool_eval_stage(cfg, run_dir: str, progress: bool = True) -> dict:
  """The tool model, greedy, with the calculator in its decode loop, on the held-out problems:
  the row 'tool, greedy', beside reason_eval's 'CoT, greedy' (the same base, no tool)."""
  from gptjax import pipeline
  e = pipeline.with_run_dir(cfg.tool_eval.copy_and_resolve_references(), run_dir)
  t0 = time.time()
  probs = read_problems(_dir(run_dir, "task_data", "problems_heldout.jsonl"))
  bands = [p.band for p in probs]
  s = sample_with_tools(load_policy(e.policy), [p.question for p in probs],
                        max_new_tokens=e.max_new_tokens, seed=e.seed, batch_size=e.batch_size,
                        max_calls=e.max_calls)
  v = [float(ar.is_correct(t, p.answer)) for t, p in zip(s["texts"], probs)]
  calls = [len(c) for c in s["calls"]]
  failed = sum(r.startswith("error") for c in s["calls"] for _, r in c)
  as_many = sum(len(c) == len(ar.tool_steps(p)) for c, p in zip(s["calls"], probs))
  stats = {"calls_per_problem": float(np.mean(calls)), "failed_calls": int(failed),
           "problems_without_calls": int(sum(c == 0 for c in calls)),
           "problems_with_as_many_calls_as_steps": int(as_many),
           "tool_tokens_per_problem": float(np.mean(s["tool_tokens"])),
           "ended": float(np.mean(s["ended"]))}
  rows = [table_row("tool, greedy", 1, bands, v, family="tool",
                    note=f"calculator in the decode loop; {stats['calls_per_problem']:.2f} calls "
                         f"per problem, {failed} refused")]
  add_rows(run_dir, "tool_eval", rows, traces={"tool, greedy": _traces(probs, s["texts"], v)},
           timings={"tool_greedy_s": time.time() - t0})
  print(f"[tool_eval] accuracy {np.mean(v):.3f}; {stats['calls_per_problem']:.2f} calls per "
        f"problem, {failed} failed", flush=True)
  return {"problems": len(probs), "accuracy": float(np.mean(v)), **stats}


def evaluate_stage(cfg, run_dir: str, progress: bool = True) -> dict:
  res = evaluate(cfg, run_dir)
  return {"problems": res["problems"], "rows": len(res["rows"]), "timings": res["timings"]}


# --------------------------------------------------------------------------------------------
# Stages that add rows (`add_rows`): constrained answer format, and check-and-retry.
# --------------------------------------------------------------------------------------------

def _heldout(run_dir):
  return read_problems(_dir(run_dir, "task_data", "problems_heldout.jsonl"))


def _eval_settings(cfg, run_dir):
  from gptjax import pipeline
  return pipeline.with_run_dir(cfg.reason_eval.copy_and_resolve_references(), run_dir)


def _format_errors(texts) -> list[float]:
  return [float(not ar.has_format(t)) for t in texts]


def answer_format_rows(e, c, probs, policy, pool=None) -> tuple[list, dict]:
  """The CoT model with its reply forced into the answer format (`c.regex`, by default worked
  lines then a final `#### N` line) by constrained decoding, greedy and sampled (`c.samples`
  per problem), beside the same model unconstrained: accuracy rows, and rows of the rate of
  replies without a well-formed final line (metric 'format errors'), per band. The budget part
  of the constraint closes a chain that would run past max_new_tokens with an answer line.
  Unconstrained sampled format errors come from the pooled samples (`pool['formatted']`).
  Returns (rows, traces)."""
  from gptjax import constraints
  model, _, tok = policy
  constraint = constraints.compile(tok, regex=c.regex, vocab_size=model.cfg.resolved().vocab_size,
                                   stop_ids=chat.reply_stop_ids(tok))
  questions = [p.question for p in probs]
  bands, gold = [p.band for p in probs], [p.answer for p in probs]
  kw = dict(max_new_tokens=e.max_new_tokens, seed=e.seed, batch_size=e.batch_size)
  plain = [t[0] for t in sample(policy, questions, n=1, temperature=0.0, **kw)["texts"]]
  forced = [t[0] for t in sample(policy, questions, n=1, temperature=0.0, constraint=constraint,
                                 **kw)["texts"]]
  ok = [float(ar.is_correct(t, g)) for t, g in zip(forced, gold)]
  fmt = dict(family="CoT", metric="format errors")
  rows = [table_row("CoT, greedy, answer format forced", 1, bands, ok, family="CoT",
                    note=f"constrained decoding to {c.regex!r}"),
          table_row("format errors: CoT, greedy", 1, bands, _format_errors(plain), **fmt),
          table_row("format errors: CoT, greedy, answer format forced", 1, bands,
                    _format_errors(forced), **fmt)]
  traces = {"CoT, greedy, answer format forced": _traces(probs, forced, ok)}
  if c.samples:
    texts = sample(policy, questions, n=c.samples, temperature=e.temperature,
                   constraint=constraint, **kw)["texts"]
    ok = [float(np.mean([ar.is_correct(t, g) for t in row])) for row, g in zip(texts, gold)]
    rows.append(table_row("CoT, 1 sample, answer format forced", 1, bands, ok, family="CoT",
                          note=f"mean over {c.samples} constrained samples per problem"))
    traces["CoT, 1 sample, answer format forced"] = _traces(
        probs, [r[0] for r in texts], [float(ar.is_correct(r[0], g)) for r, g in zip(texts, gold)])
    if pool is not None:
      rows.append(table_row("format errors: CoT, 1 sample", 1, bands,
                            [1.0 - float(np.mean(f)) for f in pool["formatted"]], **fmt,
                            note=f"over the {len(pool['formatted'][0])} pooled samples"))
    rows.append(table_row("format errors: CoT, 1 sample, answer format forced", 1, bands,
                          [float(np.mean(_format_errors(r))) for r in texts], **fmt))
  return rows, traces


def _pool(e, run_dir, probs) -> dict:
  """reason_eval's pooled CoT samples; an evaluation written before the pool was kept gets it
  drawn again (the same seed and batches, so the same chains)."""
  with open(_dir(run_dir, RESULTS_FILE)) as f:
    pool = json.load(f).get("pool")
  if pool is None:
    _, pool, _ = _draw_pool(e, load_policy(e.cot), [p.question for p in probs])
    with open(_dir(run_dir, RESULTS_FILE)) as f:
      res = json.load(f)
    if jax.process_index() == 0:
      _write_json(_dir(run_dir, RESULTS_FILE), {**res, "pool": pool})
  return pool


def answer_format_stage(cfg, run_dir: str, progress: bool = True) -> dict:
  e = _eval_settings(cfg, run_dir)
  probs = _heldout(run_dir)
  t = time.time()
  pool = _pool(e, run_dir, probs) if cfg.answer_format.samples else None
  rows, traces = answer_format_rows(e, cfg.answer_format, probs, load_policy(e.cot), pool)
  add_rows(run_dir, "answer_format", rows, traces=traces,
           timings={"answer_format_s": time.time() - t})
  return {"rows": len(rows)}


def check_and_retry(answers, accept, retries: int, per_try: int) -> tuple[list, list]:
  """Check-and-retry over pre-drawn chains, problem by problem: try t reads chain t*per_try as
  its answer; `accept(q, t)` is the judge's verdict on it; the first accepted answer is kept,
  else the last try's (as `prompting.check_and_retry`). Returns (final answers, chains read)."""
  finals, used = [], []
  for q, row in enumerate(answers):
    for t in range(retries + 1):
      answer = row[t * per_try]
      if accept(q, t):
        break
    finals.append(answer)
    used.append((t + 1) * per_try)
  return finals, used


def check_retry_rows(c, pool, probs) -> tuple[list, dict]:
  """Check-and-retry: the CoT model's answer is judged and, when judged wrong, drawn again, up
  to `c.retries` times, reading the pooled chains in order (each an independent sample, so this
  is the sequential procedure without sampling again). Judges:
    rederive  the CoT model solves the problem once more and the answer stands when both
              derivations agree (two chains per try)
    orm       the outcome RM, itself fine-tuned from the CoT model, accepts when its score is
              above `c.orm_threshold` (0 = the average score of the SFT model's own samples on
              training problems, fixed in advance; one chain per try)
  A row's budget is the most chains it may read; its note gives the mean it did read and how
  well the judge judged first tries (precision: accepted answers that are right; recall: wrong
  answers it rejected). Returns (rows, judge statistics)."""
  answers = pool["answers"]
  gold, bands = [p.answer for p in probs], [p.band for p in probs]
  n = len(answers[0])
  rows, info = [], {}
  for judge in c.judges:
    if judge == "rederive":
      per_try = 2
      accept = lambda q, t: (answers[q][2 * t] is not None
                             and answers[q][2 * t + 1] == answers[q][2 * t])
    elif judge == "orm":
      if pool["orm_scores"] is None:
        continue
      per_try = 1
      accept = lambda q, t: pool["orm_scores"][q][t] > c.orm_threshold
    else:
      raise ValueError(f"check_retry.judges: unknown judge {judge!r}; expected 'rederive' or "
                       "'orm'")
    retries = min(c.retries, n // per_try - 1)
    if retries < 1:
      continue
    finals, used = check_and_retry(answers, accept, retries, per_try)
    values = [float(a is not None and a == g) for a, g in zip(finals, gold)]
    first_ok = np.asarray([answers[q][0] == gold[q] for q in range(len(gold))])
    first_accepted = np.asarray([bool(accept(q, 0)) for q in range(len(gold))])
    precision = float(first_ok[first_accepted].mean()) if first_accepted.any() else None
    recall = float((~first_accepted[~first_ok]).mean()) if (~first_ok).any() else None
    stats = {"mean_chains": float(np.mean(used)),
             "first_try_accepted": float(first_accepted.mean()),
             "judge_precision": precision, "judge_recall": recall}
    info[judge] = stats
    show = lambda x: "–" if x is None else f"{x:.2f}"
    rows.append(table_row(
        f"check-and-retry x{retries}, {judge} judge", per_try * (retries + 1), bands, values,
        family="CoT", note=(f"mean chains read {stats['mean_chains']:.2f}; the judge accepts "
                            f"{stats['first_try_accepted']:.2f} of first tries, precision "
                            f"{show(precision)}, rejects {show(recall)} of wrong ones")))
  return rows, info


def check_retry_stage(cfg, run_dir: str, progress: bool = True) -> dict:
  e = _eval_settings(cfg, run_dir)
  probs = _heldout(run_dir)
  t = time.time()
  rows, info = check_retry_rows(cfg.check_retry, _pool(e, run_dir, probs), probs)
  add_rows(run_dir, "check_retry", rows, timings={"check_retry_s": time.time() - t})
  return {"rows": len(rows), "judges": info}


def report_stage(cfg, run_dir: str, progress: bool = True) -> dict:
  """The report card over the run and its extra seeds (`--seeds`), whose reason_eval.json each
  give one run to the seed-pooled cells."""
  from gptjax import reasoning_report
  from gptjax import stage_names
  runs = [run_dir] + [d for d in stage_names.seed_dirs(run_dir).values()
                      if os.path.exists(os.path.join(d, reasoning_report.RESULTS_FILE))]
  return {"report": reasoning_report.write(runs, run_dir)}
