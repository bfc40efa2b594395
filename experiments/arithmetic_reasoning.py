"""Reasoning you can check: arithmetic with a verifier, from pretraining to RL, on one table.

    gptjax pipeline --config experiments/arithmetic_reasoning.py:tiny --workdir runs/reason
    gptjax pipeline --config experiments/arithmetic_reasoning.py:tiny_all --workdir runs/reason  # every row

Stages (each an ordinary runner pointed at the task's files by configuration; `{run}` is the run
directory):

    task_data     problems (train / validation / held-out; gptjax/tasks/arithmetic.py), the
                  pretraining text, SFT chats in both formats, RL prompts with their answers
    tokenizer     characters of the training text (each digit one token)
    pretrain      the base model on the task's text (optionally mixed with Shakespeare)
    sft_direct    SFT to answer at once:           "#### 132"
    sft_cot       SFT to work the problem first:   "7+5=12 c1\\n4+8+1=13 c1\\n#### 132"
    tool_data     the training problems with calculator calls (gptjax/tools.py)
    sft_tool      SFT, from the same base, to call the calculator for each step:
                  "<|tool_call|>85+47<|end|>" [the tool: "<|tool_result|>132<|end|>"] "#### 132"
    orm_data      CoT samples on training problems, labelled by the verifier
    orm           an outcome reward model (the Bradley–Terry RM on correct-vs-wrong pairs)
    grpo_cot      GRPO from the CoT model, reward = the verifier (`rl.reward=verifier:...`)
    ppo_orm       PPO from the CoT model against the outcome RM
    reason_eval   every method on the same held-out problems (gptjax/reasoning.py)
    tot_eval      tree-of-thought search (beam, best-first) scored by the outcome RM, against
                  self-consistency at an equal token budget: rows added to reason_eval's table
    tool_eval     sft_tool greedy with the calculator in its decode loop: one more table row
    answer_format rows: the CoT reply forced into its format by constrained decoding
    check_retry   rows: check-and-retry, the answer judged (re-derived, or by the ORM)
    report        the report card: <run>/report.md (gptjax/reasoning_report.py)

Presets: `micro` (tests: seconds per stage, the numbers mean nothing), `tiny` (2 CPU cores,
sized from measured trials; the core table, without the stages of EXTRA_STAGES) and `tiny_all`
(the same sizes, every stage: the committed card). benchmarks/RESULTS.md gives their wall
times. The held-out set holds the training bands plus bands beyond them (one more digit, one
more step), to test length generalisation. Choose presets on the validation problems (training split; see
benchmarks/reasoning_pretrain_mix.py), never on held-out ones: benchmarks/RESULTS.md says what
the current sizes rest on.
"""

import ml_collections

from . import common
from . import reward as reward_exp
from . import rl as rl_exp
from . import sft as sft_exp

PRESETS = ("micro", "tiny", "tiny_all")
STAGES = ("task_data", "tokenizer", "pretrain", "sft_direct", "sft_cot", "tool_data", "sft_tool",
          "orm_data", "orm", "grpo_cot", "ppo_orm", "reason_eval", "tot_eval", "tool_eval",
          "answer_format", "check_retry",
          "report")
# The rows beyond the core table (a tool model, tree search, constrained decoding): `tiny` leaves
# them out so that the core card (direct, CoT, self-consistency, best-of-N, GRPO, PPO,
# check-and-retry) fits the ~25-minute budget on 2 CPU cores; `tiny_all` (and `micro`) runs them
# too, and adding them to a finished `tiny` run adds their rows (benchmarks/RESULTS.md: 23.8
# against 31 minutes on a quiet host).
EXTRA_STAGES = ("tool_data", "sft_tool", "tot_eval", "tool_eval", "answer_format")


def task_data(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(dict(
      seed=0,                          # the problems; independent of the training seed
      heldout_fraction=0.2,            # of every band's questions, by a hash of the text
      train_bands=("add-1d", "add-2d", "add-3d", "sub-2d", "sub-3d", "mul-1d", "mul-2d",
                   "word-1s", "word-2s"),
      heldout_bands=("add-1d", "add-2d", "add-3d", "sub-2d", "sub-3d", "mul-1d", "mul-2d",
                     "word-1s", "word-2s", "add-4d", "sub-4d", "mul-3d", "word-3s"),
      train_per_band=1000, validation_per_band=64, heldout_per_band=48,
      rl_prompts=0,                    # RL prompts: the first N training problems (0 = all)
      pretrain_formats=("cot", "direct"),
      shakespeare_fraction=0.0,        # of the pretraining characters
      gsm8k_train="", gsm8k_test=""))  # GSM8K-format JSONL files, added to train / held-out
  if preset == "micro":
    c.update(train_bands=("add-1d", "add-2d", "word-1s"),
             heldout_bands=("add-1d", "add-2d", "word-1s", "add-3d"),
             train_per_band=64, validation_per_band=8, heldout_per_band=6)
  return c


def model_size(c, preset):
  if preset == "micro":
    c.model.update(num_layers=2, num_heads=2, d_model=32, max_len=128)
  else:
    # 192 characters hold the longest training conversation (a two-step word problem, ~130)
    # and leave room for the beyond-training bands at evaluation.
    c.model.update(num_layers=4, num_heads=4, d_model=128, max_len=192)
  c.data.seq_len = c.model.max_len


def pretrain_config(preset: str):
  c = common.base_config()
  c.stage = "pretrain"
  model_size(c, preset)
  c.data.source = "text_files:{run}/task_data/pretrain_*.jsonl"
  c.train.sample_prompts = ("Question: What is 27 + 48?\nAnswer:\n",)
  if preset == "micro":
    c.train.update(steps=20, batch_size=8, log_every=5, eval_every=10, eval_batches=2,
                   sample_every=0, checkpoint_every=10)
    c.optim.update(lr=3e-3, warmup_steps=2)
  else:
    # 2000 steps: at 600 (the first tiny run) the base could not add one-digit numbers (CoT
    # greedy 4% held-out); at 2000, with the same 300 SFT steps, CoT greedy solved 49% of
    # validation problems (100% of add-2d/add-3d; benchmarks/RESULTS.md). About 15 minutes of
    # the budget on 2 cores.
    c.train.update(steps=2000, batch_size=16, log_every=50, eval_every=500, eval_batches=4,
                   sample_every=0, checkpoint_every=500)
    c.optim.update(lr=2e-3, warmup_steps=60)
  return c


def sft_config(preset: str, fmt: str):
  c = sft_exp.get_config(preset)
  model_size(c, preset)
  # The tool format has a stage of its own (tool_data), so that finished runs can gain it.
  data_dir = "tool_data" if fmt == "tool" else "task_data"
  c.data.source = "chat_jsonl:{run}/" + data_dir + "/sft_" + fmt + ".jsonl"
  c.data.val_fraction = 0.05
  c.train.init_from = "{run}/pretrain"
  c.sft.update(eval_prompts=0 if preset == "micro" else 32, show_samples=4,
               reply_tokens=16 if fmt == "direct" else 80, eval_temperature=0.7)
  if preset == "micro":
    # Tests: one evaluation and one checkpoint, at the end (compiling costs more than training).
    c.train.update(eval_every=6, checkpoint_every=6)
  else:
    c.train.update(steps=300, batch_size=16, log_every=20, eval_every=150, eval_batches=4,
                   checkpoint_every=150)
    c.optim.update(lr=1e-3, warmup_steps=20)
  return c


def orm_config(preset: str):
  c = reward_exp.get_config(preset)
  model_size(c, preset)
  c.data.source = "preference_jsonl:{run}/orm_data/train.jsonl"
  c.data.eval_source = "preference_jsonl:{run}/orm_data/validation.jsonl"
  c.train.init_from = "{run}/sft_cot"
  c.reward.best_of_n_prompts = 0            # best-of-N is measured by reason_eval
  if preset == "micro":
    c.train.update(eval_every=6, checkpoint_every=6)
  else:
    c.train.update(steps=120, batch_size=8, log_every=20, eval_every=60, eval_batches=0,
                   checkpoint_every=60)
    c.optim.update(lr=3e-4, warmup_steps=20)
  return c


def orm_data(preset: str):
  return ml_collections.ConfigDict(dict(
      policy="{run}/sft_cot", train_problems=32 if preset == "micro" else 512,
      validation_problems=8 if preset == "micro" else 128, samples_per_problem=4,
      temperature=1.0, max_new_tokens=48 if preset == "micro" else 80, add_reference=True,
      batch_size=256, seed=5))


def rl_config(preset: str, algo: str):
  c = rl_exp.get_config(f"{algo}_{preset}")
  model_size(c, preset)
  c.data.source = "prompts_jsonl:{run}/task_data/rl_prompts.jsonl"
  c.train.init_from = "{run}/sft_cot"
  c.rl.update(prompts=(), reference_workdir="{run}/sft_cot", eval_prompts=0, log_gold=False,
              missing_eos_penalty=0.0, temperature=1.0)
  if algo == "grpo":
    # The verifier is the reward: 1 for a correct final answer (no format bonus by default:
    # every SFT sample already ends with the marker).
    c.rl.update(reward="verifier:{run}/task_data/rl_prompts.jsonl", normalize_scores=False,
                reward_workdir="")
  else:
    c.rl.update(reward="rm", reward_workdir="{run}/orm", value_model="critic",
                normalize_scores=True)
  if preset == "micro":
    c.rl.update(prompt_len=64, max_new_tokens=48, iterations=2, max_prompts=64)
  else:
    # 2048 prompts (bands interleaved) are more than 30 iterations draw; reading all 9000
    # through the prompts source would only cost time.
    c.rl.update(prompt_len=112, max_new_tokens=80, max_prompts=2048,
                iterations=30 if algo == "grpo" else 20)
    if algo == "grpo":
      # Measured on validation problems (benchmarks/reasoning_rl_trial.py, RESULTS.md): at the
      # RL preset's 1e-4 the KL to the SFT model runs away and pass@1 falls 0.35 -> 0.22; at
      # 1e-5 it holds (0.36 after 30 iterations, 0.37 after 90), and 3e-5 x 90 falls to 0.31.
      c.optim.lr = 1e-5
  per_iteration = c.rl.epochs * (c.rl.prompts_per_iteration * c.rl.group_size
                                 // c.train.batch_size)
  # A checkpoint every few iterations: reason_eval draws pass@1, pass@k and the length over
  # training from them.
  c.train.update(checkpoint_every=per_iteration * (1 if preset == "micro" else 10),
                 keep_checkpoints=100)
  return c


def reason_eval(preset: str):
  c = ml_collections.ConfigDict(dict(
      direct="{run}/sft_direct", cot="{run}/sft_cot", orm="{run}/orm",
      rl_stages={"grpo_cot": "{run}/grpo_cot", "ppo_orm": "{run}/ppo_orm"},
      samples=32, ks=(1, 2, 4, 8, 16, 32), table_ks=(8, 16, 32), draws=16, temperature=1.0,
      # 100 new tokens: the longest chain of the beyond-training bands (mul-3d) is 94.
      rl_samples=8, curve_problems=8, max_new_tokens=100, direct_max_new_tokens=16,
      batch_size=512, seed=0))
  if preset == "micro":
    c.update(samples=4, ks=(1, 2, 4), table_ks=(4,), rl_samples=2, curve_problems=2,
             max_new_tokens=48, batch_size=64)
  return c


def tot_eval(preset: str):
  """Tree-of-thought search (gptjax/search.py): each round expands `branch` sampled lines of every
  kept chain and the outcome RM scores the chains so far. Sampling settings are reason_eval's, so
  the equal-budget self-consistency rows read chains like its own."""
  c = ml_collections.ConfigDict(dict(
      policy="{run}/sft_cot", orm="{run}/orm", methods=("beam", "best_first"),
      beam_width=4, branch=4, max_depth=12, max_expansions=16, max_step_tokens=24,
      problems_per_band=16,            # of each held-out band (0: all), to bound the search's time
      samples=16, draws=16, temperature=1.0, max_new_tokens=100, batch_size=512, seed=0))
  if preset == "micro":
    c.update(beam_width=2, branch=2, max_depth=6, max_expansions=6, max_step_tokens=16,
             problems_per_band=3, samples=4, max_new_tokens=48, batch_size=64)
  return c


def tool_eval(preset: str):
  # A tool transcript is short: a three-step word problem is ~50 tokens with its results.
  return ml_collections.ConfigDict(dict(
      policy="{run}/sft_tool", max_new_tokens=48 if preset == "micro" else 80, max_calls=8,
      batch_size=64 if preset == "micro" else 512, seed=0))


def answer_format(preset: str):
  # Lines that do not start with '#', then the final `#### N` line.
  return ml_collections.ConfigDict(dict(
      regex=r"([^#\n][^\n]*\n)*#### -?[0-9]+", samples=2 if preset == "micro" else 4))


def check_retry(preset: str):
  # Up to `retries` retries, from reason_eval's pooled samples (32 per problem; micro 4).
  return ml_collections.ConfigDict(dict(judges=("rederive", "orm"),
                                        retries=1 if preset == "micro" else 3,
                                        orm_threshold=0.0))


def get_config(arg=None):
  arg = arg or "tiny"
  if arg not in PRESETS:
    raise ValueError(f"unknown preset {arg!r}; expected one of {PRESETS}")
  # `tiny_all` is `tiny` with every stage: the sizes are the same.
  preset = "tiny" if arg == "tiny_all" else arg
  stages = STAGES if arg != "tiny" else tuple(s for s in STAGES if s not in EXTRA_STAGES)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.pipeline = ml_collections.ConfigDict()
  c.pipeline.stages = stages
  # `--seeds 0,1,2` re-runs these per seed from the one pretrained base (the outcome RM and its
  # data are shared: they are the verifier's proxy, not the method being compared), and the
  # report pools the seeds' tables.
  c.pipeline.seeds = ()
  c.pipeline.seeded_stages = tuple(
      s for s in ("sft_direct", "sft_cot", "sft_tool", "grpo_cot", "ppo_orm", "reason_eval",
                  "tot_eval", "tool_eval", "answer_format", "check_retry") if s in stages)
  c.pipeline.stage_fns = {
      "task_data": "gptjax.reasoning:task_data_stage",
      "tokenizer": "gptjax.reasoning:tokenizer_stage",
      "orm_data": "gptjax.reasoning:orm_data_stage",
      "reason_eval": "gptjax.reasoning:evaluate_stage",
      "tot_eval": "gptjax.search:tot_eval_stage",
      "tool_data": "gptjax.reasoning:tool_data_stage",
      "tool_eval": "gptjax.reasoning:tool_eval_stage",
      "answer_format": "gptjax.reasoning:answer_format_stage",
      "check_retry": "gptjax.reasoning:check_retry_stage",
      "report": "gptjax.reasoning:report_stage"}
  c.tokenizer = ml_collections.ConfigDict(dict(kind="char"))
  c.task_data = task_data(preset)
  c.pretrain = pretrain_config(preset)
  c.sft_direct = sft_config(preset, "direct")
  c.sft_cot = sft_config(preset, "cot")
  c.sft_tool = sft_config(preset, "tool")
  c.orm_data = orm_data(preset)
  c.orm = orm_config(preset)
  c.grpo_cot = rl_config(preset, "grpo")
  c.ppo_orm = rl_config(preset, "ppo")
  c.reason_eval = reason_eval(preset)
  c.tot_eval = tot_eval(preset)
  c.tool_eval = tool_eval(preset)
  c.answer_format = answer_format(preset)
  c.check_retry = check_retry(preset)
  c.distributed = common.base_config().distributed
  return c
