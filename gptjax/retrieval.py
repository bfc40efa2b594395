"""Retrieval on the plays: the question-answering recipe's pipeline stages that do not train.

    gptjax pipeline --config experiments/retrieval_qa.py:tiny --workdir runs/retrieval

Questions with exact answers come from the corpus itself (`gptjax/tasks/plays_qa.py`): "Who says:
'<a line>'?" and "In which play does <a character> appear?". One SFT model learns to answer both
closed-book (the question alone) and with BM25-retrieved passages above the question
(`prompting.BM25` over every line of every play); the evaluation asks it the held-out questions
both ways, and with the passage that holds the answer (the reader's ceiling), and measures the
retriever's hit rate beside them. The training stages are the ordinary runners pointed at the
files written here.

    qa_data_stage    passages, questions (train / held-out, with their retrieved passages), SFT
                     chats in both formats, the plays as pretraining text, the alphabet
    tokenizer_stage  characters of everything above, or a BPE model trained on it
    evaluate_stage   exact match on the held-out questions: `<run>/qa_eval.json`
    report_stage     `<run>/report.md`: the table with 95% intervals, and what it shows
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from gptjax import prompting
from gptjax.tasks import plays_qa as qa

RESULTS_FILE = "qa_eval.json"
MODES = ("closed", "bm25", "gold")


def _dir(run_dir, *parts):
  return os.path.join(run_dir, *parts)


def _write_jsonl(path: str, rows) -> None:
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def _read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def passage_text(p: qa.Passage, max_chars: int) -> str:
  """A passage as a prompt shows it, cut to `max_chars` (its play and speaker come first, so a
  cut loses only the end of a long line)."""
  text = p.render()
  return text if len(text) <= max_chars else text[:max_chars].rstrip() + "…"


def prompt_for(q: dict, mode: str, passages: list[qa.Passage], *, k: int, max_chars: int) -> str:
  """The user turn for question record `q` under `mode`: 'closed' (the question alone), 'bm25'
  (its top-k retrieved passages above it) or 'gold' (the same k passages with the answer's own
  passage among them: where BM25 missed it, it takes the lowest-ranked slot).

  'gold' is the reader's ceiling for this retriever: the prompt keeps the k-passage format the
  model was fine-tuned on, so the row differs from BM25's only where retrieval failed. (The
  answer's passage shown alone is a format SFT never used; on the tiny run the reader scored
  0.38 with it against 0.83 with BM25's three, which measured the format, not the ceiling.)"""
  if mode == "closed":
    return qa.closed_book_prompt(q["question"])
  if mode == "bm25":
    shown = q["retrieved"][:k]
  elif mode == "gold":
    shown = q["retrieved"][:k]
    if not set(shown) & set(q["gold"]):
      shown = shown[:k - 1] + q["gold"][:1]
  else:
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
  return qa.retrieval_prompt(q["question"], [passage_text(passages[i], max_chars) for i in shown])


def _plays(names):
  from gptjax.data import shakespeare
  plays = shakespeare.load_plays()
  if not names:
    return plays
  known = {p.name for p in plays}
  missing = [n for n in names if n not in known]
  if missing:
    from gptjax.config import ConfigError
    raise ConfigError(f"qa_data.plays: unknown play {missing[0]!r}; expected names such as "
                      f"{sorted(known)[:3]}")
  return [p for p in plays if p.name in set(names)]


def write_qa_data(c, out_dir: str) -> dict:
  """The task's files in `out_dir` from the `qa_data` config; returns counts and the
  retriever's hit rate."""
  os.makedirs(out_dir, exist_ok=True)
  plays = _plays(list(c.plays))
  passages = qa.make_passages(plays, lines_per_passage=c.lines_per_passage)
  kw = dict(seed=c.seed, heldout_fraction=c.heldout_fraction, min_words=c.min_words,
            max_chars=c.max_question_chars)
  splits = {"train": qa.generate(passages, list(c.kinds), c.train_per_kind, split="train", **kw),
            "heldout": qa.generate(passages, list(c.kinds), c.heldout_per_kind, split="heldout",
                                   **kw)}
  t = time.time()
  bm25 = prompting.BM25([p.render() for p in passages], k1=c.k1, b=c.b)
  index_s = time.time() - t
  info = {"plays": len(plays), "passages": len(passages), "index_s": index_s}
  records = {}
  for split, qs in splits.items():
    recs = []
    for q in qs:
      r = qa.to_jsonable(q)
      r["retrieved"] = [i for i, _ in bm25.top_k(qa.retrieval_query(q.question), c.k)]
      recs.append(r)
    records[split] = recs
    _write_jsonl(os.path.join(out_dir, f"questions_{split}.jsonl"), recs)
    hits = [bool(set(r["retrieved"]) & set(r["gold"])) for r in recs]
    info[split] = {"questions": len(recs), "recall_at_k": float(np.mean(hits)) if hits else None,
                   "by_kind": {k: sum(r["kind"] == k for r in recs) for k in c.kinds}}
  _write_jsonl(os.path.join(out_dir, "passages.jsonl"),
               ({"play": p.play, "title": p.title, "speaker": p.speaker, "text": p.text}
                for p in passages))
  # SFT: every training question in each format, so the one model answers both ways.
  chats = []
  for r in records["train"]:
    for mode in c.sft_formats:
      chats.append({"messages": [
          {"role": "user", "content": prompt_for(r, mode, passages, k=c.k,
                                                 max_chars=c.passage_chars)},
          {"role": "assistant", "content": r["answer"]}]})
  _write_jsonl(os.path.join(out_dir, "sft.jsonl"), chats)
  # The plays as pretraining text: documents of ~1000 characters cut at speeches, each headed by
  # its play's title, so a closed-book answer has the facts somewhere in the weights.
  docs = []
  for play in plays:
    head, cur = qa.play_title(play.name) + "\n\n", ""
    for s in play.speeches:
      cur += f"{s.speaker}:\n{s.text}\n\n"
      if len(cur) > 1000:
        docs.append(head + cur)
        cur = ""
    if cur:
      docs.append(head + cur)
  _write_jsonl(os.path.join(out_dir, "pretrain_plays.jsonl"), ({"text": d} for d in docs))
  chars = set()
  for d in docs:
    chars |= set(d)
  for ch in chats:
    for m in ch["messages"]:
      chars |= set(m["content"])
  for r in records["heldout"]:
    # The held-out prompts' characters come from the same corpus; adding them keeps a rare
    # character from reading as <unk> in a prompt (no answer is revealed by an alphabet).
    for mode in MODES:
      chars |= set(prompt_for(r, mode, passages, k=c.k, max_chars=c.passage_chars))
  with open(os.path.join(out_dir, "chars.txt"), "w") as f:
    f.write("".join(sorted(chars)))
  info["sft_records"] = len(chats)
  info["pretrain_docs"] = len(docs)
  return info


def qa_data_stage(cfg, run_dir: str, progress: bool = True) -> dict:
  info = write_qa_data(cfg.qa_data, _dir(run_dir, "qa_data"))
  print(f"[qa_data] {info['passages']} passages from {info['plays']} plays; "
        f"{info['train']['questions']} train and {info['heldout']['questions']} held-out "
        f"questions; BM25 recall@{cfg.qa_data.k} on held-out {info['heldout']['recall_at_k']:.3f}",
        flush=True)
  return info


def tokenizer_stage(cfg, run_dir: str, progress: bool = True) -> dict:
  """`tokenizer.kind`: 'char' (the alphabet of qa_data's files) or 'bpe' (SentencePiece with
  `tokenizer.vocab_size` pieces, trained on the pretraining text and the SFT chats)."""
  from gptjax.data import tokenizers
  out = _dir(run_dir, "tokenizer")
  t = cfg.tokenizer
  if t.kind == "char":
    with open(_dir(run_dir, "qa_data", "chars.txt")) as f:
      tok = tokenizers.CharTokenizer.from_text(f.read())
    tok.save(out)
  else:
    from gptjax.data import sentencepiece_tokenizer
    texts = [r["text"] for r in _read_jsonl(_dir(run_dir, "qa_data", "pretrain_plays.jsonl"))]
    texts += [m["content"] for r in _read_jsonl(_dir(run_dir, "qa_data", "sft.jsonl"))
              for m in r["messages"]]
    tok = sentencepiece_tokenizer.train_sentencepiece(texts, vocab_size=t.vocab_size,
                                                      model_type=t.kind, out_dir=out)
  return {"vocab_size": tok.vocab_size}


def evaluate(cfg, run_dir: str) -> dict:
  """Exact match on the held-out questions in every mode of `qa_eval.modes`, greedy, by kind;
  writes `<run>/qa_eval.json` (the reasoning table's row format)."""
  from gptjax import pipeline, reasoning
  e = pipeline.with_run_dir(cfg.qa_eval.copy_and_resolve_references(), run_dir)
  d = cfg.qa_data
  t0 = time.time()
  recs = _read_jsonl(_dir(run_dir, "qa_data", "questions_heldout.jsonl"))
  passages = [qa.Passage(**p) for p in _read_jsonl(_dir(run_dir, "qa_data", "passages.jsonl"))]
  kinds = [r["kind"] for r in recs]
  policy = reasoning.load_policy(e.policy)
  labels = {"closed": "closed-book", "bm25": f"BM25 top-{d.k} passages in the prompt",
            "gold": f"BM25 top-{d.k} with the answer's passage ensured"}
  rows, traces, timings = [], {}, {}
  max_len = policy[0].cfg.resolved().max_len
  for mode in e.modes:
    t = time.time()
    prompts = [prompt_for(r, mode, passages, k=d.k, max_chars=d.passage_chars) for r in recs]
    # The sampler gives each prompt the new tokens its padded width leaves; a reply cut short
    # would read as a wrong answer, so a window too small is an error, not a lower score.
    longest = max(len(x) for x in reasoning.prompt_ids(prompts, policy[2]))
    width = -(-longest // e.width_bucket) * e.width_bucket
    if width + e.max_new_tokens > max_len:
      from gptjax.config import ConfigError
      raise ConfigError(f"qa_eval: a {mode} prompt of {longest} tokens (padded to {width}) and "
                        f"qa_eval.max_new_tokens={e.max_new_tokens} exceed the model's max_len="
                        f"{max_len}; lower qa_data.passage_chars or qa_data.k, or train a "
                        "longer window")
    s = reasoning.sample(policy, prompts, n=1, temperature=0.0, max_new_tokens=e.max_new_tokens,
                         seed=e.seed, batch_size=e.batch_size, width_bucket=e.width_bucket)
    replies = [x[0] for x in s["texts"]]
    values = [float(qa.exact_match(x, r["answer"])) for x, r in zip(replies, recs)]
    name = f"{labels[mode]}, greedy"
    note = {"gold": "the reader's ceiling: where BM25 missed the answer's passage, it replaces "
                    "the last one retrieved"}.get(mode, "")
    rows.append(reasoning.table_row(name, 1, kinds, values, family="SFT", note=note))
    traces[name] = [{"question": r["question"], "answer": r["answer"], "band": r["kind"],
                     "output": x, "correct": bool(v)}
                    for r, x, v in list(zip(recs, replies, values))[:4]]
    timings[f"{mode}_s"] = time.time() - t
  hits = [float(bool(set(r["retrieved"][:d.k]) & set(r["gold"]))) for r in recs]
  rows.append(reasoning.table_row(f"BM25 recall@{d.k} (the answer's passage retrieved)", d.k,
                                  kinds, hits, family="retriever",
                                  note="the retriever alone: no model; bounds the BM25 row"))
  timings["total_s"] = time.time() - t0
  out = {"bands": list(dict.fromkeys(kinds)), "problems": len(recs), "rows": rows,
         "traces": traces, "timings": timings, "k": d.k}
  if jax.process_index() == 0:
    with open(_dir(run_dir, RESULTS_FILE), "w") as f:
      json.dump(out, f, indent=2)
  return out


def evaluate_stage(cfg, run_dir: str, progress: bool = True) -> dict:
  res = evaluate(cfg, run_dir)
  acc = {r["method"]: r["overall"]["acc"] for r in res["rows"]}
  print("[qa_eval] " + "; ".join(f"{m} {a:.3f}" for m, a in acc.items()), flush=True)
  return {"problems": res["problems"], "accuracy": acc, "timings": res["timings"]}


def write_report(run_dirs, out_dir: str | None = None) -> str:
  """`report.md`: the table (exact match by question kind), notes, the claim that retrieval
  beats closed book band by band as the intervals support it, and a few traces. `run_dirs` is a
  run or a list of runs (training seeds, `--seeds`): with one, a cell is the accuracy with its
  Wilson 95% interval; with several, the mean over runs with a 95% t-interval of the run means
  (`reasoning_report.summarise`). Traces and timings are the first run's."""
  from gptjax import reasoning_report as rr
  run_dirs = [run_dirs] if isinstance(run_dirs, str) else list(run_dirs)
  results = []
  for d in run_dirs:
    with open(_dir(d, RESULTS_FILE)) as f:
      results.append(json.load(f))
  res = results[0]
  out_dir = out_dir or run_dirs[0]
  os.makedirs(out_dir, exist_ok=True)
  bands = res["bands"]
  names = [r["method"] for r in res["rows"]]
  closed = next((m for m in names if m.startswith("closed-book")), None)
  if len(results) == 1:
    cell = "A cell is exact-match accuracy [Wilson 95% interval]."
  else:
    cell = (f"{len(results)} training seeds of the SFT model (one pretrained base): a cell is "
            "the mean exact-match accuracy over the seeds [95% t-interval of the seed means]; "
            "each seed's table is its own run's qa_eval.json.")
  lines = ["# Retrieval report card: questions on the plays", "",
           f"{res['problems']} held-out questions with exact answers made from the corpus "
           f"({', '.join(bands)}); one SFT model, greedy, asked each question closed-book and "
           f"with the top {res['k']} BM25 passages above it. {cell}", "",
           rr.table_markdown(results, bands), ""]
  notes = rr.row_notes(results)
  if notes:
    lines += ["Notes on rows:", "", *notes, ""]
  lines += ["## What holds at this scale", ""]
  for m in names:
    if m == closed or closed is None or m.startswith("BM25 recall"):
      continue
    verdict = {b: rr.compare(results, m, closed, b) for b in ["all"] + bands}
    parts = [f"{v} on {', '.join(k for k, x in verdict.items() if x == v)}"
             for v in ("better", "worse", "no clear difference") if v in verdict.values()]
    lines.append(f"- **{m}** against {closed}: " + "; ".join(parts) + ".")
  lines += ["", "## Traces" + (" (the first seed)" if len(results) > 1 else ""), ""]
  for method, traces in res["traces"].items():
    lines += [f"### {method}", ""]
    for t in traces:
      mark = "correct" if t["correct"] else f"wrong (answer {t['answer']})"
      lines += [f"*{t['band']}*, {mark}: {t['question']}", "", "```", t["output"] or "(empty)",
                "```", ""]
  lines += ["## Evaluation time", "",
            ", ".join(f"{k} {v:.0f} s" for k, v in res["timings"].items()), ""]
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def report_stage(cfg, run_dir: str, progress: bool = True) -> dict:
  """The report card over the run and its extra seeds (`--seeds`) whose evaluation finished."""
  from gptjax import stage_names
  runs = [run_dir] + [d for d in stage_names.seed_dirs(run_dir).values()
                      if os.path.exists(os.path.join(d, RESULTS_FILE))]
  return {"report": write_report(runs)}
