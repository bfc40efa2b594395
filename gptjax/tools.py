"""Tools the model calls from inside its decode loop: a safe calculator and the call protocol.

    loop = tools.calculator_loop(tok)                    # an engine.ToolLoop
    out = engine.generate(model, params, prompts, lengths, rng=0, max_new_tokens=64,
                          temperature=0.0, eos_ids=chat.reply_stop_ids(tok), pad_id=tok.pad_id,
                          tools=loop)

The protocol is the chat template's own tool turn (gptjax/data/chat.py), so it needs no new
token and tokenizes the same way with the character and SentencePiece tokenizers: a call is an
assistant turn that ends with `<|tool_call|>EXPRESSION<|end|>`; the tool's answer is a tool turn,
and the assistant speaks again. What the model writes and what the host appends:

    model:  <|tool_call|>347*86<|end|>
    host:   <|tool_result|>29842<|end|><|assistant|>
    model:  #### 29842<|end|>

The row pauses at `<|end|>` (the trigger); the host looks back to the turn's start. A turn with a
`<|tool_call|>` is a call: the calculator runs on the host and its answer (or `error: ...`) is
appended to the same KV cache, with no prefill. A turn without one is the end of the reply, as
without tools. Training data in this form (`tasks.arithmetic.messages(p, "tool")`) trains the
call and the final answer and leaves the results out of the loss, as the template masks every
tool turn.

`calculate` evaluates integer arithmetic only: it parses the text with `ast` and walks a
whitelist (integer literals, + - * / // %, unary minus, parentheses), so no name, call,
attribute or power can run, and sizes are bounded (expression length, nesting, result digits).
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Sequence

CALL = "<|tool_call|>"
RESULT = "<|tool_result|>"
END = "<|end|>"
ASSISTANT = "<|assistant|>"

MAX_EXPRESSION_CHARS = 200
MAX_DEPTH = 32
MAX_DIGITS = 40
TOOL_NAMES = ("calculator",)


class CalculatorError(ValueError):
  """An expression the calculator does not evaluate; the message says why, in a few words."""


_ALLOWED_CHARS = re.compile(r"[0-9+\-*/%() \t]*")
_BINARY = {ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod}


def calculate(expression: str) -> int:
  """The integer value of an arithmetic expression such as '52*6' or '(17 - 4) * 3 // 2'.

  `/` must divide exactly (the task's answers are integers; a fraction is an error, not a
  rounded number); `//` and `%` are Python's floor division and remainder. Raises
  CalculatorError for anything else: names, calls, attributes, strings, floats, `**`, division
  by zero, an expression over MAX_EXPRESSION_CHARS, nesting deeper than MAX_DEPTH, or a value
  with more than MAX_DIGITS digits.
  """
  if not isinstance(expression, str):
    raise CalculatorError(f"expected a string, got {type(expression).__name__}")
  text = expression.strip()
  if not text:
    raise CalculatorError("empty expression")
  if len(text) > MAX_EXPRESSION_CHARS:
    raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
  # Characters first: this alone rules out names, attributes, strings and floats, and keeps the
  # parser away from anything but arithmetic.
  if not _ALLOWED_CHARS.fullmatch(text):
    bad = next(ch for ch in text if not _ALLOWED_CHARS.fullmatch(ch))
    raise CalculatorError(f"unexpected character {bad!r}")
  try:
    tree = ast.parse(text, mode="eval")
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    raise CalculatorError("not an arithmetic expression") from None
  return _evaluate(tree.body, 0)


def _check_size(value: int) -> int:
  if len(str(abs(value))) > MAX_DIGITS:
    raise CalculatorError(f"a value has more than {MAX_DIGITS} digits")
  return value


def _evaluate(node, depth: int) -> int:
  if depth > MAX_DEPTH:
    raise CalculatorError(f"nested deeper than {MAX_DEPTH}")
  if isinstance(node, ast.Constant):
    # bool is an int subclass; the character check already excludes it, but say so here too.
    if type(node.value) is not int:
      raise CalculatorError(f"unsupported literal {node.value!r}")
    return _check_size(node.value)
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
    v = _evaluate(node.operand, depth + 1)
    return -v if isinstance(node.op, ast.USub) else v
  if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
    a, b = _evaluate(node.left, depth + 1), _evaluate(node.right, depth + 1)
    if isinstance(node.op, ast.Add):
      return _check_size(a + b)
    if isinstance(node.op, ast.Sub):
      return _check_size(a - b)
    if isinstance(node.op, ast.Mult):
      return _check_size(a * b)
    if b == 0:
      raise CalculatorError("division by zero")
    if isinstance(node.op, ast.Div):
      if a % b:
        raise CalculatorError(f"{a}/{b} is not a whole number")
      return a // b
    return a // b if isinstance(node.op, ast.FloorDiv) else a % b
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
    raise CalculatorError("powers are not supported")
  raise CalculatorError(f"unsupported syntax ({type(node).__name__})")


def calculator(expression: str) -> str:
  """The calculator as the model sees it: the value, or 'error: <why>'."""
  try:
    return str(calculate(expression))
  except CalculatorError as e:
    return f"error: {e}"


# --------------------------------------------------------------------------------------------
# The protocol over token ids.
# --------------------------------------------------------------------------------------------

def _specials(tok) -> dict:
  ids = getattr(tok, "special_ids", {}) or {}
  missing = [name for name in (CALL, RESULT, END, ASSISTANT) if name not in ids]
  if missing or hasattr(tok, "render_chat"):
    raise ValueError(f"tools: the tokenizer has no {', '.join(missing) or 'gptjax chat template'}"
                     f" tokens; the tool protocol needs gptjax's chat template "
                     f"({CALL} ... {END}, then {RESULT} ... {END}{ASSISTANT})")
  return {name: ids[name] for name in (CALL, RESULT, END, ASSISTANT)}


def pending_call(ids: Sequence[int], tok) -> str | None:
  """The expression of the call that `ids` (a completion so far) ends with, or None when its last
  turn closed without a call. The last turn starts after the last `<|assistant|>` (or at the
  start of the completion) and must end with `<|end|>`."""
  sp = _specials(tok)
  ids = [int(i) for i in ids]
  if not ids or ids[-1] != sp[END]:
    return None
  start = max((i + 1 for i, t in enumerate(ids) if t == sp[ASSISTANT]), default=0)
  turn = ids[start:-1]
  if sp[CALL] not in turn:
    return None
  at = len(turn) - 1 - turn[::-1].index(sp[CALL])
  return tok.decode(turn[at + 1:])


def result_ids(result: str, tok, *, max_tokens: int) -> list[int]:
  """`<|tool_result|>RESULT<|end|><|assistant|>` as ids, the result's text cut (never the
  markers) so that the whole fits in `max_tokens`."""
  sp = _specials(tok)
  body = list(tok.encode(result))[:max(0, max_tokens - 3)]
  return [sp[RESULT]] + body + [sp[END], sp[ASSISTANT]]


def calculator_loop(tok, *, max_calls: int = 8, max_tokens: int = 48):
  """The calculator as an `engine.ToolLoop` over `tok`'s chat template."""
  from gptjax import engine
  sp = _specials(tok)

  def respond(ids):
    expression = pending_call(ids, tok)
    if expression is None:
      return None
    return result_ids(calculator(expression), tok, max_tokens=max_tokens)

  return engine.ToolLoop(trigger_ids=(sp[END],), respond=respond, max_tokens=max_tokens,
                         max_calls=max_calls)


def loop_for(name: str, tok, **kw):
  """The ToolLoop of a tool by name (`gptjax chat --tools NAME`)."""
  if name != "calculator":
    raise ValueError(f"tools: unknown tool {name!r}; expected one of {', '.join(TOOL_NAMES)}")
  return calculator_loop(tok, **kw)


# --------------------------------------------------------------------------------------------
# Reading a transcript back.
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Transcript:
  messages: list          # assistant and tool messages, as the chat template renders them
  calls: list             # (expression, result text) in order
  answer_text: str        # the text of the last assistant turn (the final answer)
  text: str               # everything, readable: a call shows as "[calculator: EXPR = RESULT]\n"


def read_transcript(ids: Sequence[int], tok) -> Transcript:
  """Splits a completion made under the tool protocol into messages (the inverse of rendering
  them after the generation prompt), stopping at the reply's end (`<|end|>` closing a turn with
  no call, or EOS); pad is dropped."""
  sp = _specials(tok)
  eos = getattr(tok, "eos_id", None)
  ids = [int(i) for i in ids if int(i) != tok.pad_id]
  messages, calls, parts = [], [], []
  turn, role = [], "assistant"
  i = 0
  while i < len(ids):
    t = ids[i]
    i += 1
    if t == eos:
      break
    if t == sp[ASSISTANT]:
      role, turn = "assistant", []
      continue
    if t == sp[RESULT] and not turn and messages and messages[-1].get("tool_call") is not None:
      role = "tool"
      continue
    if t != sp[END]:
      turn.append(t)
      continue
    # A turn ends.
    if role == "tool":
      result = tok.decode(turn)
      messages.append({"role": "tool", "content": result})
      calls.append((messages[-2]["tool_call"], result))
      parts.append(f" = {result}]\n")
      turn = []
      continue
    if sp[CALL] in turn:
      at = turn.index(sp[CALL])
      msg = {"role": "assistant", "content": tok.decode(turn[:at]),
             "tool_call": tok.decode(turn[at + 1:])}
      messages.append(msg)
      parts.append(f"{msg['content']}[calculator: {msg['tool_call']}")
      turn = []
      continue
    messages.append({"role": "assistant", "content": tok.decode(turn)})
    parts.append(messages[-1]["content"])
    turn = []
    break
  else:
    if turn:                                      # cut off before the turn ended
      text = tok.decode(turn)
      messages.append({"role": role, "content": text})
      parts.append(text)
  last = messages[-1] if messages else None
  answer = last["content"] if last and last["role"] == "assistant" and \
      "tool_call" not in last else ""
  return Transcript(messages=messages, calls=calls, answer_text=answer, text="".join(parts))
