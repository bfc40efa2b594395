"""Reading and validating the user file formats; every problem names `path:lineno` and the field.

    text_files        *.txt (a file is a document; long files are cut at blank lines)
                      *.jsonl  {"text": "..."}
    chat_jsonl        {"messages": [{"role": "system|user|assistant|tool", "content": "...",
                                     "tool_call": "... (assistant only, optional)"}]}
    preference_jsonl  {"prompt": "..." or messages, "chosen": "...", "rejected": "..."}
    prompts_jsonl     {"prompt": "..." or messages, "reference": "... (optional)"}

Empty strings: a message's `content` may be "" (an assistant turn that only makes a tool call, an
empty system prompt), and so may `chosen` or `rejected` (an empty reply is a reply), but the two
must differ (unless the record carries a whole ranking, whose replies may tie). A `text` document, a prompt given as a string, and a whole .txt file must say
something: empty or whitespace-only ones are errors, not silently dropped.

These functions do not know about TFDS; the builders in `builders.py` store what they return.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

from gptjax.data import chat
from gptjax.data.errors import DataError

# Cut long .txt files into documents of at most this many characters (at blank lines where
# possible), so that a single big file can still be shuffled and shared among processes.
MAX_DOCUMENT_CHARS = 16_384


def expand_paths(pattern: str, *, source: str) -> list[str]:
  """A glob, a comma-separated list of globs, or a directory (all files inside)."""
  paths = []
  for part in filter(None, (p.strip() for p in pattern.split(","))):
    part = os.path.expanduser(part)
    if os.path.isdir(part):
      part = os.path.join(part, "**", "*")
    paths += [p for p in glob.glob(part, recursive=True) if os.path.isfile(p)]
  paths = sorted(set(paths))
  if not paths:
    raise DataError(f"{source}: no files match {pattern!r}")
  return paths


def _not_utf8(path: str, data: bytes, e: UnicodeDecodeError, *, base: int = 0, lineno: int = 0,
               expected: str) -> DataError:
  """Names the byte (offset in the file) and line of an encoding error; Python's own message
  names neither the file nor the line."""
  offset = base + e.start
  if not lineno:
    lineno = data.count(b"\n", 0, e.start) + 1
  return DataError(f"{path}:{lineno}: field '<bytes>' is not UTF-8 ({e.reason}: byte "
                   f"0x{data[e.start]:02x} at byte offset {offset} of the file); expected "
                   f"{expected}")


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
  """Yields (lineno, object) for each non-blank line; bad JSON raises DataError at its line."""
  with open(path, "rb") as f:
    offset = 0
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise _not_utf8(path, raw, e, base=offset, lineno=lineno,
                        expected="UTF-8 text, one JSON object per line") from None
      offset += len(raw)
      # Without its newline, so that an error's column is on this line (a line cut short used to
      # be reported at "column 1" of the next one).
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        if e.pos >= len(line.rstrip()) or e.msg.startswith("Unterminated string"):
          raise DataError(f"{path}:{lineno}: field '<line>' ends before its JSON object does "
                          f"({e.msg}: column {e.colno} of {len(line)}; was the file cut "
                          "short?); expected one whole JSON object per line") from None
        raise DataError(f"{path}:{lineno}: field '<line>' is not valid JSON ({e.msg}: column "
                        f"{e.colno}); expected one JSON object per line") from None
      if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: field '<line>' expected a JSON object, "
                        f"got {type(obj).__name__}")
      yield lineno, obj


def _string(obj: dict, field: str, where: str, *, optional: bool = False) -> str:
  if field not in obj or obj[field] is None:
    if optional:
      return ""
    raise DataError(f"{where}: field '{field}' is missing; expected a string")
  value = obj[field]
  if not isinstance(value, str):
    raise DataError(f"{where}: field '{field}' expected a string, got {type(value).__name__}")
  return value


def _messages(value, field: str, where: str, *, prompt: bool = False) -> list[dict]:
  if prompt and isinstance(value, str) and not value.strip():
    raise DataError(f"{where}: field '{field}' is empty; expected the text of a prompt")
  if prompt and not isinstance(value, (str, list)):
    raise DataError(f"{where}: field '{field}' expected a string or a messages list, got "
                    f"{type(value).__name__}")
  try:
    if isinstance(value, str):
      return chat.as_messages(value)
    messages = chat.validate_messages(value, where=where)
    if prompt and messages[-1]["role"] == "assistant":
      # A sampler continues a prompt with the assistant's turn; one that ends with the
      # assistant's own message would fail only when sampled, far from this line.
      raise DataError(f"{where}: field 'messages[{len(messages) - 1}].role' is 'assistant'; "
                      "expected a prompt to end with a user, system or tool message")
    return messages
  except DataError as e:
    # Name the field as it appears in the file ("prompt", not "messages") when they differ.
    msg = str(e)
    if field != "messages":
      msg = msg.replace("field 'messages", f"field '{field}")
    raise DataError(msg) from None


def prompt_messages(value, where: str, field: str = "prompt") -> list[dict]:
  """A prompt field (a non-empty string, or messages not ending with the assistant), checked."""
  return _messages(value, field, where, prompt=True)


def split_text(text: str, max_chars: int = MAX_DOCUMENT_CHARS) -> list[str]:
  """Cuts text into pieces of at most `max_chars`, at blank lines where possible."""
  if len(text) <= max_chars:
    return [text] if text.strip() else []
  docs, current = [], ""
  for para in text.split("\n\n"):
    piece = para + "\n\n"
    if current and len(current) + len(piece) > max_chars:
      docs.append(current)
      current = ""
    while len(piece) > max_chars:
      docs.append(piece[:max_chars])
      piece = piece[max_chars:]
    current += piece
  if current.strip():
    docs.append(current)
  return docs


def text_records(path: str, *, field: str = "text") -> Iterator[tuple[str, dict]]:
  if path.endswith(".jsonl"):
    for lineno, obj in read_jsonl(path):
      text = _string(obj, field, f"{path}:{lineno}")
      if not text.strip():
        raise DataError(f"{path}:{lineno}: field '{field}' is empty; expected a document's text "
                        "(leave empty documents out of the file)")
      yield f"{path}:{lineno}", {"text": text}
  else:
    with open(path, "rb") as f:
      data = f.read()
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError as e:
      raise _not_utf8(path, data, e, expected=f"UTF-8 text (a .txt file, or .jsonl with a "
                      f"'{field}' field)") from None
    if not text.strip():
      raise DataError(f"{path}:1: field '<file>' is empty; expected a document's text (leave "
                      "empty files out of the glob)")
    for i, doc in enumerate(split_text(text)):
      yield f"{path}#{i}", {"text": doc}


def chat_records(path: str) -> Iterator[tuple[str, dict]]:
  for lineno, obj in read_jsonl(path):
    where = f"{path}:{lineno}"
    if "messages" not in obj:
      raise DataError(f"{where}: field 'messages' is missing; expected a list of "
                      "{'role', 'content'} objects")
    if not isinstance(obj["messages"], list):
      # A prompt may be a bare string; a conversation must be a list of turns.
      raise DataError(f"{where}: field 'messages' expected a list of {{'role', 'content'}} "
                      f"objects, got {type(obj['messages']).__name__}")
    yield where, {"messages": _messages(obj["messages"], "messages", where)}


def preference_records(path: str) -> Iterator[tuple[str, dict]]:
  for lineno, obj in read_jsonl(path):
    where = f"{path}:{lineno}"
    if "prompt" not in obj:
      raise DataError(f"{where}: field 'prompt' is missing; expected a string or a messages list")
    record = {"prompt": _messages(obj["prompt"], "prompt", where, prompt=True),
              "chosen": _string(obj, "chosen", where),
              "rejected": _string(obj, "rejected", where)}
    # (A generated record that carries the whole ranking may have tied replies; a plain pair
    # of equal replies is a mistake.)
    if record["chosen"] == record["rejected"] and "responses" not in obj:
      raise DataError(f"{where}: field 'rejected' equals 'chosen'; expected two different replies "
                      "(a pair of equal replies says nothing about which is better)")
    yield where, record


def prompt_records(path: str) -> Iterator[tuple[str, dict]]:
  for lineno, obj in read_jsonl(path):
    where = f"{path}:{lineno}"
    if "prompt" not in obj:
      raise DataError(f"{where}: field 'prompt' is missing; expected a string or a messages list")
    yield where, {"prompt": _messages(obj["prompt"], "prompt", where, prompt=True),
                  "reference": _string(obj, "reference", where, optional=True)}


READERS = {
    "text_files": text_records,
    "chat_jsonl": chat_records,
    "preference_jsonl": preference_records,
    "prompts_jsonl": prompt_records,
}
