"""Reading and validating the user file formats; every problem names `path:lineno` and the field.

    text_files        *.txt (a file is a document; long files are cut at blank lines)
                      *.jsonl  {"text": "..."}
    chat_jsonl        {"messages": [{"role": "system|user|assistant|tool", "content": "...",
                                     "tool_call": "... (assistant only, optional)"}]}
    preference_jsonl  {"prompt": "..." or messages, "chosen": "...", "rejected": "..."}
    prompts_jsonl     {"prompt": "..." or messages, "reference": "... (optional)"}

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


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
  """Yields (lineno, object) for each non-blank line; bad JSON raises DataError at its line."""
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: field '<line>' is not valid JSON ({e.msg} at column "
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


def _messages(value, field: str, where: str) -> list[dict]:
  try:
    if isinstance(value, str):
      return chat.as_messages(value)
    return chat.validate_messages(value, where=where)
  except DataError as e:
    # Name the field as it appears in the file ("prompt", not "messages") when they differ.
    msg = str(e)
    if field != "messages":
      msg = msg.replace("field 'messages", f"field '{field}")
    raise DataError(msg) from None


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
      yield f"{path}:{lineno}", {"text": _string(obj, field, f"{path}:{lineno}")}
  else:
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: field '<file>' is not UTF-8 text ({e.reason} at byte "
                      f"{e.start}); expected a .txt file or .jsonl with a '{field}' field") from None
    for i, doc in enumerate(split_text(text)):
      yield f"{path}#{i}", {"text": doc}


def chat_records(path: str) -> Iterator[tuple[str, dict]]:
  for lineno, obj in read_jsonl(path):
    where = f"{path}:{lineno}"
    if "messages" not in obj:
      raise DataError(f"{where}: field 'messages' is missing; expected a list of "
                      "{'role', 'content'} objects")
    yield where, {"messages": _messages(obj["messages"], "messages", where)}


def preference_records(path: str) -> Iterator[tuple[str, dict]]:
  for lineno, obj in read_jsonl(path):
    where = f"{path}:{lineno}"
    if "prompt" not in obj:
      raise DataError(f"{where}: field 'prompt' is missing; expected a string or a messages list")
    yield where, {"prompt": _messages(obj["prompt"], "prompt", where),
                  "chosen": _string(obj, "chosen", where),
                  "rejected": _string(obj, "rejected", where)}


def prompt_records(path: str) -> Iterator[tuple[str, dict]]:
  for lineno, obj in read_jsonl(path):
    where = f"{path}:{lineno}"
    if "prompt" not in obj:
      raise DataError(f"{where}: field 'prompt' is missing; expected a string or a messages list")
    yield where, {"prompt": _messages(obj["prompt"], "prompt", where),
                  "reference": _string(obj, "reference", where, optional=True)}


READERS = {
    "text_files": text_records,
    "chat_jsonl": chat_records,
    "preference_jsonl": preference_records,
    "prompts_jsonl": prompt_records,
}
