import json

import numpy as np
import pytest

from gptjax.data.documents import ChatExamples, TokenDocuments, dialogue_messages
from gptjax.data.errors import DataError
from gptjax.data.loader import PackedLoader
from gptjax.data.sources import open_source
from gptjax.data.tokenizers import CharTokenizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def test_shakespeare_text_and_tfds_path(data_dir):
  train = open_source("shakespeare:text", split="train", data_dir=data_dir)
  val = open_source("shakespeare:text", split="validation", data_dir=data_dir)
  assert len(train) > 3 * len(val) > 0
  assert {train[i]["play"] for i in range(len(train))}.isdisjoint(
      {val[i]["play"] for i in range(len(val))})
  ex = train[0]
  assert isinstance(ex["text"], str) and ":\n" in ex["text"]
  # The same files, read as a catalog dataset through the generic tfds: path.
  via_tfds = open_source("tfds:gptjax_shakespeare/text:text", split="validation", data_dir=data_dir)
  assert len(via_tfds) == len(val) and via_tfds[3] == {"text": val[3]["text"]}
  with pytest.raises(DataError, match="no feature 'nope'"):
    open_source("tfds:gptjax_shakespeare/text:nope", split="train", data_dir=data_dir)
  tok = CharTokenizer.from_text("".join(train[i]["text"] for i in range(len(train))))
  docs = TokenDocuments.from_source(val, tok, cache_dir=data_dir)
  again = TokenDocuments.from_source(val, tok, cache_dir=data_dir)
  np.testing.assert_array_equal(docs.tokens, again.tokens)
  assert tok.decode(docs[0][1:-1]) == val[0]["text"]


def test_shakespeare_dialogue(data_dir):
  val = open_source("shakespeare:dialogue", split="validation", data_dir=data_dir)
  ex = val[0]
  assert set(ex) == {"prompt", "reply", "prompt_speaker", "reply_speaker", "play", "scene"}
  assert ex["prompt_speaker"] != ex["reply_speaker"]
  tok = CharTokenizer.from_text("".join(val[i]["prompt"] + val[i]["reply"] + val[i]["reply_speaker"]
                                        + val[i]["prompt_speaker"] for i in range(200)) + ":")
  chats = ChatExamples([val[i] for i in range(200)], tok, to_messages=dialogue_messages)
  batch = next(PackedLoader(chats, seq_len=128, global_batch=2, seed=0, pad_id=tok.pad_id,
                            mode="best_fit", process_index=0, process_count=1))
  assert batch["loss_mask"].sum() > 0


def test_user_file_kinds(tmp_path, data_dir):
  (tmp_path / "a.txt").write_text("hello world\n\nsecond paragraph\n")
  _jsonl(tmp_path / "b.jsonl", [{"text": "from jsonl"}])
  texts = open_source(f"text_files:{tmp_path}/*.txt,{tmp_path}/b.jsonl", data_dir=data_dir)
  assert sorted(t["text"] for t in texts) == ["from jsonl", "hello world\n\nsecond paragraph\n"]

  msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
          {"role": "assistant", "content": "a", "tool_call": "f()"},
          {"role": "tool", "content": "r"}, {"role": "assistant", "content": "b"}]
  chats = open_source("chat_jsonl:" + _jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]),
                      data_dir=data_dir)
  assert chats[0]["messages"] == msgs

  prefs = open_source("preference_jsonl:" + _jsonl(tmp_path / "p.jsonl", [
      {"prompt": "q", "chosen": "good", "rejected": "bad"},
      {"prompt": msgs[:2], "chosen": "c", "rejected": "r"}]), data_dir=data_dir)
  got = sorted((p["prompt"][-1]["content"], p["chosen"]) for p in prefs)
  assert got == [("q", "good"), ("u", "c")]

  prompts = open_source("prompts_jsonl:" + _jsonl(tmp_path / "q.jsonl", [
      {"prompt": "2+2?", "reference": "4"}, {"prompt": "hi"}]), data_dir=data_dir)
  assert sorted(p["reference"] for p in prompts) == ["", "4"]


def test_val_fraction_and_missing_split(tmp_path, data_dir):
  path = _jsonl(tmp_path / "t.jsonl", [{"text": f"doc {i}"} for i in range(200)])
  train = open_source(f"text_files:{path}", data_dir=data_dir, val_fraction=0.2)
  val = open_source(f"text_files:{path}", split="validation", data_dir=data_dir, val_fraction=0.2)
  assert len(train) + len(val) == 200 and 20 < len(val) < 60
  with pytest.raises(DataError, match=r"source 'text_files:.*has no split 'validation'"):
    open_source(f"text_files:{path}", split="validation", data_dir=data_dir)


def test_rebuilds_when_file_changes(tmp_path, data_dir):
  p = tmp_path / "t.jsonl"
  _jsonl(p, [{"text": "one"}])
  assert len(open_source(f"text_files:{p}", data_dir=data_dir)) == 1
  _jsonl(p, [{"text": "one"}, {"text": "two"}])
  assert len(open_source(f"text_files:{p}", data_dir=data_dir)) == 2


def test_record_order_does_not_depend_on_where_the_file_lies(tmp_path, data_dir):
  # A run directory moved or copied elsewhere must give the same batches (a DPO stage reads its
  # pairs from its own run directory).
  rows = [{"prompt": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(40)]
  orders = []
  for where in ("a", "b/deeper"):
    (tmp_path / where).mkdir(parents=True)
    src = open_source("preference_jsonl:" + _jsonl(tmp_path / where / "pairs.jsonl", rows),
                      data_dir=data_dir)
    orders.append([r["chosen"] for r in src])
  assert orders[0] == orders[1] and sorted(orders[0]) == sorted(r["chosen"] for r in rows)


BAD = [
    ("chat_jsonl", ['{"messages": [{"role": "user", "content": "x"}]}', "{not json"],
     2, r"field '<line>' is not valid JSON"),
    ("chat_jsonl", ['{"messages": [{"role": "user", "content": "x"}]}', '{"msgs": []}'],
     2, r"field 'messages' is missing"),
    ("chat_jsonl", ['{"messages": [{"role": "robot", "content": "x"}]}'],
     1, r"field 'messages\[0\].role' must be one of system, user, assistant, tool"),
    ("chat_jsonl", ['{"messages": [{"role": "user", "content": 5}]}'],
     1, r"field 'messages\[0\].content' expected a string"),
    ("chat_jsonl", ['[1, 2]'], 1, r"field '<line>' expected a JSON object"),
    ("preference_jsonl", ['{"prompt": "p", "chosen": "c"}'], 1, r"field 'rejected' is missing"),
    ("preference_jsonl", ['{"prompt": "p", "chosen": 1, "rejected": "r"}'],
     1, r"field 'chosen' expected a string"),
    ("preference_jsonl", ['{"chosen": "c", "rejected": "r"}'], 1, r"field 'prompt' is missing"),
    ("preference_jsonl", ['{"prompt": [{"role": "x", "content": "c"}], "chosen": "c", "rejected": "r"}'],
     1, r"field 'prompt\[0\].role' must be one of"),
    ("prompts_jsonl", ['{"prompt": "a"}', '{"prompt": "b", "reference": 4}'],
     2, r"field 'reference' expected a string"),
    ("text_files", ['{"text": "a"}', '{"body": "b"}'], 2, r"field 'text' is missing"),
]


@pytest.mark.parametrize("kind, lines, lineno, match", BAD)
def test_bad_input_names_file_line_and_field(tmp_path, data_dir, kind, lines, lineno, match):
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(DataError, match=rf"{path}:{lineno}: {match}"):
    open_source(f"{kind}:{path}", data_dir=data_dir)


def test_bad_specs_and_empty_sources(tmp_path, data_dir):
  with pytest.raises(DataError, match="KIND:ARG"):
    open_source("parquet:/x", data_dir=data_dir)
  with pytest.raises(DataError, match="no files match"):
    open_source(f"chat_jsonl:{tmp_path}/missing*.jsonl", data_dir=data_dir)
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n\n")
  with pytest.raises(DataError, match=r"split 'train' is empty.*empty.jsonl"):
    open_source(f"chat_jsonl:{empty}", data_dir=data_dir)
  with pytest.raises(DataError, match="shakespeare has configs"):
    open_source("shakespeare:sonnets", data_dir=data_dir)
  with pytest.raises(DataError, match="could not open TFDS dataset"):
    open_source("tfds:gptjax_no_such_dataset:text", data_dir=data_dir)


def test_two_builders_racing_on_one_data_dir_both_get_the_data(tmp_path, data_dir, monkeypatch):
  """Processes sharing a data_dir may build the same dataset at once. Here a second build starts
  and finishes while the first is still writing; the first's final rename then finds the
  dataset in place, and it reads that copy instead of failing."""
  from gptjax.data import builders
  spec = "preference_jsonl:" + _jsonl(tmp_path / "p.jsonl", [
      {"prompt": "q", "chosen": "good", "rejected": "bad"},
      {"prompt": "r", "chosen": "fine", "rejected": "poor"}])
  original = builders.GptjaxPreferenceJsonl._generate_examples
  raced = []

  def racing(self, items):
    if not raced:
      raced.append(True)
      other = open_source(spec, data_dir=data_dir, val_fraction=0.0)   # the other process
      assert len(other) == 2
    yield from original(self, items)

  monkeypatch.setattr(builders.GptjaxPreferenceJsonl, "_generate_examples", racing)
  prefs = open_source(spec, data_dir=data_dir, val_fraction=0.0)
  assert raced
  assert sorted(p["chosen"] for p in prefs) == ["fine", "good"]


def test_building_a_local_dataset_says_so_without_tfds_download_message(tmp_path, capfd,
                                                                          caplog):
  """TFDS announces "Downloading and preparing dataset Unknown size" for builders that download
  nothing, and warns of a "custom data configuration" and a variant folder without
  dataset_info.json, the normal path here; ours say what happens instead, once, and nothing when
  the build is reused."""
  import logging
  caplog.set_level(logging.WARNING)
  path = _jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"text": "two"}])
  data_dir = str(tmp_path / "tfds")
  assert len(open_source("text_files:" + path, data_dir=data_dir)) == 2
  out = capfd.readouterr().out
  assert "Downloading" not in out and "Unknown size" not in out, out
  assert not [r for r in caplog.records if r.name == "absl"], caplog.text
  assert out.count("[data] preparing the ") == 1 and data_dir in out, out
  assert len(open_source("text_files:" + path, data_dir=data_dir)) == 2
  assert "[data]" not in capfd.readouterr().out
