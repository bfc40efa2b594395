"""SentencePiece behind the tokenizer interface of `tokenizers.py`, and training a new model.

Special tokens. Models trained here own every name in `SPECIAL_TOKENS`: pad, bos, eos and unk take
ids 0..3 (set explicitly, so they are always distinct) and the chat markers are SentencePiece
*control* symbols. We chose control symbols over user-defined symbols on purpose: both are single
pieces with fixed ids, but SentencePiece matches user-defined symbols inside ordinary text, so a
document that merely quotes "<|user|>" would smuggle a real turn marker into training. Control
symbols are never produced by `encode`; the chat template asks for them by id through
`special_ids`. Normalisation is the identity and whitespace is kept as is, and with byte fallback
every string round-trips exactly (`decode(encode(s)) == s`).

Models trained elsewhere (e.g. a LLaMA-style `.model` with no pad piece) load too. Any special
token the model lacks gets a fresh id after the model's own pieces, in `SPECIAL_TOKENS` order:
ids `piece_size, piece_size + 1, ...`, and `vocab_size` counts them, so the embedding table is sized
to cover them. SentencePiece's own bos/eos/unk/pad are used when the model defines them. The extra
ids never come out of `encode` and decode to their names (pad decodes to nothing), as in
`CharTokenizer`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from typing import Iterable

import sentencepiece as spm

from gptjax.data.tokenizers import SPECIAL_TOKENS, TOKENIZER_FILE

MODEL_FILE = "tokenizer.model"
_CORE = {"<pad>": "pad_id", "<bos>": "bos_id", "<eos>": "eos_id", "<unk>": "unk_id"}
_CHAT_MARKERS = tuple(t for t in SPECIAL_TOKENS if t not in _CORE)


class SentencePieceTokenizer:
  """A SentencePiece model file; see the module docstring for how special ids are assigned."""

  kind = "sentencepiece"

  def __init__(self, model_path: str):
    if not os.path.exists(model_path):
      raise FileNotFoundError(f"no SentencePiece model at {model_path}")
    self.model_path = model_path
    self.sp = spm.SentencePieceProcessor(model_file=model_path)
    piece_size = self.sp.get_piece_size()
    special_ids, extra = {}, 0
    for name in SPECIAL_TOKENS:
      i = self._own_id(name)
      if i is None:
        i, extra = piece_size + extra, extra + 1
      special_ids[name] = i
    self.special_ids = special_ids
    self._piece_size = piece_size
    self._vocab_size = piece_size + extra
    self._names = {i: name for name, i in special_ids.items()}
    self.pad_id = special_ids["<pad>"]
    self.bos_id = special_ids["<bos>"]
    self.eos_id = special_ids["<eos>"]
    self.unk_id = special_ids["<unk>"]

  def _own_id(self, name: str) -> int | None:
    if name in _CORE:
      i = getattr(self.sp, _CORE[name])()
      return i if i >= 0 else None
    i = self.sp.piece_to_id(name)
    # piece_to_id answers unk for a missing piece, so check the piece really is the marker.
    return i if self.sp.id_to_piece(i) == name else None

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids) -> str:
    out, run = [], []
    for i in ids:
      i = int(i)
      if i in self._names:
        if run:
          out.append(self.sp.decode(run))
          run = []
        if i != self.pad_id:
          out.append(self._names[i])
      elif 0 <= i < self._piece_size:
        run.append(i)
    if run:
      out.append(self.sp.decode(run))
    return "".join(out)

  def id_to_piece(self, i: int) -> str:
    i = int(i)
    return self._names[i] if i in self._names else self.sp.id_to_piece(i)

  def token_bytes(self) -> list[bytes | None]:
    """The bytes each id spells, for constrained decoding: a piece's text with `▁` as a space,
    a byte piece `<0xNN>` its byte, None for control, unknown and unused pieces and the ids
    added for special tokens. A sequence spells the concatenation; `decode` also drops the
    space of a leading `▁` (the dummy prefix), which this does not."""
    out: list[bytes | None] = []
    for i in range(self._piece_size):
      piece = self.sp.id_to_piece(i)
      if self.sp.is_byte(i):
        out.append(bytes([int(piece[3:5], 16)]))
      elif (self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.is_unused(i)
            or i in self._names):
        out.append(None)
      else:
        out.append(piece.replace("\u2581", " ").encode())
    return out + [None] * (self._vocab_size - self._piece_size)

  def save(self, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, MODEL_FILE)
    if os.path.abspath(target) != os.path.abspath(self.model_path):
      shutil.copyfile(self.model_path, target)
    path = os.path.join(directory, TOKENIZER_FILE)
    with open(path, "w") as f:
      json.dump({"kind": "sentencepiece", "model": MODEL_FILE}, f)
    return path


def _sentences(texts: Iterable[str], max_chars: int):
  """Splits texts into line-aligned chunks: SentencePiece silently skips over-long sentences."""
  for text in texts:
    chunk, size = [], 0
    for line in text.split("\n"):
      if size + len(line) + 1 > max_chars and chunk:
        yield "\n".join(chunk)
        chunk, size = [], 0
      # A single line longer than the limit is cut; only its statistics are lost, not the text.
      while len(line) > max_chars:
        yield line[:max_chars]
        line = line[max_chars:]
      chunk.append(line)
      size += len(line) + 1
    if any(chunk):
      yield "\n".join(chunk)


# Tried in order when the caller leaves character_coverage to us: byte fallback makes any coverage
# lossless, so a small vocabulary simply spends fewer ids on rare characters.
_COVERAGES = (1.0, 0.9995, 0.999, 0.995, 0.99, 0.985, 0.98)  # SentencePiece allows >= 0.98


def train_sentencepiece(texts_iter: Iterable[str], *, vocab_size: int, model_type: str = "bpe",
                        out_dir: str, character_coverage: float | None = None,
                        max_sentence_chars: int = 2048, input_sentence_size: int = 2_000_000,
                        num_threads: int | None = None, seed_sentencepiece_size: int = 1_000_000,
                        ) -> SentencePieceTokenizer:
  """Trains a byte-fallback model owning all `SPECIAL_TOKENS`, saves it into `out_dir` (the
  `.model` plus tokenizer.json) and returns the loaded tokenizer."""
  if model_type not in ("bpe", "unigram"):
    raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
  min_vocab = 256 + len(SPECIAL_TOKENS) + 1
  if vocab_size < min_vocab:
    raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback needs 256 byte pieces "
                     f"plus {len(SPECIAL_TOKENS)} special tokens, so at least {min_vocab}")
  sentences = list(_sentences(texts_iter, max_sentence_chars))
  if not sentences:
    raise ValueError("train_sentencepiece got no text")
  options = dict(
      vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
      pad_id=0, bos_id=1, eos_id=2, unk_id=3,
      pad_piece="<pad>", bos_piece="<bos>", eos_piece="<eos>", unk_piece="<unk>",
      control_symbols=list(_CHAT_MARKERS),
      # Identity normalisation and kept whitespace make decode(encode(s)) == s for any s.
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, split_digits=True,
      max_sentence_length=4 * max_sentence_chars + 16,
      input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
      seed_sentencepiece_size=seed_sentencepiece_size,
      num_threads=num_threads or os.cpu_count() or 1, minloglevel=2,
  )
  if model_type == "unigram":
    # Small corpora cannot always fill a unigram vocabulary; a slightly smaller one is fine.
    options["hard_vocab_limit"] = False
  coverages = (character_coverage,) if character_coverage is not None else _COVERAGES
  model = None
  for coverage in coverages:
    buf = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf,
                                     character_coverage=coverage, **options)
    except RuntimeError as e:
      if "required_chars" not in str(e):
        raise
      if coverage != coverages[-1]:
        continue
      raise ValueError(f"vocab_size={vocab_size} cannot hold the 256 byte pieces, "
                       f"{len(SPECIAL_TOKENS)} special tokens and this text's common characters "
                       f"(SentencePiece: {str(e).split('required_chars.')[-1].strip()}); "
                       "raise vocab_size") from None
    model = buf.getvalue()
    break
  os.makedirs(out_dir, exist_ok=True)
  model_path = os.path.join(out_dir, MODEL_FILE)
  with open(model_path, "wb") as f:
    f.write(model)
  tok = SentencePieceTokenizer(model_path)
  tok.save(out_dir)
  return tok
