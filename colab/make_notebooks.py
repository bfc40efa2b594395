"""Writes the Colab notebooks in this folder from the cell sources below.

    python colab/make_notebooks.py

The notebooks only call the library. Each starts with an install cell and picks a preset from the
accelerator it finds; `GPTJAX_NOTEBOOK_SMOKE=1` selects the `micro` preset, which is how the test
suite executes every notebook headlessly on CPU. All notebooks share one run directory
(`GPTJAX_RUN_DIR`, default `runs/colab`), so a later notebook reuses the stages an earlier one
finished.
"""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

# Where the notebooks install gptjax from in Colab. A fork changes this one line (and the badge).
REPO_URL = "https://github.com/gptjax/gptjax"

INSTALL = f'''# Install gptjax: from the checkout this notebook sits in when there is one, else cloned from
# REPO_URL (Colab). On a TPU runtime without libtpu, the `tpu` extra adds `jax[tpu]`; a runtime
# whose jax already drives its accelerator keeps that jax. GPTJAX_REINSTALL=1 reinstalls.
REPO_URL = "{REPO_URL}"
import glob, importlib.util, os, subprocess, sys

def local_checkout(start="."):
    d = os.path.abspath(start)
    for _ in range(3):
        if os.path.exists(os.path.join(d, "setup.py")) and os.path.isdir(os.path.join(d, "gptjax")):
            return d
        d = os.path.dirname(d)
    return None

def on_tpu():
    return bool(os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_ACCELERATOR_TYPE")
                or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))

CLONE = os.path.abspath("gptjax")          # where Colab's copy goes (the notebook's folder)
REPO = os.environ.get("GPTJAX_REPO") or local_checkout() or local_checkout(CLONE)
if importlib.util.find_spec("gptjax") is None or os.environ.get("GPTJAX_REINSTALL") == "1":
    if REPO is None:
        subprocess.check_call(["git", "clone", "--depth", "1", REPO_URL, CLONE])
        REPO = CLONE
    extra = "[tpu]" if on_tpu() and importlib.util.find_spec("libtpu") is None else ""
    command = [sys.executable, "-m", "pip", "install", "-q", "-e", REPO + extra]
    print("installing:", " ".join(command[2:]))
    subprocess.check_call(command)
    importlib.invalidate_caches()
if REPO and REPO not in sys.path:
    sys.path.insert(0, REPO)'''

BADGE = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
         "(https://colab.research.google.com/github/{repo}/blob/main/colab/{name}.ipynb)")

DETECT = '''# Which accelerator is here? The preset follows it: TPU, GPU, or the CPU-sized `tiny`.
import jax
platform = jax.devices()[0].platform
SMOKE = os.environ.get("GPTJAX_NOTEBOOK_SMOKE") == "1"      # CI: the seconds-long `micro` preset
PRESET = "micro" if SMOKE else {"tpu": "tpu", "gpu": "gpu"}.get(platform, "tiny")
RUN = os.path.abspath(os.environ.get("GPTJAX_RUN_DIR", "runs/colab"))
print(f"{jax.device_count()} {platform} device(s); preset {PRESET}; run directory {RUN}")'''

RUN_STAGES = '''from gptjax import config, pipeline
def run_stages(*stages, overrides=()):
    """Runs the pipeline up to these stages; completed stages are skipped, partial ones resumed."""
    cfg = config.load(os.path.join(REPO, f"experiments/shakespeare_assistant.py:{PRESET}"),
                      [f"pipeline.stages={tuple(stages)!r}", *overrides])
    assert pipeline.run(cfg, RUN, progress=not SMOKE) == 0
    return cfg'''

PLOT = '''import json
import matplotlib.pyplot as plt
def curves(stage, keys):
    rows = [json.loads(l) for l in open(os.path.join(RUN, stage, "metrics.jsonl"))]
    fig, ax = plt.subplots(figsize=(6, 3))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        if pts:
            ax.plot(*zip(*pts), label=k)
    ax.set_xlabel("step"); ax.legend(); ax.set_title(stage); plt.show()'''


def notebook(title, intro, cells):
  nb = new_notebook()
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  nb.metadata["accelerator"] = "TPU"
  nb.cells = [new_markdown_cell(f"# {title}\n\n{intro}"), new_code_cell(INSTALL),
              new_code_cell(DETECT), new_code_cell(RUN_STAGES), new_code_cell(PLOT)]
  nb.cells += [new_code_cell(c) for c in cells]
  return nb


NOTEBOOKS = {
    "01_pretrain": notebook(
        "01 · Pretraining a base model",
        "Stage 1 of the recipe: train a SentencePiece tokenizer on Shakespeare's plays, then a GPT "
        "on next-token prediction. The base model continues documents; it does not answer.",
        ['cfg = run_stages("tokenizer", "pretrain")',
         'curves("pretrain", ["train/loss", "eval/loss"])',
         '''# Sample from the base model with the library's sampler.
from gptjax import checkpoint, sampling
model, params, tok = checkpoint.load_for_inference(os.path.join(RUN, "pretrain"))[:3]
prompts = ["ROMEO:\\n", "HAMLET:\\n"]
replies, _ = sampling.sample_replies(model, params, [tok.encode(p) for p in prompts], seed=0,
                                     max_new_tokens=40, pad_id=tok.pad_id, eos_ids=())
for p, c in zip(prompts, replies):
    print(p + tok.decode(c), "\\n---")''']),
    "02_sft": notebook(
        "02 · Supervised finetuning: from base model to assistant",
        "A speech from a play is the user's turn and the next speaker's reply the assistant's. The "
        "loss covers only the assistant's tokens and its end-of-turn marker, so the model learns to "
        "answer and to stop.",
        ['cfg = run_stages("tokenizer", "pretrain", "sft")',
         'curves("sft", ["train/loss", "eval/loss"])',
         '''ev = json.load(open(os.path.join(RUN, "sft", "eval.json")))
print({k: v for k, v in ev.items() if isinstance(v, (int, float))})''',
         '''print(open(os.path.join(RUN, "sft", "samples.md")).read()[:3000])''']),
    "03_reward_model": notebook(
        "03 · The reward model",
        "The SFT model samples several replies per prompt; a simulated labeler (VADER sentiment "
        "with Bradley–Terry noise) prefers the kinder one; a GPT with a scalar head learns those "
        "preferences. Best-of-N then reranks samples with it.",
        ['cfg = run_stages("tokenizer", "pretrain", "sft", "rm_data", "reward")',
         'curves("reward", ["train/loss", "rm/accuracy"])',
         '''ev = json.load(open(os.path.join(RUN, "reward", "eval.json")))
print({k: v for k, v in ev.items() if isinstance(v, (int, float))})
bon = ev.get("best_of_n")
if bon:
    ns = sorted(int(n) for n in bon["mean_gold"])
    plt.plot(ns, [bon["mean_gold"][str(n)] for n in ns], marker="o", label="RM picks")
    plt.plot(ns, [bon["oracle_gold"][str(n)] for n in ns], ls="--", label="oracle")
    plt.xscale("log", base=2); plt.xlabel("N"); plt.ylabel("gold score"); plt.legend(); plt.show()''',
         '''# Score two replies to the same prompt with the trained reward model.
from gptjax.reward_model import load_reward_model
from gptjax.data import chat
scorer = load_reward_model(os.path.join(RUN, "reward"))
tok = scorer.tokenizer
prompt = chat.render_prompt([{"role": "user", "content": "How fares my lord?"}], tok)
replies = ["I thank you, good friend; I am well and glad.", "Villain, I hate thee; a plague on thee!"]
print(scorer([prompt, prompt], [tok.encode(r) for r in replies]))''']),
    "04_rlhf": notebook(
        "04 · RLHF: PPO, GRPO and DPO",
        "PPO optimises the SFT policy against the reward model with a KL penalty to SFT. GRPO and "
        "DPO are the same loop with another loss and batch type. `ppo_beta0` is PPO without the "
        "KL penalty, to watch the policy over-optimise the reward model. The comparison step "
        "scores every stage on the same held-out prompts with the gold labeler and the RM.",
        ['cfg = run_stages("tokenizer", "pretrain", "sft", "rm_data", "reward", "ppo", "grpo", "dpo", '
         '"ppo_beta0", "compare", "report")',
         'curves("ppo", ["rl/score", "rl/gold_score", "rl/kl"])',
         'curves("grpo", ["rl/score", "rl/gold_score", "rl/kl"])',
         'curves("dpo", ["train/loss", "dpo/accuracy"])',
         '# The proxy (RM) and the gold without the KL penalty, and how the RM ranks the samples.\n'
         'curves("ppo_beta0", ["rl/score", "rl/gold_score", "rl/proxy_gold_spearman"])',
         '''cmp = json.load(open(os.path.join(RUN, "compare.json")))
for name, p in cmp["policies"].items():
    print(f"{name:12s} gold {p['gold_mean']:+.3f} ± {p['gold_se']:.3f}   RM {p['proxy_mean']:+.2f}"
          f"   KL to SFT {p['kl_to_sft']}   distinct-2 {p['distinct_2']:.3f}")''',
         '''from IPython.display import Markdown, display
display(Markdown(open(os.path.join(RUN, "report.md")).read()))''']),
    "05_using_the_model": notebook(
        "05 · Using the model",
        "How to use an assistant beyond sampling one reply: the sampler's controls, "
        "chain-of-thought, self-consistency and best-of-N; a calculator called inside the decode "
        "loop; constrained decoding to a regular expression or a JSON schema; tree-of-thought "
        "search; check-and-retry; and retrieval. The models are the arithmetic recipe's (notebook "
        "06 measures every method on them): on a task with one exact answer, what each technique "
        "does can be checked. Only the stages used here run, and notebook 06 reuses them.",
        ['''# The arithmetic recipe's models: a direct and a chain-of-thought (CoT) SFT model, a model
# trained to call a calculator, and the outcome reward model (ORM). Finished stages are skipped.
REASON_RUN = os.path.abspath(os.environ.get("GPTJAX_REASONING_RUN_DIR",
                                            os.path.join(RUN, "reasoning")))
USED = ("task_data", "tokenizer", "pretrain", "sft_direct", "sft_cot", "tool_data", "sft_tool",
        "orm_data", "orm")
rcfg = config.load(os.path.join(REPO, "experiments/arithmetic_reasoning.py:" +
                                ("micro" if SMOKE else "tiny")), [f"pipeline.stages={USED!r}"])
assert pipeline.run(rcfg, REASON_RUN, progress=not SMOKE) == 0

import numpy as np
from gptjax import prompting, reasoning
from gptjax.data import chat
from gptjax.tasks import arithmetic as ar
cot = reasoning.load_policy(os.path.join(REASON_RUN, "sft_cot"))
direct = reasoning.load_policy(os.path.join(REASON_RUN, "sft_direct"))
orm = reasoning.load_reward_scorer(os.path.join(REASON_RUN, "orm"))
held_out = reasoning.read_problems(os.path.join(REASON_RUN, "task_data", "problems_heldout.jsonl"))
problems = held_out[:4]
questions = [p.question for p in problems]
NEW = rcfg.reason_eval.max_new_tokens
for p in problems:
    print(f"{p.band:10s} {p.question}  -> {p.answer}")''',
         '''# Sampling controls, on the CoT model: temperature (0 = greedy), top-k, top-p, min-p.
model, params, tok = cot
gen = prompting.make_text_generator(model, params, tok, seed=0, max_new_tokens=NEW)
problem = problems[0]
ask = f"<|user|>{problem.question}<|end|><|assistant|>"      # the chat template's prompt
for controls in [dict(temperature=0.0), dict(temperature=0.7, top_k=20),
                 dict(temperature=1.0, top_p=0.9), dict(temperature=1.0, min_p=0.1)]:
    print(controls, "->", repr(gen([ask], 1, **controls)[0][0]))
# The direct model answers at once; the CoT model writes its working first, then `#### N`.
dgen = prompting.make_text_generator(*direct, seed=0, max_new_tokens=16)
print("direct:", dgen([ask], 1, temperature=0.0)[0][0], "| gold:", problem.answer)''',
         '''# Self-consistency: sample several chains and vote over their final answers. Best-of-N: keep
# the chain the outcome RM scores highest.
def final(text):
    answer = ar.extract_final(text)
    return None if answer is None else str(answer)
vote = prompting.self_consistency(gen, [ask], n=8, temperature=1.0, extract=final)[0]
print("answers", vote.answers, "-> vote", vote.answer, "| gold", problem.answer)
end = tok.special_ids["<|end|>"]
def orm_scorer(prompt, completions):
    ids = chat.render_prompt(problem.question, tok)
    return orm([ids] * len(completions), [tok.encode(c) + [end] for c in completions])
ranked = prompting.best_of_n(gen, [ask], n=8, scorer=orm_scorer, temperature=1.0)[0]
print("ORM scores", np.round(ranked.scores, 2), "-> best", final(ranked.best))''',
         '''# A calculator inside the decode loop. The tool model writes `<|tool_call|>347*86<|end|>`; the
# engine pauses that row, runs the calculator on the host, appends `<|tool_result|>...` to the
# same KV cache (nothing is prefilled again) and the row goes on; other rows keep decoding.
from gptjax import engine, sampling, tools
tmodel, tparams, ttok = reasoning.load_policy(os.path.join(REASON_RUN, "sft_tool"))
prompts, lengths = sampling.pad_prompts(reasoning.prompt_ids(questions, ttok), pad_id=ttok.pad_id)
stats = engine.EngineStats()
out = engine.generate(tmodel, tparams, prompts, lengths, rng=0, max_new_tokens=NEW,
                      temperature=0.0, eos_ids=chat.reply_stop_ids(ttok), pad_id=ttok.pad_id,
                      tools=tools.calculator_loop(ttok), stats=stats)
for i, p in enumerate(problems):
    t = tools.read_transcript(np.asarray(out.completion[i])[:int(out.lengths[i])], ttok)
    print(p.question, "\\n  " + t.text.replace("\\n", "\\n  "), "\\n  calls:", t.calls,
          "| correct:", ar.is_correct(t.text, p.answer))
print("tool calls", stats.tool_calls, "| where the tool's tokens are:", stats.tool_spans)
# On the command line: gptjax chat --tools calculator, or gptjax sample --chat --tools calculator''',
         '''# Constrained decoding: a token mask from a regular expression (or a JSON schema), applied in
# the compiled decode loop. Forced into the answer format, every reply ends with `#### N`.
from gptjax import constraints
fmt = constraints.compile(tok, regex=r"([^#\\n][^\\n]*\\n)*#### -?[0-9]+",
                          vocab_size=model.cfg.resolved().vocab_size,
                          stop_ids=chat.reply_stop_ids(tok))
for name, forced in (("free", None), ("constrained", fmt)):
    s = reasoning.sample(cot, questions, n=2, temperature=1.0, max_new_tokens=NEW, seed=0,
                         batch_size=8, constraint=forced)
    ok = [ar.has_format(t) for row in s["texts"] for t in row]
    print(f"{name:12s} well-formed {sum(ok)}/{len(ok)}", repr(s["texts"][0][0][-40:]))
# A JSON schema compiles through its regex. This character vocabulary has no braces or quotes,
# so here the direct model's reply is held to a JSON integer.
print(constraints.regex_from_schema({"type": "object", "required": ["answer"],
                                     "properties": {"answer": {"type": "integer"}}}))
dmodel, dparams, dtok = direct
as_json = constraints.compile(dtok, json_schema={"type": "integer"},
                              vocab_size=dmodel.cfg.resolved().vocab_size,
                              stop_ids=chat.reply_stop_ids(dtok))
s = reasoning.sample(direct, questions, n=1, temperature=1.0, max_new_tokens=16, seed=0,
                     batch_size=8, constraint=as_json)
print([json.loads(row[0]) for row in s["texts"]], "| gold", [p.answer for p in problems])''',
         '''# Tree-of-thought search: expand `branch` sampled next lines of each chain, score the partial
# chains with the outcome RM, keep the best (beam search; best_first_search is the other).
from gptjax import search
tc = rcfg.tot_eval
ids = reasoning.prompt_ids(questions, tok)
expand = search.model_expand(cot, ids, branch=tc.branch, temperature=tc.temperature,
                             max_step_tokens=tc.max_step_tokens, max_chain_tokens=NEW, seed=0,
                             batch_size=16)
outcomes = search.beam_search(len(problems), expand=expand,
                              score=search.reward_score(orm, ids, batch_size=16),
                              beam_width=tc.beam_width, max_depth=tc.max_depth)
for p, o in zip(problems, outcomes):
    print(p.question, f"| {o.tokens} tokens generated | correct:",
          ar.is_correct(o.best.text, p.answer))
    print("  " + o.best.text.replace("\\n", "\\n  "))''',
         '''# Check-and-retry: judge the answer and draw again when the judge rejects it. Judges: the ORM
# (a score above 0) and re-derivation (a second chain must reach the same answer).
def orm_judge(prompt, completion):
    return float(orm_scorer(prompt, [completion])[0]) > 0
def rederive_judge(prompt, completion):
    again = gen([prompt], 1, temperature=1.0)[0][0]
    return final(completion) is not None and final(again) == final(completion)
for name, judge in (("orm", orm_judge), ("rederive", rederive_judge)):
    checked = prompting.check_and_retry(gen, ask, check=judge, max_tries=3, temperature=1.0)
    print(f"{name:9s} tries {checked.tries}, accepted {checked.ok}, answers",
          [final(c) for c, _ in checked.history], "| gold", problem.answer)
# Notebook 06's table measures this on every held-out problem (the check_retry rows).''',
         '''# Retrieval on the plays: questions with exact answers made from the corpus, and BM25 over
# every line of every play. The recipe experiments/retrieval_qa.py trains a model to answer them
# closed-book and with the retrieved passages in its prompt, and measures both.
from gptjax.data import shakespeare
from gptjax.tasks import plays_qa as qa
passages = qa.make_passages(shakespeare.load_plays(), lines_per_passage=1)
bm25 = prompting.BM25([p.render() for p in passages])
for q in qa.generate(passages, qa.KINDS, 2, split="heldout", seed=0):
    hits = [i for i, _ in bm25.top_k(qa.retrieval_query(q.question), 3)]
    print(q.question, "->", q.answer, "| its passage retrieved:", bool(set(hits) & set(q.gold)))
print(qa.retrieval_prompt(q.question, [passages[i].render() for i in hits]))''']),
    "06_reasoning": notebook(
        "06 · Reasoning you can check: arithmetic with a verifier",
        "An embedded arithmetic task with one exact answer per problem. From one base model, SFT "
        "a *direct* and a *chain-of-thought* model; sample several chains and vote; rerank with "
        "an outcome reward model or the verifier; train with GRPO on the verifier's reward and "
        "PPO against the outcome RM. Every method is measured on the same held-out problems, by "
        "difficulty band, including bands harder than any seen in training.",
        ['''# The task: a seeded generator, two target formats, and a verifier that reads `#### N`.
from gptjax.tasks import arithmetic as ar
for p in ar.generate(["add-3d", "mul-2d", "word-2s"], 1, split="train", seed=0):
    print(p.question, "\\n" + p.cot, "\\n")
for messy in ["#### 1,234 apples", "the answer is 7", "3+4=7\\n#### 7\\n#### 8"]:
    print(repr(messy), "->", ar.extract_final(messy))''',
         '''# The whole recipe: task files, tokenizer, pretraining, two SFT models, the outcome RM, GRPO
# and PPO, then every method on the held-out problems. Completed stages are skipped.
REASON_RUN = os.path.abspath(os.environ.get("GPTJAX_REASONING_RUN_DIR",
                                            os.path.join(RUN, "reasoning")))
rcfg = config.load(os.path.join(REPO, "experiments/arithmetic_reasoning.py:" +
                                ("micro" if SMOKE else "tiny")))
assert pipeline.run(rcfg, REASON_RUN, progress=not SMOKE) == 0''',
         '''# The table: methods x difficulty bands, accuracy [95% interval], all bands pooled here.
res = json.load(open(os.path.join(REASON_RUN, "reason_eval.json")))
for row in res["rows"]:
    c = row["overall"]
    print(f"{row['method']:40s} budget {row['budget']:2d}  {c['acc']:.2f} "
          f"[{c['lo']:.2f}, {c['hi']:.2f}]")''',
         '''# Self-consistency by hand: sample chains from the CoT model and vote over their answers.
from gptjax import reasoning
policy = reasoning.load_policy(os.path.join(REASON_RUN, "sft_cot"))
held_out = reasoning.read_problems(os.path.join(REASON_RUN, "task_data",
                                                "problems_heldout.jsonl"))
problem = held_out[0]
s = reasoning.sample(policy, [problem.question], n=8, temperature=1.0, max_new_tokens=48,
                     seed=0, batch_size=8)
answers = reasoning.answers_of(s["texts"])[0]
print(problem.question, "-> answer", problem.answer)
print("sampled answers", answers, "-> vote", ar.majority_vote(answers))''',
         '''# GRPO's training reward (the verifier's, on training prompts) and response length.
rows = [json.loads(l) for l in open(os.path.join(REASON_RUN, "grpo_cot", "rl_iterations.jsonl"))]
fig, ax = plt.subplots(1, 2, figsize=(8, 3))
ax[0].plot([r["rl/score"] for r in rows]); ax[0].set_title("reward (pass@1, train prompts)")
ax[1].plot([r["rl/completion_length"] for r in rows]); ax[1].set_title("response tokens")
for a in ax: a.set_xlabel("iteration")
plt.show()''',
         '''from IPython.display import Markdown, display
display(Markdown(open(os.path.join(REASON_RUN, "report.md")).read()))''']),
}


def main():
  for name, nb in NOTEBOOKS.items():
    badge = BADGE.format(repo=REPO_URL.removeprefix("https://github.com/"), name=name)
    title, _, intro = nb.cells[0].source.partition("\n\n")
    nb.cells[0].source = f"{title}\n\n{badge} · source: {REPO_URL}\n\n{intro}"
    for i, cell in enumerate(nb.cells):
      cell.id = f"cell-{i}"          # stable ids: regenerating changes only what changed
    nbformat.write(nb, os.path.join(HERE, f"{name}.ipynb"))
    print("wrote", name)


if __name__ == "__main__":
  main()
