"""The lm-eval adapter: any gptjax model as an lm-evaluation-harness `LM`.

    gptjax eval --workdir runs/demo/sft --tasks hellaswag,arc_easy --limit 100
    python -m gptjax.lm_harness run --model gptjax --model_args workdir=runs/demo/sft --tasks gsm8k

The second form is lm-eval's own command line with all of its flags; it runs through this module
because lm-eval 0.4's CLI finds models only in its built-in table, so the `gptjax` name has to be
registered in the same process before that CLI starts.

`GptjaxLM` takes a (model, params, tokenizer) triple: a gptjax workdir through
`checkpoint.load_for_inference`, a Hugging Face model directory (`workdir=hf:DIR`) through
`hf.load_pretrained`, or any other source that yields a `GPT` module, its parameters and a
tokenizer with `encode`, `decode`, `bos_id`, `eos_id` and `pad_id`.

- `loglikelihood` scores (context, continuation) pairs in batches with one forward per batch and
  `losses.common.token_logprobs`, the function the trainer and the sampler use, so a score here is
  the same number the training loss sums.
- `loglikelihood_rolling` scores a whole text in windows of the model's context (lm-eval's own
  window rule: every token predicted once, each window with as much context as fits).
- `generate_until` runs `sampling.generate` (greedy unless the task asks to sample), stopping at
  EOS or at the task's stop strings.

Every sequence starts with BOS, as in training and `gptjax sample`. Rows are sorted by length and
padded to widths rounded up to 32 tokens, so a task compiles a handful of programs, not one per
request.
"""

from __future__ import annotations

import functools
import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import lm_eval.models  # noqa: F401  (lm-eval's own table first: it only loads it when empty)
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry

from gptjax import prompting, sampling
from gptjax.losses.common import token_logprobs

_WIDTH_BUCKET = 32


def _bucket(n: int, cap: int) -> int:
  return min(cap, -(-n // _WIDTH_BUCKET) * _WIDTH_BUCKET)


@functools.partial(jax.jit, static_argnames=("model",))
def score_tokens(model, params, inputs, targets, lengths):
  """Per-token log-probs and greedy hits of `targets` given `inputs` [B,T] -> ([B,T], [B,T]).

  Row b is real for its first `lengths[b]` tokens; later slots are padding (segment id 0, so no
  real token attends to them) and their values are meaningless.
  """
  real = jnp.arange(inputs.shape[1])[None, :] < lengths[:, None]
  logits = model.apply({"params": params}, inputs, segment_ids=real.astype(jnp.int32)).logits
  lp = token_logprobs(logits, targets)
  greedy = jnp.argmax(logits, axis=-1) == targets
  return lp, greedy


def load_model(spec: str, step=None):
  """(model, params, tokenizer) from a gptjax workdir, or from a Hugging Face model directory
  written `hf:DIR` (as in `train.init_from`)."""
  if spec.startswith("hf:"):
    from gptjax import hf
    model, params, tokenizer = hf.load_pretrained(spec[len("hf:"):])
    if tokenizer is None:
      raise ValueError(f"{spec}: the model directory has no tokenizer; lm-eval needs one")
    return model, params, tokenizer
  from gptjax import checkpoint
  model, params, tokenizer, _ = checkpoint.load_for_inference(
      spec, None if step in (None, "") else int(step))
  return model, params, tokenizer


class GptjaxLM(LM):
  """An lm-eval `LM` over a gptjax model. Construct with a `workdir` (lm-eval's
  `--model_args workdir=W[,step=N]`; `workdir=hf:DIR` for a Hugging Face model directory) or
  with `model`, `params` and `tokenizer`."""

  def __init__(self, workdir: str | None = None, step: int | None = None, batch_size=8,
               max_gen_toks: int = 256, seed: int = 0, *, model=None, params=None,
               tokenizer=None, **ignored):
    super().__init__()
    # lm-eval also passes `device` and `max_batch_size`; JAX places arrays itself.
    ignored.pop("device", None)
    ignored.pop("max_batch_size", None)
    if ignored:
      raise ValueError(f"gptjax lm-eval model: unknown model_args {sorted(ignored)}; expected "
                       "workdir, step, batch_size, max_gen_toks, seed")
    if workdir is not None:
      if model is not None:
        raise ValueError("gptjax lm-eval model: pass a workdir or a model, not both")
      model, params, tokenizer = load_model(workdir, step)
    if model is None or params is None or tokenizer is None:
      raise ValueError("gptjax lm-eval model: needs workdir=W, or model, params and tokenizer")
    import flax.linen as nn
    self.model, self.params, self.tok = model, nn.meta.unbox(params), tokenizer
    cfg = model.cfg.resolved()
    self.max_length = int(cfg.max_len)
    self.learned_positions = cfg.positional == "learned"
    # "auto" (lm-eval's default search) is not meaningful here: shapes are fixed per bucket.
    self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
    self.max_gen_toks = int(max_gen_toks)
    self.seed = int(seed)
    bos = getattr(tokenizer, "bos_id", None)
    self.prefix_id = int(bos if bos is not None and bos >= 0 else tokenizer.eos_id)
    # A Hugging Face tokenizer may end a reply on several ids (generation_config's eos list).
    self.stop_ids = tuple(int(i) for i in getattr(tokenizer, "stop_ids", (tokenizer.eos_id,)))

  # ------------------------------------------------------------------------------------------
  # Tokens.
  # ------------------------------------------------------------------------------------------

  def tok_encode(self, text: str) -> list[int]:
    return list(self.tok.encode(text))

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context ids (BOS first) and continuation ids, split from one encoding of the joined text
    so a subword tokenizer merges across the boundary as it would in running text. Spaces that
    end the context move to the continuation, where lm-eval's tasks expect them."""
    n = len(context) - len(context.rstrip())
    if n:
      context, continuation = context[:-n], context[-n:] + continuation
    whole = self.tok_encode(context + continuation)
    ctx = self.tok_encode(context) if context else []
    if whole[:len(ctx)] != ctx:
      # The joined encoding re-tokenised the boundary; score the parts as encoded apart.
      return [self.prefix_id] + ctx, self.tok_encode(continuation)
    return [self.prefix_id] + ctx, whole[len(ctx):]

  # ------------------------------------------------------------------------------------------
  # Scoring.
  # ------------------------------------------------------------------------------------------

  def score_pairs(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding yields the continuation)
    for token-id pairs; the context is cut from the left to fit the model's window."""
    rows = []
    for ctx, cont in pairs:
      if not cont:
        rows.append(None)
        continue
      if len(cont) > self.max_length:
        raise ValueError(f"lm-eval request: the continuation is {len(cont)} tokens, longer than "
                         f"the model's window of {self.max_length}")
      if not ctx:
        ctx = [self.prefix_id]
      full = (ctx + cont)[-(self.max_length + 1):]
      rows.append((full[:-1], full[1:], len(cont)))
    results: list = [(0.0, True) if r is None else None for r in rows]
    order = sorted((i for i, r in enumerate(rows) if r is not None),
                   key=lambda i: -len(rows[i][0]))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      width = _bucket(len(rows[chunk[0]][0]), self.max_length)
      inputs = np.full((self.batch_size, width), self.tok.pad_id, np.int32)
      targets = np.zeros((self.batch_size, width), np.int32)
      lengths = np.zeros((self.batch_size,), np.int32)
      for j, i in enumerate(chunk):
        x, y, _ = rows[i]
        inputs[j, :len(x)], targets[j, :len(y)], lengths[j] = x, y, len(x)
      lp, greedy = jax.device_get(score_tokens(self.model, self.params, inputs, targets, lengths))
      for j, i in enumerate(chunk):
        n, k = int(lengths[j]), rows[i][2]
        results[i] = (float(lp[j, n - k:n].sum()), bool(greedy[j, n - k:n].all()))
    return results

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    pairs = [self.encode_pair(*r.args[:2]) for r in requests]
    out = self.score_pairs(pairs)
    for r, res in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood", r.args[:2], res)
    return out

  def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that predict every token of `text` exactly once."""
    windows = lm_utils.get_rolling_token_windows(
        token_list=self.tok_encode(text), prefix_token=self.prefix_id,
        max_seq_len=self.max_length, context_len=1)
    return [lm_utils.make_disjoint_window(w) for w in windows]

  def loglikelihood_rolling(self, requests) -> list[float]:
    per_request = [self.rolling_windows(r.args[0]) for r in requests]
    flat = self.score_pairs([w for windows in per_request for w in windows])
    out, i = [], 0
    for r, windows in zip(requests, per_request):
      total = sum(lp for lp, _ in flat[i:i + len(windows)])
      i += len(windows)
      out.append(total)
      self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), total)
    return out

  # ------------------------------------------------------------------------------------------
  # Generation.
  # ------------------------------------------------------------------------------------------

  def generate_until(self, requests) -> list[str]:
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
      groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
    out: list = [None] * len(requests)
    for key, members in groups.items():
      kwargs = dict(requests[members[0]].args[1])
      texts = self.generate([requests[i].args[0] for i in members], **kwargs)
      for i, text in zip(members, texts):
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out

  def generate(self, contexts: Sequence[str], *, until=None, max_gen_toks=None, do_sample=False,
               temperature=0.0, top_k=0, top_p=1.0, **ignored) -> list[str]:
    """Continuations of `contexts`, each cut at the first of the `until` strings (not included)."""
    until = [until] if isinstance(until, str) else list(until or [])
    max_new = int(max_gen_toks or self.max_gen_toks)
    temperature = float(temperature) if do_sample or float(temperature or 0) > 0 else 0.0
    if self.learned_positions or max_new >= self.max_length:
      # Leave room for the prompt: at least half of the window.
      max_new = min(max_new, self.max_length // 2)
    room = self.max_length - max_new
    stops = [ids for ids in (self.tok_encode(s) for s in until if s) if ids]
    prompts = [([self.prefix_id] + self.tok_encode(c))[-room:] for c in contexts]
    texts: list = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      width = _bucket(len(prompts[chunk[0]]), room)
      batch = np.full((self.batch_size, width), self.tok.pad_id, np.int32)
      lengths = np.ones((self.batch_size,), np.int32)
      batch[:, 0] = self.prefix_id
      for j, i in enumerate(chunk):
        batch[j, :len(prompts[i])], lengths[j] = prompts[i], len(prompts[i])
      res = sampling.generate(
          self.model, self.params, batch, lengths, rng=jax.random.fold_in(
              jax.random.key(self.seed), start), max_new_tokens=max_new,
          temperature=temperature, top_k=int(top_k or 0), top_p=float(top_p or 1.0),
          eos_ids=self.stop_ids, stop_sequences=stops, pad_id=self.tok.pad_id)
      completion, n = jax.device_get((res.completion, res.lengths))
      for j, i in enumerate(chunk):
        ids = [int(t) for t in completion[j, :n[j]] if int(t) not in self.stop_ids]
        texts[i] = prompting.truncate_at_stop(self.tok.decode(ids), until)
    return texts


# By path, not by class: under `python -m gptjax.lm_harness` this file runs as __main__ and is
# imported again as gptjax.lm_harness, and the registry takes one target per name.
if "gptjax" not in model_registry:
  model_registry.register("gptjax", target="gptjax.lm_harness:GptjaxLM")


# --------------------------------------------------------------------------------------------
# Command lines.
# --------------------------------------------------------------------------------------------

def evaluate(lm: GptjaxLM, tasks: Sequence[str], *, limit=None, num_fewshot=None,
             include_path: str | None = None, log_samples: bool = False, seed: int = 0) -> dict:
  """lm-eval's `simple_evaluate` over `lm`; tasks by name, from lm-eval's catalogue or from YAML
  files under `include_path`. Returns lm-eval's results dict."""
  from lm_eval import evaluator
  from lm_eval.tasks import TaskManager
  return evaluator.simple_evaluate(
      model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
      task_manager=TaskManager(include_path=include_path), log_samples=log_samples,
      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
      fewshot_random_seed=seed, batch_size=lm.batch_size)


def eval_main(argv=None) -> int:
  """`gptjax eval --workdir W --tasks a,b [--limit N] [--num_fewshot K] [--include_path DIR]
  [--batch_size B] [--output results.json]`."""
  import argparse
  import sys
  p = argparse.ArgumentParser(prog="gptjax eval",
                              description="Evaluate a workdir's model with lm-eval tasks.")
  p.add_argument("--workdir", required=True, help="a gptjax workdir, or hf:DIR for a Hugging "
                 "Face model directory")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
  p.add_argument("--limit", type=float, default=None, help="examples per task (count, or a "
                 "fraction below 1)")
  p.add_argument("--num_fewshot", type=int, default=None)
  p.add_argument("--include_path", default=None, help="a folder of task YAML files")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--max_gen_toks", type=int, default=256)
  p.add_argument("--output", default=None, help="write lm-eval's results as JSON here")
  args = p.parse_args(argv)
  limit = args.limit
  if limit is not None and limit >= 1:
    limit = int(limit)
  lm = GptjaxLM(workdir=args.workdir, step=args.step, batch_size=args.batch_size,
                max_gen_toks=args.max_gen_toks)
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  from lm_eval.tasks import TaskManager
  known = TaskManager(include_path=args.include_path).all_tasks
  unknown = [t for t in tasks if t not in known]
  if unknown:
    print(f"gptjax eval: --tasks: unknown task(s) {unknown}; see `lm-eval ls tasks`"
          + ("" if args.include_path else " or pass --include_path"), file=sys.stderr)
    return 2
  results = evaluate(lm, tasks, limit=limit, num_fewshot=args.num_fewshot,
                     include_path=args.include_path)
  print(lm_utils.make_table(results))
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"results": results["results"], "n-samples": results.get("n-samples"),
                 "configs": results.get("configs")}, f, indent=2, default=str)
  return 0


def lm_eval_main() -> None:
  """lm-eval's own CLI, with `--model gptjax` registered."""
  from lm_eval.__main__ import cli_evaluate
  cli_evaluate()


if __name__ == "__main__":
  lm_eval_main()
