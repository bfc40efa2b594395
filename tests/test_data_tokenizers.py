import os

import pytest
import sentencepiece as spm

from gptjax.data.sentencepiece_tokenizer import SentencePieceTokenizer, train_sentencepiece
from gptjax.data.shakespeare import corpus_text
from gptjax.data.tokenizers import SPECIAL_TOKENS, CharTokenizer, load_tokenizer
from gptjax.data.tokenizer_cli import tokenizer_main

SAMPLE = "HAMLET:\nTo be, or  not to be:\tthat is the question.\n\n  ¿Qué? 😀 <|user|> <eos>\n"


@pytest.fixture(scope="module")
def shakespeare_slice():
  return corpus_text("train")[:60_000]


@pytest.fixture(scope="module")
def sp_tok(shakespeare_slice, tmp_path_factory):
  return train_sentencepiece([shakespeare_slice], vocab_size=320, model_type="bpe",
                             out_dir=str(tmp_path_factory.mktemp("sp")))


def _check_specials(tok):
  ids = [tok.special_ids[name] for name in SPECIAL_TOKENS]
  assert len(set(ids)) == len(SPECIAL_TOKENS)
  assert len({tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id}) == 4
  assert all(0 <= i < tok.vocab_size for i in ids)


def test_char_round_trip(shakespeare_slice, tmp_path):
  tok = CharTokenizer.from_text(shakespeare_slice)
  text = shakespeare_slice[:500]
  assert tok.decode(tok.encode(text)) == text
  _check_specials(tok)
  tok.save(str(tmp_path))
  assert load_tokenizer(str(tmp_path)).encode(text) == tok.encode(text)


def test_sentencepiece_round_trip_and_specials(sp_tok, shakespeare_slice):
  for text in (SAMPLE, shakespeare_slice[:2000]):
    assert sp_tok.decode(sp_tok.encode(text)) == text
  _check_specials(sp_tok)
  assert sp_tok.vocab_size == 320
  # Plain text that spells a marker is encoded as text, never as the special id.
  special = set(sp_tok.special_ids.values())
  assert not special & set(sp_tok.encode(SAMPLE))
  end = sp_tok.special_ids["<|end|>"]
  assert sp_tok.decode([sp_tok.bos_id] + sp_tok.encode("hi") + [end, sp_tok.pad_id]) == "<bos>hi<|end|>"


def test_sentencepiece_save_load(sp_tok, tmp_path):
  sp_tok.save(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer.model"]
  again = load_tokenizer(str(tmp_path))
  assert again.encode(SAMPLE) == sp_tok.encode(SAMPLE)
  assert again.special_ids == sp_tok.special_ids
  assert load_tokenizer(str(tmp_path / "tokenizer.model")).vocab_size == 320


def test_unigram_trains(shakespeare_slice, tmp_path):
  tok = train_sentencepiece([shakespeare_slice], vocab_size=400, model_type="unigram",
                            out_dir=str(tmp_path))
  assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
  _check_specials(tok)


def test_foreign_model_without_pad_gets_extra_ids(shakespeare_slice, tmp_path):
  # A LLaMA-style model: unk=0, bos=1, eos=2, no pad, no chat markers.
  prefix = str(tmp_path / "llama")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(shakespeare_slice.split("\n\n")),
                                 model_prefix=prefix, vocab_size=340, model_type="bpe",
                                 byte_fallback=True, character_coverage=0.9995, minloglevel=2)
  tok = SentencePieceTokenizer(prefix + ".model")
  assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  # pad and the six chat markers are appended after the model's 340 pieces.
  assert tok.pad_id == 340
  assert tok.vocab_size == 340 + 7
  _check_specials(tok)
  assert tok.decode(tok.encode("To be") + [tok.pad_id]) == "To be"


def test_vocab_too_small_is_clear(shakespeare_slice, tmp_path):
  with pytest.raises(ValueError, match="vocab_size=100"):
    train_sentencepiece([shakespeare_slice], vocab_size=100, out_dir=str(tmp_path))


def test_cli_trains_from_text_files(tmp_path, shakespeare_slice):
  (tmp_path / "a.txt").write_text(shakespeare_slice)
  out = tmp_path / "tok"
  rc = tokenizer_main(["train", "--source", f"text_files:{tmp_path}/*.txt", "--vocab_size", "330",
                       "--out", str(out), "--data_dir", str(tmp_path / "tfds")])
  assert rc == 0
  tok = load_tokenizer(str(out))
  assert tok.vocab_size == 330 and tok.decode(tok.encode(SAMPLE)) == SAMPLE
