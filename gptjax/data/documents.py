"""Sources turned into token documents, the items `PackedLoader` packs.

`TokenDocuments` tokenizes a text source once into one flat int32 array plus offsets (cached as .npy
next to the TFDS data when given a cache path), so the pretraining loader only slices arrays.
`ChatExamples` renders chats through the chat template on access, because SFT sets are small and the
template may change between runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Sequence

import numpy as np

from gptjax.data import chat


class TokenDocuments:
  """Random access to tokenized documents: docs[i] -> int32 array (a view, no copy)."""

  def __init__(self, tokens: np.ndarray, offsets: np.ndarray):
    self.tokens, self.offsets = tokens, offsets

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> np.ndarray:
    return self.tokens[self.offsets[i]:self.offsets[i + 1]]

  @property
  def num_tokens(self) -> int:
    return int(self.offsets[-1])

  @classmethod
  def from_texts(cls, texts, tokenizer, *, add_bos: bool = True, add_eos: bool = True
                 ) -> "TokenDocuments":
    pieces, lengths = [], [0]
    head = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    tail = [tokenizer.eos_id] if add_eos else []
    for text in texts:
      ids = head + tokenizer.encode(text) + tail
      pieces.append(np.asarray(ids, np.int32))
      lengths.append(len(ids))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    return cls(tokens, np.cumsum(lengths, dtype=np.int64))

  @classmethod
  def from_source(cls, source: Sequence[dict], tokenizer, *, field: str = "text",
                  add_bos: bool = True, add_eos: bool = True, cache_dir: str | None = None
                  ) -> "TokenDocuments":
    """Tokenizes `source[i][field]` for all i; with `cache_dir`, reuses an earlier run's arrays."""
    path = None
    if cache_dir:
      key = hashlib.sha256(json.dumps(
          [getattr(source, "spec", repr(type(source))), getattr(source, "split", ""), len(source),
           field, add_bos, add_eos, _tokenizer_fingerprint(tokenizer)]).encode()).hexdigest()[:16]
      path = os.path.join(cache_dir, f"tokens-{key}.npz")
      if os.path.exists(path):
        with np.load(path) as z:
          return cls(z["tokens"], z["offsets"])
    docs = cls.from_texts((source[i][field] for i in range(len(source))), tokenizer,
                          add_bos=add_bos, add_eos=add_eos)
    if path:
      os.makedirs(cache_dir, exist_ok=True)
      tmp = path + ".tmp.npz"
      np.savez(tmp, tokens=docs.tokens, offsets=docs.offsets)
      os.replace(tmp, path)
    return docs


def _tokenizer_fingerprint(tokenizer) -> str:
  if getattr(tokenizer, "kind", "") == "sentencepiece":
    with open(tokenizer.model_path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()
  return hashlib.sha256(repr((tokenizer.kind, getattr(tokenizer, "chars", ""),
                              tokenizer.vocab_size)).encode()).hexdigest()


class ChatExamples:
  """docs[i] -> (ids, loss_mask) of the rendered chat, or None when no assistant turn is trained.

  `to_messages` maps a source example to messages; the default reads its "messages" field. For
  the Shakespeare dialogue source, `dialogue_messages` makes the reply the assistant's turn.
  """

  def __init__(self, source: Sequence[dict], tokenizer, *,
               to_messages: Callable[[dict], list[dict]] | None = None):
    self.source, self.tokenizer = source, tokenizer
    self.to_messages = to_messages or (lambda ex: ex["messages"])

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int):
    ids, mask = chat.render(self.to_messages(self.source[i]), self.tokenizer)
    if not any(mask):
      return None
    return np.asarray(ids, np.int32), np.asarray(mask, np.float32)


def dialogue_messages(example: dict) -> list[dict]:
  """A Shakespeare speech as the user's turn and the next speaker's reply as the assistant's."""
  return [{"role": "user", "content": f"{example['prompt_speaker']}:\n{example['prompt']}"},
          {"role": "assistant", "content": f"{example['reply_speaker']}:\n{example['reply']}"}]
