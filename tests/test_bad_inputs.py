"""A corpus of malformed input files, one for each way a documented format can be wrong.

Every file must be rejected with a DataError whose message starts `path:line: field '...'`, and
never be accepted. Most cases call the readers in-process (what `gptjax train` and `gptjax
tokenizer train` call through `open_source`); a few run both commands to check the same files end
in one line and exit status 2, never a traceback.

Empty strings (the README's choice): a message's content and a chosen or rejected reply may be
empty; a text document, a string prompt and a whole .txt file may not, and a plain pair's two
replies must differ.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import MICRO, REPO, child_env
from gptjax.data import records, tokenizers
from gptjax.data.errors import DataError
from gptjax.stages import reward as reward_stage

OK_MSG = {"role": "user", "content": "hi"}
BOT = {"role": "assistant", "content": "hello"}


def j(obj):
  return json.dumps(obj).encode()


# (name, reader, file suffix, content bytes, line, field pattern)
CORPUS = [
    # text_files: .jsonl with a "text" field
    ("text_not_json", "text_files", ".jsonl", b"{not json}\n", 1, r"'<line>' is not valid JSON"),
    ("text_cut_short", "text_files", ".jsonl", b'{"text": "ok"}\n{"text": "ab\n', 2,
     r"'<line>' ends before its JSON object"),
    ("text_cut_short_crlf", "text_files", ".jsonl", b'{"text": "a"\r\n', 1, r"'<line>' ends before"),
    ("text_array", "text_files", ".jsonl", b"[1, 2]\n", 1, r"'<line>' expected a JSON object"),
    ("text_string_line", "text_files", ".jsonl", b'"just text"\n', 1, r"'<line>' expected a JSON object"),
    ("text_missing", "text_files", ".jsonl", b'{"body": "x"}\n', 1, r"'text' is missing"),
    ("text_null", "text_files", ".jsonl", b'{"text": null}\n', 1, r"'text' is missing"),
    ("text_int", "text_files", ".jsonl", b'{"text": 5}\n', 1, r"'text' expected a string"),
    ("text_list", "text_files", ".jsonl", b'{"text": ["a"]}\n', 1, r"'text' expected a string"),
    ("text_empty", "text_files", ".jsonl", b'{"text": ""}\n', 1, r"'text' is empty"),
    ("text_blank", "text_files", ".jsonl", b'{"text": " \\n "}\n', 1, r"'text' is empty"),
    ("text_trailing_garbage", "text_files", ".jsonl", b'{"text": "a"} x\n', 1, r"'<line>' is not valid JSON"),
    ("text_third_line", "text_files", ".jsonl", b'{"text": "a"}\n\n{"text": "b"}\n{"text": 1}\n',
     4, r"'text' expected a string"),
    ("text_jsonl_not_utf8", "text_files", ".jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', 2,
     r"'<bytes>' is not UTF-8 .*byte 0xff at byte offset 25 of the file"),
    # text_files: .txt
    ("txt_not_utf8", "text_files", ".txt", b"hello\nw\xe9rld\n", 2,
     r"'<bytes>' is not UTF-8 .*byte 0xe9 at byte offset 7 of the file"),
    ("txt_utf16", "text_files", ".txt", "hi".encode("utf-16"), 1, r"'<bytes>' is not UTF-8"),
    ("txt_empty", "text_files", ".txt", b"", 1, r"'<file>' is empty"),
    ("txt_blank", "text_files", ".txt", b"  \n\n \t\n", 1, r"'<file>' is empty"),
    # chat_jsonl
    ("chat_no_messages", "chat_jsonl", ".jsonl", j({"msgs": [OK_MSG]}), 1, r"'messages' is missing"),
    ("chat_messages_string", "chat_jsonl", ".jsonl", j({"messages": "hi"}), 1,
     r"'messages' expected a list"),
    ("chat_messages_dict", "chat_jsonl", ".jsonl", j({"messages": OK_MSG}), 1,
     r"'messages' expected a list"),
    ("chat_messages_null", "chat_jsonl", ".jsonl", j({"messages": None}), 1,
     r"'messages' expected a list"),
    ("chat_messages_empty", "chat_jsonl", ".jsonl", j({"messages": []}), 1,
     r"'messages' must be a non-empty list"),
    ("chat_message_string", "chat_jsonl", ".jsonl", j({"messages": ["hi"]}), 1,
     r"'messages\[0\]' must be an object"),
    ("chat_bad_role", "chat_jsonl", ".jsonl", j({"messages": [OK_MSG, {"role": "bot", "content": "x"}]}),
     1, r"'messages\[1\].role' must be one of"),
    ("chat_no_role", "chat_jsonl", ".jsonl", j({"messages": [{"content": "x"}]}), 1,
     r"'messages\[0\].role' must be one of"),
    ("chat_role_case", "chat_jsonl", ".jsonl", j({"messages": [{"role": "User", "content": "x"}]}),
     1, r"'messages\[0\].role' must be one of"),
    ("chat_no_content", "chat_jsonl", ".jsonl", j({"messages": [{"role": "user"}]}), 1,
     r"'messages\[0\].content' expected a string"),
    ("chat_content_int", "chat_jsonl", ".jsonl", j({"messages": [{"role": "user", "content": 3}]}),
     1, r"'messages\[0\].content' expected a string"),
    ("chat_content_list", "chat_jsonl", ".jsonl",
     j({"messages": [{"role": "user", "content": ["a", "b"]}]}), 1,
     r"'messages\[0\].content' expected a string"),
    ("chat_system_late", "chat_jsonl", ".jsonl",
     j({"messages": [OK_MSG, {"role": "system", "content": "s"}]}), 1,
     r"'messages\[1\].role' is 'system'"),
    ("chat_tool_call_on_user", "chat_jsonl", ".jsonl",
     j({"messages": [{"role": "user", "content": "x", "tool_call": "f()"}]}), 1,
     r"'messages\[0\].tool_call' expected only on assistant"),
    ("chat_tool_call_int", "chat_jsonl", ".jsonl",
     j({"messages": [OK_MSG, {"role": "assistant", "content": "", "tool_call": 7}]}), 1,
     r"'messages\[1\].tool_call' expected a string"),
    ("chat_not_utf8", "chat_jsonl", ".jsonl", b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}\n',
     1, r"'<bytes>' is not UTF-8"),
    ("chat_cut_short", "chat_jsonl", ".jsonl", j({"messages": [OK_MSG]}) + b"\n" +
     b'{"messages": [{"role": "user", "cont', 2, r"'<line>' ends before its JSON object"),
    ("chat_two_objects_one_line", "chat_jsonl", ".jsonl", j({"messages": [OK_MSG]}) * 2, 1,
     r"'<line>' is not valid JSON"),
    # preference_jsonl
    ("pref_no_prompt", "preference_jsonl", ".jsonl", j({"chosen": "a", "rejected": "b"}), 1,
     r"'prompt' is missing"),
    ("pref_no_chosen", "preference_jsonl", ".jsonl", j({"prompt": "p", "rejected": "b"}), 1,
     r"'chosen' is missing"),
    ("pref_no_rejected", "preference_jsonl", ".jsonl", j({"prompt": "p", "chosen": "a"}), 1,
     r"'rejected' is missing"),
    ("pref_chosen_int", "preference_jsonl", ".jsonl", j({"prompt": "p", "chosen": 1, "rejected": "b"}),
     1, r"'chosen' expected a string"),
    ("pref_rejected_list", "preference_jsonl", ".jsonl",
     j({"prompt": "p", "chosen": "a", "rejected": ["b"]}), 1, r"'rejected' expected a string"),
    ("pref_equal", "preference_jsonl", ".jsonl", j({"prompt": "p", "chosen": "same", "rejected": "same"}),
     1, r"'rejected' equals 'chosen'"),
    ("pref_both_empty", "preference_jsonl", ".jsonl", j({"prompt": "p", "chosen": "", "rejected": ""}),
     1, r"'rejected' equals 'chosen'"),
    ("pref_prompt_empty", "preference_jsonl", ".jsonl", j({"prompt": "", "chosen": "a", "rejected": "b"}),
     1, r"'prompt' is empty"),
    ("pref_prompt_int", "preference_jsonl", ".jsonl", j({"prompt": 3, "chosen": "a", "rejected": "b"}),
     1, r"'prompt' expected a string or a messages list"),
    ("pref_prompt_bad_role", "preference_jsonl", ".jsonl",
     j({"prompt": [{"role": "x", "content": "c"}], "chosen": "a", "rejected": "b"}), 1,
     r"'prompt\[0\].role' must be one of"),
    ("pref_prompt_ends_with_assistant", "preference_jsonl", ".jsonl",
     j({"prompt": [OK_MSG, BOT], "chosen": "a", "rejected": "b"}), 1,
     r"'prompt\[1\].role' is 'assistant'; expected a prompt to end"),
    ("pref_prompt_empty_list", "preference_jsonl", ".jsonl",
     j({"prompt": [], "chosen": "a", "rejected": "b"}), 1, r"'prompt' must be a non-empty list"),
    ("pref_not_utf8", "preference_jsonl", ".jsonl", b'{"prompt": "p\xfe", "chosen": "a", "rejected": "b"}\n',
     1, r"'<bytes>' is not UTF-8"),
    # prompts_jsonl
    ("prompts_no_prompt", "prompts_jsonl", ".jsonl", j({"reference": "4"}), 1, r"'prompt' is missing"),
    ("prompts_reference_int", "prompts_jsonl", ".jsonl", j({"prompt": "2+2", "reference": 4}), 1,
     r"'reference' expected a string"),
    ("prompts_empty", "prompts_jsonl", ".jsonl", j({"prompt": ""}), 1, r"'prompt' is empty"),
    ("prompts_blank", "prompts_jsonl", ".jsonl", j({"prompt": "  \n"}), 1, r"'prompt' is empty"),
    ("prompts_null", "prompts_jsonl", ".jsonl", j({"prompt": None}), 1,
     r"'prompt' expected a string or a messages list"),
    ("prompts_ends_with_assistant", "prompts_jsonl", ".jsonl", j({"prompt": [OK_MSG, BOT]}), 1,
     r"'prompt\[1\].role' is 'assistant'"),
    ("prompts_cut_short", "prompts_jsonl", ".jsonl", b'{"prompt": "a"', 1, r"'<line>' ends before"),
    # the reward stage's ranked preferences (rm_data's output, or the user's own)
    ("rank_one_response", "reward", ".jsonl", j({"prompt": "p", "responses": ["a"], "ranks": [0]}),
     1, r"'responses' expected a list of at least 2"),
    ("rank_ranks_short", "reward", ".jsonl", j({"prompt": "p", "responses": ["a", "b"], "ranks": [1]}),
     1, r"'ranks' expected 2 integers"),
    ("rank_ranks_float", "reward", ".jsonl",
     j({"prompt": "p", "responses": ["a", "b"], "ranks": [1.5, 0]}), 1, r"'ranks' expected 2 integers"),
    ("rank_scores_short", "reward", ".jsonl",
     j({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 0], "scores": [0.1]}), 1,
     r"'scores' expected 2 numbers"),
    ("rank_ended_strings", "reward", ".jsonl",
     j({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 0], "ended": ["yes", "no"]}), 1,
     r"'ended' expected 2 booleans"),
    ("rank_response_ids_bad", "reward", ".jsonl",
     j({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 0], "response_ids": [[1], [-2]]}), 1,
     r"'response_ids' expected 2 lists of token ids"),
    ("rank_pair_equal", "reward", ".jsonl", j({"prompt": "p", "chosen": "x", "rejected": "x"}), 1,
     r"'rejected' equals 'chosen'"),
    ("rank_prompt_empty", "reward", ".jsonl", j({"prompt": "", "chosen": "x", "rejected": "y"}), 1,
     r"'prompt' is empty"),
    # a tokenizer directory's tokenizer.json
    ("tokenizer_not_json", "tokenizer", "/tokenizer.json", b'{"kind": "char", "chars": ', 1,
     r"'<file>' is not valid JSON"),
    ("tokenizer_kind", "tokenizer", "/tokenizer.json", j({"kind": "wordpiece"}), None,
     r"'kind' must be 'char' or 'sentencepiece'"),
]


def _read(reader: str, path: str):
  if reader == "reward":
    return reward_stage.read_preferences(path)
  if reader == "tokenizer":
    return tokenizers.load_tokenizer(os.path.dirname(path))
  return list(records.READERS[reader](path))


def _write(tmp_path, name, suffix, content) -> str:
  path = str(tmp_path / name) + suffix
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if suffix.endswith("jsonl") and not content.endswith(b"\n") and b"cut" not in name.encode():
    content += b"\n"
  with open(path, "wb") as f:
    f.write(content)
  return path


def test_the_corpus_is_large_and_covers_every_format():
  assert len(CORPUS) >= 50
  assert len({c[0] for c in CORPUS}) == len(CORPUS)
  assert {c[1] for c in CORPUS} == {*records.READERS, "reward", "tokenizer"}


@pytest.mark.parametrize("name, reader, suffix, content, line, field", CORPUS,
                         ids=[c[0] for c in CORPUS])
def test_each_malformed_file_is_rejected_at_its_line_and_field(tmp_path, name, reader, suffix,
                                                               content, line, field):
  path = _write(tmp_path, name, suffix, content)
  with pytest.raises(DataError) as info:
    _read(reader, path)
  msg = str(info.value)
  where = re.escape(path) + (f":{line}" if line else "")
  assert re.match(rf"{where}: field {field}", msg), msg
  assert "\n" not in msg


def test_empty_contents_that_are_allowed(tmp_path):
  """The other side of the empty-string choice: these are read, not rejected."""
  chat = _write(tmp_path, "chat", ".jsonl", j({"messages": [
      {"role": "system", "content": ""}, OK_MSG,
      {"role": "assistant", "content": "", "tool_call": "lookup()"}]}))
  assert list(records.chat_records(chat))[0][1]["messages"][0]["content"] == ""
  pref = _write(tmp_path, "pref", ".jsonl", j({"prompt": "p", "chosen": "a reply", "rejected": ""}))
  assert list(records.preference_records(pref))[0][1]["rejected"] == ""
  tied = _write(tmp_path, "tied", ".jsonl", j({"prompt": "p", "chosen": "x", "rejected": "x",
                                               "responses": ["x", "x"], "ranks": [0, 0]}))
  assert len(list(records.preference_records(tied))) == 1


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "gptjax.main", *args], env=child_env(), cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def _assert_one_line_exit_2(proc, path, line):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("gptjax:")]
  assert len(errors) == 1 and errors[0].startswith(f"gptjax: data error: {path}:{line}: field "), \
      proc.stderr[-3000:]


# Each costs a process start; the corpus above covers the rest in-process.
CLI_CASES = ["text_jsonl_not_utf8", "chat_bad_role", "pref_equal"]


def test_both_commands_exit_2_with_one_line(tmp_path):
  by_name = {c[0]: c for c in CORPUS}
  data_dir = str(tmp_path / "tfds")
  for name in CLI_CASES:
    _, reader, suffix, content, line, _ = by_name[name]
    path = _write(tmp_path, name, suffix, content)
    proc = _cli("tokenizer", "train", "--source", f"{reader}:{path}", "--vocab_size", "300",
                "--out", str(tmp_path / "tok"), "--data_dir", data_dir)
    _assert_one_line_exit_2(proc, path, line)
  # `gptjax train` on a bad text file and a bad chat file (pretraining and SFT read them).
  path = _write(tmp_path, "train_text", ".jsonl", by_name["text_third_line"][3])
  proc = _cli("train", "--config", MICRO, "--workdir", str(tmp_path / "w1"), "--no_progress",
              f"--config.data.source=text_files:{path}", f"--config.data.data_dir={data_dir}")
  _assert_one_line_exit_2(proc, path, 4)
  path = _write(tmp_path, "train_chat", ".jsonl", by_name["chat_bad_role"][3])
  sft = os.path.join(REPO, "experiments", "sft.py")
  proc = _cli("train", "--config", f"{sft}:micro", "--workdir", str(tmp_path / "w2"),
              "--no_progress", f"--config.data.source=chat_jsonl:{path}",
              f"--config.data.data_dir={data_dir}", "--config.data.tokenizer=char")
  _assert_one_line_exit_2(proc, path, 1)
