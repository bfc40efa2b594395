"""`gptjax tokenizer train ...`: trains a SentencePiece tokenizer on any text-like source.

    gptjax tokenizer train --source shakespeare --vocab_size 512 --model_type bpe --out DIR
    gptjax tokenizer train --source text_files:'data/*.txt' --vocab_size 8192 --out DIR
    gptjax tokenizer train --source chat_jsonl:chats.jsonl --vocab_size 4096 --out DIR

Sources are those of `open_source` (train split); `shakespeare` alone means `shakespeare:text`.
Chats contribute their message contents; preference files their prompt, chosen and rejected texts.
"""

from __future__ import annotations

import argparse
import sys

from gptjax.data.errors import DataError
from gptjax.data.sources import open_source


def _texts(example: dict):
  for key, value in example.items():
    if isinstance(value, str) and key in ("text", "prompt", "reply", "chosen", "rejected",
                                          "reference"):
      yield value
    elif isinstance(value, list):
      for m in value:
        yield m["content"]
        if m.get("tool_call"):
          yield m["tool_call"]


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="gptjax tokenizer", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train a SentencePiece model")
  t.add_argument("--source", action="append", required=True,
                 help="source spec (repeatable), e.g. shakespeare or text_files:GLOB")
  t.add_argument("--vocab_size", type=int, required=True)
  t.add_argument("--model_type", choices=("bpe", "unigram"), default="bpe")
  t.add_argument("--out", required=True, help="directory for tokenizer.model and tokenizer.json")
  t.add_argument("--data_dir", default=None, help="TFDS data dir (default ~/.cache/gptjax/tfds)")
  t.add_argument("--character_coverage", type=float, default=None)
  t.add_argument("--max_examples", type=int, default=None, help="read at most this many examples")
  return p


def tokenizer_main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  from gptjax.data.sentencepiece_tokenizer import train_sentencepiece

  def texts():
    for spec in args.source:
      spec = "shakespeare:text" if spec == "shakespeare" else spec
      source = open_source(spec, split="train", data_dir=args.data_dir)
      n = len(source) if args.max_examples is None else min(len(source), args.max_examples)
      for i in range(n):
        yield from _texts(source[i])

  from gptjax.config import ConfigError
  if args.max_examples is not None and args.max_examples <= 0:
    raise ConfigError(f"--max_examples: expected > 0, got {args.max_examples}")
  try:
    tok = train_sentencepiece(texts(), vocab_size=args.vocab_size, model_type=args.model_type,
                              out_dir=args.out, character_coverage=args.character_coverage)
  except ValueError as e:
    if isinstance(e, DataError):
      raise
    # Too small a vocabulary, no text at all, a coverage SentencePiece refuses: the flags'.
    raise ConfigError(f"gptjax tokenizer train: {e}") from None
  print(f"wrote {args.out}: {args.model_type} vocab_size={tok.vocab_size} "
        f"special ids {tok.special_ids}")
  return 0


if __name__ == "__main__":
  sys.exit(tokenizer_main(sys.argv[1:]))
