"""`gptjax sample` and `gptjax chat`: sampling from a trained workdir on the command line.

    gptjax sample --workdir W --prompt "ROMEO:" --temperature 0.8 --top_k 40 --top_p 0.95 \
        --min_p 0 --num_samples 3 --max_new_tokens 48 --seed 0
    gptjax chat --workdir W            # a REPL through the chat template; replies stream
    gptjax chat --workdir W --tools calculator     # the model may call the calculator mid-reply
    gptjax sample --workdir W --prompt "Q: 2+2?\nA: " --regex "[0-9]+"       # constrained
    gptjax sample --workdir W --prompt "..." --json_schema schema.json        # or inline JSON
    gptjax sample --workdir W --chat --prompt "What is 347 * 86?" --tools calculator

Both are thin: they parse flags, load the workdir with `checkpoint.load_for_inference`, and
decode with the continuous-batching engine (`engine.generate` / `engine.stream`, constraints
included), the one RL rollouts and best-of-N use; with `--tools` through its tool loop
(`tools.loop_for`), the loop the reasoning evaluation measures, and a call shows as
`[calculator: EXPR = RESULT]`. A repetition penalty or `--stop` strings, which the engine lacks
(`engine.supports`), decode with `sampling.generate` / `sampling.stream` instead (with `--tools`
they are refused).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def _add_controls(p: argparse.ArgumentParser, *, temperature: float, max_new_tokens: int):
  p.add_argument("--workdir", required=True, help="a training workdir (config.json, checkpoints, "
                 "tokenizer)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
  p.add_argument("--top_k", type=int, default=0, help="0 = off")
  p.add_argument("--top_p", type=float, default=1.0, help="1 = off")
  p.add_argument("--min_p", type=float, default=0.0, help="0 = off")
  p.add_argument("--repetition_penalty", type=float, default=1.0, help="1 = off")
  p.add_argument("--max_new_tokens", type=int, default=None,
                 help=f"default {max_new_tokens}, or what fits the model's window; a value that "
                 "does not fit is an error")
  p.add_argument("--seed", type=int, default=0)


def _controls(args) -> dict:
  return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
              repetition_penalty=args.repetition_penalty)


class UsageError(Exception):
  """Bad input to `sample`/`chat`: reported as one line and exit status 2."""


def check_args(args) -> None:
  """Flags that parse but cannot work end in one clear line, before anything loads."""
  rules = [("temperature", args.temperature >= 0, ">= 0 (0 = greedy)"),
           ("top_k", args.top_k >= 0, ">= 0 (0 = off)"),
           ("top_p", 0 < args.top_p <= 1, "in (0, 1]"),
           ("min_p", 0 <= args.min_p < 1, "in [0, 1)"),
           ("repetition_penalty", args.repetition_penalty > 0, "> 0 (1 = off)"),
           ("max_new_tokens", args.max_new_tokens is None or args.max_new_tokens > 0, "> 0")]
  if hasattr(args, "num_samples"):
    rules.append(("num_samples", args.num_samples > 0, "> 0"))
  for flag, ok, expected in rules:
    if not ok:
      raise UsageError(f"--{flag}: expected {expected}, got {getattr(args, flag)!r}")


def _check_tools(args, **given) -> None:
  """Before anything loads: --tools names a known tool, and no option the engine's tool loop lacks
  comes with it (`given`: option name -> whether the user set it), each refused in one line
  rather than silently ignored."""
  if not args.tools:
    return
  if args.tools != "calculator":
    raise UsageError(f"--tools: expected calculator, got {args.tools!r}")
  for flag, why in (("repetition_penalty", "the tool loop runs in the continuous-batching "
                     "engine, which has no repetition penalty"),
                    ("stop", "the engine's tool loop ends a reply at its stop token only"),
                    ("regex", "the tool's result, written by the host, is outside any pattern"),
                    ("json_schema", "the tool's result, written by the host, is outside any "
                     "pattern")):
    if given.get(flag):
      raise UsageError(f"--{flag}: not available with --tools ({why})")


def _tools_loop(args, tok):
  """The engine.ToolLoop of --tools, or None without it."""
  if not args.tools:
    return None
  from gptjax import tools
  try:
    return tools.loop_for(args.tools, tok)
  except ValueError as e:             # a tokenizer without gptjax's chat template
    raise UsageError(f"--tools: {e}") from None


def _load(workdir: str, step):
  from gptjax import checkpoint
  try:
    return checkpoint.load_for_inference(workdir, step)
  except FileNotFoundError as e:
    # A pipeline run's directory instead of one of its stages', or a path with no run at all.
    raise UsageError(f"--workdir: {e}") from None


def _fit_new_tokens(model, prompt_len: int, requested: int | None, default: int) -> int:
  """Learned positions cap prompt + completion at max_len. Without --max_new_tokens the
  completion fills what is left (up to `default`); an explicit value that does not fit is an
  error, never a silent cut."""
  cfg = model.cfg.resolved()
  if cfg.positional != "learned":
    return default if requested is None else requested
  room = cfg.max_len - prompt_len
  if room <= 0:
    raise UsageError(f"--prompt: the prompt is {prompt_len} tokens; the model's window is "
                     f"{cfg.max_len} tokens, so no room is left for a completion")
  if requested is None:
    return min(default, room)
  if requested > room:
    raise UsageError(f"--max_new_tokens: {requested} does not fit; the model's window is "
                     f"{cfg.max_len} tokens and the prompt takes {prompt_len}, so at most "
                     f"{room} new tokens")
  return requested


def _turn_end_ids(tok) -> tuple[int, ...]:
  """EOS and, when the tokenizer has the chat template's tokens, `<|end|>`: a model trained on
  conversations ends a reply with it, and streaming the raw marker would show its text."""
  ids = (tok.eos_id, getattr(tok, "special_ids", {}).get("<|end|>"))
  return tuple(i for i in ids if i is not None)      # an imported tokenizer may lack either


def _reports_usage_errors(fn):
  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except UsageError as e:
      print(f"gptjax {fn.__name__.removesuffix('_main')}: {e}", file=sys.stderr)
      return 2
  wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
  return wrapped


@_reports_usage_errors
def sample_main(argv=None, *, write: Callable[[str], object] = sys.stdout.write) -> int:
  p = argparse.ArgumentParser(prog="gptjax sample", description="Sample continuations of a prompt.")
  _add_controls(p, temperature=0.8, max_new_tokens=200)
  p.add_argument("--prompt", default="", help="text to continue (empty: from BOS alone)")
  p.add_argument("--num_samples", type=int, default=1)
  p.add_argument("--chat", action="store_true",
                 help="render the prompt as a user turn through the chat template")
  p.add_argument("--no_bos", action="store_true", help="do not start the prompt with BOS")
  p.add_argument("--stop", action="append", default=[],
                 help="a string that ends a sample (repeatable)")
  p.add_argument("--regex", default=None,
                 help="constrain every sample to match this regular expression (fullmatch)")
  p.add_argument("--json_schema", default=None,
                 help="constrain every sample to JSON valid for this schema: a file, or the "
                 "schema's JSON itself")
  p.add_argument("--tools", default="", metavar="NAME",
                 help="a tool the model may call inside its reply, run on the host between "
                 "decode steps: calculator (integer arithmetic)")
  args = p.parse_args(argv)
  check_args(args)
  _check_tools(args, repetition_penalty=args.repetition_penalty != 1.0, stop=bool(args.stop),
               regex=args.regex is not None, json_schema=args.json_schema is not None)
  pattern = _constraint_pattern(args)

  import numpy as np
  from gptjax import engine, prompting, sampling

  model, params, tok, _ = _load(args.workdir, args.step)
  loop = _tools_loop(args, tok)
  if loop is not None:
    from gptjax import tools
  if args.chat:
    from gptjax.data import chat
    ids = chat.render_prompt(args.prompt, tok)
    eos = tuple(chat.reply_stop_ids(tok))
  else:
    # Models without a BOS token (Qwen, imported from Hugging Face) start at the text.
    bos = [] if args.no_bos or tok.bos_id is None else [tok.bos_id]
    ids = bos + prompting.encode_with_specials(tok, args.prompt)
    eos = _turn_end_ids(tok)
  if not ids:
    raise UsageError("--prompt: empty prompt; pass --prompt or drop --no_bos")
  new = _fit_new_tokens(model, len(ids), args.max_new_tokens, 200)
  prompts = np.tile(np.asarray(ids, np.int32)[None], (args.num_samples, 1))
  lengths = np.full((args.num_samples,), len(ids), np.int32)
  stops = tuple(tuple(prompting.encode_with_specials(tok, s)) for s in args.stop if s)
  constraint = None
  if pattern is not None:
    from gptjax import constraints
    flag = "--regex" if args.regex is not None else "--json_schema"
    try:
      constraint = constraints.compile(tok, regex=pattern, vocab_size=model.cfg.resolved(
          ).vocab_size, stop_ids=eos)
      constraints.check_budget(constraint.automaton, new)
    except (constraints.ConstraintError, ValueError) as e:
      raise UsageError(f"{flag}: {e}") from None
  controls = _controls(args)
  if engine.supports(repetition_penalty=args.repetition_penalty, stop_sequences=stops):
    # One slot per sample; sample i draws with its own keys (fold_in(seed, i)), so it does not
    # depend on --num_samples. With tools each sample calls, waits and goes on by itself. One
    # batch per process, so one full-length cache (one decode program) beats a growing one.
    del controls["repetition_penalty"]
    out = engine.generate(model, params, prompts, lengths, rng=args.seed, max_new_tokens=new,
                          eos_ids=eos, pad_id=tok.pad_id, constraint=constraint, tools=loop,
                          slots=args.num_samples, grow_cache=False, **controls)
  else:
    out = sampling.generate(model, params, prompts, lengths, rng=args.seed, max_new_tokens=new,
                            eos_ids=eos, stop_sequences=stops, pad_id=tok.pad_id,
                            constraint=constraint, **controls)
  completion, lengths = np.asarray(out.completion), np.asarray(out.lengths)
  for i in range(args.num_samples):
    ids = [t for t in completion[i, :lengths[i]] if t not in eos]
    if loop is not None:
      # Calls and results show as chat shows them, [calculator: EXPR = RESULT]; the transcript
      # needs the turn markers, so it reads the ids as they came.
      text = tools.read_transcript(completion[i, :lengths[i]], tok).text
    elif constraint is not None:
      text = constraint.text(ids)     # the text the pattern matched (see Constraint.text)
    else:
      text = tok.decode(ids)
    text = prompting.truncate_at_stop(text, args.stop)
    if args.chat:
      # The prompt was a user turn and the text is the model's reply: two turns, not one text.
      write(f"--- sample {i + 1}/{args.num_samples}\nuser> {args.prompt}\nmodel> {text}\n")
    else:
      write(f"--- sample {i + 1}/{args.num_samples}\n{args.prompt}{text}\n")
  return 0


def _constraint_pattern(args) -> str | None:
  """The regex of --regex or --json_schema, checked before anything loads; None without one."""
  from gptjax import constraints
  if args.regex is not None and args.json_schema is not None:
    raise UsageError("--regex and --json_schema: give one of them, not both")
  try:
    if args.regex is not None:
      constraints.check_regex(args.regex)
      return args.regex
    if args.json_schema is not None:
      text = args.json_schema
      if not text.lstrip().startswith("{"):
        try:
          with open(text) as f:
            text = f.read()
        except OSError as e:
          raise UsageError(f"--json_schema: cannot read {args.json_schema!r} ({e.strerror}); "
                           "expected a schema file or the schema's JSON") from None
      return constraints.regex_from_schema(text)
  except constraints.ConstraintError as e:
    flag = "--regex" if args.regex is not None else (
        "--json_schema" if args.json_schema.lstrip().startswith("{")
        else f"--json_schema {args.json_schema}")
    raise UsageError(f"{flag}: {e}") from None
  return None


CHAT_HELP = "commands: /reset clears the conversation, /system TEXT sets a system message, /quit"


@_reports_usage_errors
def chat_main(argv=None, *, read_line: Callable[[str], str] = input,
              write: Callable[[str], object] = None) -> int:
  """An interactive chat. Each reply is sampled token by token (`engine.stream`, or
  `sampling.stream` with a repetition penalty) and printed as it comes; the conversation is
  re-rendered through the chat template every turn, dropping the oldest turns when it no longer
  fits the model's window."""
  p = argparse.ArgumentParser(prog="gptjax chat", description="Chat with a trained model.")
  _add_controls(p, temperature=0.7, max_new_tokens=256)
  p.add_argument("--system", default="", help="a system message to start with")
  p.add_argument("--tools", default="", metavar="NAME",
                 help="a tool the model may call inside its reply, run on the host between "
                 "decode steps: calculator (integer arithmetic)")
  args = p.parse_args(argv)
  check_args(args)
  _check_tools(args, repetition_penalty=args.repetition_penalty != 1.0)
  if write is None:
    def write(s):
      sys.stdout.write(s)
      sys.stdout.flush()

  import jax
  from gptjax import engine, sampling
  from gptjax.data import chat

  model, params, tok, _ = _load(args.workdir, args.step)
  cfg = model.cfg.resolved()
  eos = tuple(chat.reply_stop_ids(tok))
  loop = _tools_loop(args, tok)
  if loop is not None:
    from gptjax import tools
  new = args.max_new_tokens
  if cfg.positional == "learned":
    # Half the window by default, so a few turns of history fit beside the reply.
    if new is None:
      new = min(256, cfg.max_len // 2)
    elif new >= cfg.max_len:
      raise UsageError(f"--max_new_tokens: {new} does not fit; the model's window is "
                       f"{cfg.max_len} tokens, which must also hold the conversation")
  elif new is None:
    new = 256
  system = [{"role": "system", "content": args.system}] if args.system else []
  history: list[dict] = []
  key = jax.random.key(args.seed)
  write(f"{CHAT_HELP}\n")
  turn = 0
  while True:
    try:
      line = read_line("you> ")
    except (EOFError, KeyboardInterrupt):
      write("\n")
      return 0
    text = line.strip()
    if not text:
      continue
    if text == "/quit":
      return 0
    if text == "/reset":
      history = []
      write("(conversation cleared" + ("; the system message is kept)\n" if system else ")\n"))
      continue
    if text.startswith("/system"):
      content = text[len("/system"):].strip()
      system = [{"role": "system", "content": content}] if content else []
      write(f"(system message set: {content})\n" if content else "(system message cleared)\n")
      continue
    history.append({"role": "user", "content": line})
    dropped = 0
    while True:
      ids = chat.render_prompt(system + history, tok)
      if cfg.positional != "learned" or len(ids) + new <= cfg.max_len or len(history) <= 1:
        break
      dropped += 1
      history = history[2:] if len(history) > 2 else history[1:]   # oldest exchange goes first
    if dropped:
      write(f"(the {dropped} oldest exchange(s) no longer fit the model's window of "
            f"{cfg.max_len} tokens; dropped)\n")
    if cfg.positional == "learned" and len(ids) + new > cfg.max_len:
      write(f"(the message is {len(ids)} tokens with the template; only its last "
            f"{cfg.max_len - new} are read)\n")
      ids = ids[-(cfg.max_len - new):]                             # a single over-long message
    write("model> ")
    reply_ids: list[int] = []
    shown = ""
    controls = _controls(args)
    if engine.supports(repetition_penalty=args.repetition_penalty):
      # Request 0 of engine.generate's keys, so a streamed reply equals the batched one.
      del controls["repetition_penalty"]
      tokens = engine.stream(model, params, ids, rng=jax.random.fold_in(key, turn),
                             max_new_tokens=new, eos_ids=eos, pad_id=tok.pad_id, tools=loop,
                             **controls)
    else:
      tokens = sampling.stream(model, params, ids, rng=jax.random.fold_in(key, turn),
                               max_new_tokens=new, eos_ids=eos, pad_id=tok.pad_id, **controls)
    # With tools, an exchange (the call, its result, the reply's reopening) is held back until it
    # is complete and then shows as one piece, [calculator: EXPR = RESULT]: shown as it streams,
    # its raw markers would render first and then be re-rendered.
    if loop is not None:
      opens, closes = tok.special_ids.get(tools.CALL), tok.special_ids.get(tools.ASSISTANT)
    pending = False
    now = ""
    for token in tokens:
      if loop is None and token in eos:
        break
      reply_ids.append(token)
      if loop is not None:
        pending = (pending or token == opens) and token != closes
        if pending:
          continue
      # Decode the whole reply each time: subword pieces can change how earlier text renders.
      now = tok.decode(reply_ids) if loop is None else tools.read_transcript(reply_ids, tok).text
      write(now[len(shown):] if now.startswith(shown) else "\n" + now)
      shown = now
    if pending:                         # the reply ran out inside an exchange: show what it has
      now = tools.read_transcript(reply_ids, tok).text
      write(now[len(shown):] if now.startswith(shown) else "\n" + now)
    write("\n")
    if loop is None:
      history.append({"role": "assistant", "content": chat.parse_reply(reply_ids, tok)})
    else:
      # The calls and results stay in the conversation as the template's own turns.
      history += tools.read_transcript(reply_ids, tok).messages or [
          {"role": "assistant", "content": ""}]
    turn += 1
