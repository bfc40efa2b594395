"""A pretraining corpus from the config's `data.*` fields: the split's documents tokenized, and the
text a character vocabulary is built from. Shared by the pretraining runner and the scaling sweep
(which sizes its runs by the corpus), so neither imports the other."""

from __future__ import annotations

from gptjax.data import shakespeare
from gptjax.data.documents import TokenDocuments


def documents(cfg, split: str, tok, *, cache_dir: str):
  """The split's documents, tokenized (with BOS/EOS around each document) and cached."""
  if cfg.data.source == "shakespeare":
    train, val = shakespeare.split_plays(shakespeare.load_plays(), cfg.data.val_fraction)
    plays = train if split == "train" else val
    return TokenDocuments.from_texts([p.text() for p in plays], tok)
  from gptjax.data import sources
  src = sources.open_source(cfg.data.source, split=split, data_dir=cfg.data.data_dir or None,
                            val_fraction=cfg.data.val_fraction)
  return TokenDocuments.from_source(src, tok, field=cfg.data.text_field, cache_dir=cache_dir)


def char_vocab_text(cfg) -> str | None:
  """The training text a 'char' tokenizer is built from (None for any other tokenizer)."""
  if cfg.data.tokenizer != "char":
    return None
  if cfg.data.source == "shakespeare":
    return shakespeare.corpus_text("train", cfg.data.val_fraction)
  from gptjax.data import sources
  src = sources.open_source(cfg.data.source, split="train", data_dir=cfg.data.data_dir or None,
                            val_fraction=cfg.data.val_fraction)
  return "".join(src[i][cfg.data.text_field] for i in range(len(src)))
