"""Tokenizers share one small interface, so every stage can take either kind.

    tok.encode(text) -> list[int]        tok.decode(ids) -> str
    tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.special_ids (name -> id)
    tok.token_bytes() -> the bytes each id spells, None for special ids (constraints.py)
    tok.save(directory)                  load_tokenizer(directory)

Kinds: char (below), SentencePiece (sentencepiece_tokenizer.py) and Hugging Face `tokenizers`
(gptjax/hf/tokenizer.py, which brings the model's own special tokens and chat template).

Special tokens are reserved in every tokenizer: PAD, BOS and EOS are three distinct ids (pad is
never EOS, so a model can learn to stop while padding stays out of the loss), plus the chat
template's markers. `encode` never produces a special id from plain text; callers ask for them
by name through `special_ids`.
"""

from __future__ import annotations

import json
import os

from gptjax.data.errors import DataError

# Names of the reserved tokens, in id order for tokenizers that own their vocabulary.
SPECIAL_TOKENS = (
    "<pad>", "<bos>", "<eos>", "<unk>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<|tool_call|>", "<|tool_result|>",
)
TOKENIZER_FILE = "tokenizer.json"


class CharTokenizer:
  """Characters of a training text, after the reserved special tokens."""

  kind = "char"

  def __init__(self, chars: str):
    if len(set(chars)) != len(chars):
      raise ValueError("CharTokenizer characters must be unique")
    self.chars = chars
    self.special_ids = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    self._offset = len(SPECIAL_TOKENS)
    self._ids = {c: i + self._offset for i, c in enumerate(chars)}
    self.pad_id = self.special_ids["<pad>"]
    self.bos_id = self.special_ids["<bos>"]
    self.eos_id = self.special_ids["<eos>"]
    self.unk_id = self.special_ids["<unk>"]

  @classmethod
  def from_text(cls, text: str) -> "CharTokenizer":
    return cls("".join(sorted(set(text))))

  @property
  def vocab_size(self) -> int:
    return self._offset + len(self.chars)

  def encode(self, text: str) -> list[int]:
    get = self._ids.get
    return [get(c, self.unk_id) for c in text]

  def decode(self, ids) -> str:
    out = []
    for i in ids:
      i = int(i)
      if i >= self._offset:
        out.append(self.chars[i - self._offset])
      elif i != self.pad_id:
        out.append(SPECIAL_TOKENS[i] if i < len(SPECIAL_TOKENS) else "")
    return "".join(out)

  def id_to_piece(self, i: int) -> str:
    i = int(i)
    return self.chars[i - self._offset] if i >= self._offset else SPECIAL_TOKENS[i]

  def token_bytes(self) -> list[bytes | None]:
    """The UTF-8 bytes each id spells (None for special tokens), for constrained decoding."""
    return [None] * self._offset + [c.encode() for c in self.chars]

  def save(self, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, TOKENIZER_FILE)
    with open(path, "w") as f:
      json.dump({"kind": "char", "chars": self.chars}, f)
    return path


def load_tokenizer(directory_or_file: str):
  """Loads a tokenizer saved by `save` (a workdir, or its tokenizer.json), or a SentencePiece
  `.model` file directly."""
  path = directory_or_file
  if os.path.isdir(path):
    path = os.path.join(path, TOKENIZER_FILE)
  if path.endswith(".model"):
    from gptjax.data import sentencepiece_tokenizer
    return sentencepiece_tokenizer.SentencePieceTokenizer(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no tokenizer at {directory_or_file}: expected {TOKENIZER_FILE} "
                            "(written by tok.save) or a SentencePiece .model file")
  with open(path) as f:
    try:
      meta = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{e.lineno}: field '<file>' is not valid JSON ({e.msg}); expected "
                      "a tokenizer.json written by gptjax") from None
  if not isinstance(meta, dict):
    raise DataError(f"{path}:1: field '<file>' expected a JSON object")
  if meta.get("kind") == "char":
    return CharTokenizer(meta["chars"])
  if meta.get("kind") == "hf":
    from gptjax.hf.tokenizer import HFTokenizer
    return HFTokenizer(os.path.join(os.path.dirname(path), meta["dir"]), pad_id=meta["pad_id"])
  if "model" in meta and "added_tokens" in meta:
    # A Hugging Face tokenizer.json (a model directory given as data.tokenizer).
    from gptjax.hf.tokenizer import HFTokenizer
    return HFTokenizer(os.path.dirname(path) or ".")
  if meta.get("kind") == "sentencepiece":
    from gptjax.data import sentencepiece_tokenizer
    model = meta["model"]
    if not os.path.isabs(model):
      model = os.path.join(os.path.dirname(path), model)
    return sentencepiece_tokenizer.SentencePieceTokenizer(model)
  raise DataError(f"{path}: field 'kind' must be 'char' or 'sentencepiece', got {meta.get('kind')!r}")
