"""Retrieval on the plays: exact-answer questions made from the corpus, answered closed-book and
with BM25-retrieved passages in the prompt, by one SFT model.

    gptjax pipeline --config experiments/retrieval_qa.py:tiny --workdir runs/retrieval --seeds 0,1,2

Stages (the training ones are ordinary runners pointed at the task's files; `{run}` is the run
directory):

    qa_data     passages (every line of every play, with its play and speaker), questions
                ("Who says: '<line>'?", "In which play does <character> appear?"; train and
                held-out split by a hash of the question) with their BM25 passages, SFT chats
                in both formats, the plays as pretraining text (gptjax/tasks/plays_qa.py)
    tokenizer   BPE on that text (tiny) or its characters (micro)
    pretrain    the base model on the plays, each document headed by its play's title (tiny)
    sft_qa      SFT on every training question twice: closed-book and with its passages
    qa_eval     exact match on the held-out questions: closed-book, with BM25's passages, and
                with the answer's own passage (the reader's ceiling), plus BM25's hit rate
    report      <run>/report.md (gptjax/retrieval.py)

Presets: `micro` (tests: three plays, no pretraining, seconds per stage; the numbers mean
nothing) and `tiny` (2 CPU cores: about 28 minutes for the first seed and 20 for each further
one on a shared host; figures in README and benchmarks/RESULTS.md).
"""

import ml_collections

from . import common
from . import sft as sft_exp

PRESETS = ("micro", "tiny")


def qa_data(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(dict(
      plays=(),                        # file stems of the plays to use (empty: all 38)
      kinds=("who-says", "which-play"),
      lines_per_passage=1, passage_chars=120, min_words=6, max_question_chars=80,
      train_per_kind=3000, heldout_per_kind=200, heldout_fraction=0.2,
      k=3, k1=1.5, b=0.75,             # passages per prompt; BM25's parameters
      sft_formats=("closed", "bm25"),
      seed=0))
  if preset == "micro":
    c.update(plays=("hamlet", "macbeth", "the-tempest"), passage_chars=60,
             max_question_chars=60, train_per_kind=24, heldout_per_kind=6, k=2)
  return c


def model_size(c, preset: str) -> None:
  if preset == "micro":
    c.model.update(num_layers=2, num_heads=2, d_model=32, max_len=256)
  else:
    # 320 tokens: three passages of up to 120 characters and an 80-character quote, in BPE
    # pieces, with room for the reply.
    c.model.update(num_layers=4, num_heads=4, d_model=128, max_len=320)
  c.data.seq_len = c.model.max_len


def pretrain_config(preset: str):
  c = common.base_config()
  c.stage = "pretrain"
  model_size(c, preset)
  c.data.source = "text_files:{run}/qa_data/pretrain_plays.jsonl"
  c.train.sample_prompts = ("Hamlet\n\nHAMLET:\n",)
  c.train.update(steps=800, batch_size=16, log_every=25, eval_every=400, eval_batches=4,
                 sample_every=0, checkpoint_every=400)
  c.optim.update(lr=2e-3, warmup_steps=80)
  return c


def sft_config(preset: str):
  c = sft_exp.get_config(preset)
  model_size(c, preset)
  c.data.source = "chat_jsonl:{run}/qa_data/sft.jsonl"
  c.data.val_fraction = 0.05
  c.sft.update(eval_prompts=0, show_samples=4, reply_tokens=32)
  if preset == "micro":
    # No pretraining: a fresh model, one evaluation and one checkpoint at the end.
    c.train.update(init_from="", eval_every=6, checkpoint_every=6)
  else:
    c.train.update(init_from="{run}/pretrain", steps=600, batch_size=16, log_every=20,
                   eval_every=300, eval_batches=4, checkpoint_every=300)
    c.optim.update(lr=1e-3, warmup_steps=30)
  return c


def qa_eval(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(dict(
      policy="{run}/sft_qa", modes=("closed", "bm25", "gold"), max_new_tokens=32,
      batch_size=256, width_bucket=32, seed=0))
  if preset == "micro":
    c.update(batch_size=32, max_new_tokens=24)
  return c


def get_config(arg=None):
  preset = arg or "tiny"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.pipeline = ml_collections.ConfigDict()
  c.pipeline.stages = (("qa_data", "tokenizer", "sft_qa", "qa_eval", "report") if preset == "micro"
                       else ("qa_data", "tokenizer", "pretrain", "sft_qa", "qa_eval", "report"))
  # `--seeds 0,1,2` trains and evaluates the SFT model again per seed from the one base (the
  # questions, passages and tokenizer are the task, not the method), and the report pools them.
  c.pipeline.seeds = ()
  c.pipeline.seeded_stages = ("sft_qa", "qa_eval")
  c.pipeline.stage_fns = {
      "qa_data": "gptjax.retrieval:qa_data_stage",
      "tokenizer": "gptjax.retrieval:tokenizer_stage",
      "qa_eval": "gptjax.retrieval:evaluate_stage",
      "report": "gptjax.retrieval:report_stage"}
  c.tokenizer = ml_collections.ConfigDict(dict(kind="char" if preset == "micro" else "bpe",
                                               vocab_size=1024))
  c.qa_data = qa_data(preset)
  if preset != "micro":
    c.pretrain = pretrain_config(preset)
  c.sft_qa = sft_config(preset)
  c.qa_eval = qa_eval(preset)
  c.distributed = common.base_config().distributed
  return c
