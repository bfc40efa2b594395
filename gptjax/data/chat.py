"""The chat template: messages -> token ids and the loss mask that says which targets are trained.

    <bos> <|system|> ... <|end|> <|user|> ... <|end|> <|assistant|> ... <|end|> <|tool_result|> ... <|end|>

Roles are `system`, `user`, `assistant` and `tool` (a tool's result, marked `<|tool_result|>`). An
assistant message may carry a `tool_call` string, rendered after its content as
`<|tool_call|> call`, inside the same turn, before that turn's `<|end|>`.

The mask is 1 on exactly the tokens the assistant produces: its content, its tool call (the
`<|tool_call|>` marker and the call text, since the model must learn to open a call) and the
`<|end|>` that closes its turn (so the model learns to stop). Role markers and everything written by
the system, the user or a tool are 0. Markers are special ids asked for by name, never text, so a
message that quotes "<|end|>" cannot end a turn early.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from gptjax.data.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
_ROLE_MARKER = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>",
                "tool": "<|tool_result|>"}


def validate_messages(messages: Any, *, where: str = "messages") -> list[dict]:
  """Checks roles and types; returns the messages as plain dicts. `where` prefixes the error."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise DataError(f"{where}: field 'messages' must be a non-empty list of "
                    f"{{'role', 'content'}} objects, got {type(messages).__name__}")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping):
      raise DataError(f"{where}: field 'messages[{i}]' must be an object with 'role' and "
                      f"'content', got {type(m).__name__}")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
      raise DataError(f"{where}: field 'messages[{i}].role' must be one of {', '.join(ROLES)}; "
                      f"got {role!r}")
    if not isinstance(content, str):
      raise DataError(f"{where}: field 'messages[{i}].content' expected a string, "
                      f"got {type(content).__name__}")
    if role == "system" and i != 0:
      raise DataError(f"{where}: field 'messages[{i}].role' is 'system', expected only as the "
                      "first message")
    tool_call = m.get("tool_call") or ""
    if tool_call and role != "assistant":
      raise DataError(f"{where}: field 'messages[{i}].tool_call' expected only on assistant "
                      f"messages, found on {role!r}")
    if not isinstance(tool_call, str):
      raise DataError(f"{where}: field 'messages[{i}].tool_call' expected a string, "
                      f"got {type(tool_call).__name__}")
    msg = {"role": role, "content": content}
    if tool_call:
      msg["tool_call"] = tool_call
    out.append(msg)
  return out


def as_messages(prompt: str | Sequence[Mapping], *, where: str = "prompt") -> list[dict]:
  """A prompt given as plain text is one user message."""
  if isinstance(prompt, str):
    return [{"role": "user", "content": prompt}]
  return validate_messages(prompt, where=where)


def render(messages: Sequence[Mapping], tokenizer, *, add_generation_prompt: bool = False
           ) -> tuple[list[int], list[int]]:
  """Returns (ids, loss_mask), equally long. See the module docstring for the format; a Hugging
  Face tokenizer brings its model's own template instead (gptjax/hf/tokenizer.py)."""
  messages = validate_messages(messages)
  if hasattr(tokenizer, "render_chat"):
    return tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)
  special = tokenizer.special_ids
  end = special["<|end|>"]
  ids, mask = [tokenizer.bos_id], [0]
  for m in messages:
    trained = int(m["role"] == "assistant")
    ids.append(special[_ROLE_MARKER[m["role"]]])
    mask.append(0)
    content = tokenizer.encode(m["content"])
    ids += content
    mask += [trained] * len(content)
    if "tool_call" in m:
      call = [special["<|tool_call|>"]] + tokenizer.encode(m["tool_call"])
      ids += call
      mask += [1] * len(call)
    ids.append(end)
    mask.append(trained)
  if add_generation_prompt:
    if messages[-1]["role"] == "assistant":
      raise DataError("messages: add_generation_prompt=True needs the last message to be from "
                      "user, system or tool; it is from the assistant")
    ids.append(special["<|assistant|>"])
    mask.append(0)
  return ids, mask


def render_prompt(messages: Sequence[Mapping] | str, tokenizer) -> list[int]:
  """The ids a sampler continues from: the conversation so far, ending at `<|assistant|>`."""
  return render(as_messages(messages), tokenizer, add_generation_prompt=True)[0]


def reply_ids(tokenizer, prompt, reply: str, *, ended: bool = True) -> list[int]:
  """The ids of an assistant `reply` to `prompt` as the template writes it after the generation
  prompt: its text, then (when the turn `ended`) the end of turn. gptjax's template ends a turn
  with `<|end|>`; a Hugging Face template writes its own end (e.g. "<|im_end|>\n"), found as
  what rendering the reply adds to the rendered prompt."""
  if not ended or not hasattr(tokenizer, "render_chat"):
    return tokenizer.encode(reply) + ([tokenizer.special_ids["<|end|>"]] if ended else [])
  messages = as_messages(prompt)
  before = tokenizer.render_chat(messages, add_generation_prompt=True)[0]
  after = tokenizer.render_chat(messages + [{"role": "assistant", "content": reply}])[0]
  if after[:len(before)] != before:
    raise DataError("chat template: rendering a reply changes the tokens of the prompt before "
                    "it, so the reply's ids cannot be separated from the prompt's")
  return after[len(before):]


def reply_stop_ids(tokenizer) -> tuple[int, ...]:
  """Ids that end an assistant turn: `<|end|>` and EOS (a Hugging Face model's: its EOS ids)."""
  if hasattr(tokenizer, "stop_ids"):
    return tuple(tokenizer.stop_ids)
  return tokenizer.special_ids["<|end|>"], tokenizer.eos_id


def parse_reply(ids: Sequence[int], tokenizer) -> str:
  """Decodes a sampled reply up to (not including) the first `<|end|>` or EOS; pad is dropped."""
  stops = set(reply_stop_ids(tokenizer))
  kept = []
  for i in ids:
    i = int(i)
    if i in stops:
      break
    if i != tokenizer.pad_id:
      kept.append(i)
  return tokenizer.decode(kept)
