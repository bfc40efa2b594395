import pytest

from gptjax.data import chat
from gptjax.data.errors import DataError
from gptjax.data.tokenizers import CharTokenizer

TOK = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ?!.()<>|")
S = TOK.special_ids

CONVO = [
    {"role": "system", "content": "be nice"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello", "tool_call": "f(x)"},
    {"role": "tool", "content": "ok"},
    {"role": "assistant", "content": "done"},
]


def test_layout_and_mask_cover_exactly_assistant_tokens():
  ids, mask = chat.render(CONVO, TOK)
  assert len(ids) == len(mask)
  enc = TOK.encode
  expected = ([TOK.bos_id, S["<|system|>"]] + enc("be nice") + [S["<|end|>"], S["<|user|>"]]
              + enc("hi") + [S["<|end|>"], S["<|assistant|>"]] + enc("hello")
              + [S["<|tool_call|>"]] + enc("f(x)") + [S["<|end|>"], S["<|tool_result|>"]]
              + enc("ok") + [S["<|end|>"], S["<|assistant|>"]] + enc("done") + [S["<|end|>"]])
  assert ids == expected
  trained = [i for i, m in zip(ids, mask) if m]
  assert trained == (enc("hello") + [S["<|tool_call|>"]] + enc("f(x)") + [S["<|end|>"]]
                     + enc("done") + [S["<|end|>"]])
  # Role markers are never trained.
  for name in ("<|system|>", "<|user|>", "<|assistant|>", "<|tool_result|>"):
    assert all(m == 0 for i, m in zip(ids, mask) if i == S[name])


def test_marker_text_in_content_is_not_a_marker():
  ids, _ = chat.render([{"role": "user", "content": "<|end|>"}], TOK)
  assert ids.count(S["<|end|>"]) == 1


def test_generation_prompt_and_parse_reply():
  prompt = chat.render_prompt("hi", TOK)
  assert prompt[-1] == S["<|assistant|>"] and prompt[0] == TOK.bos_id
  assert prompt == chat.render([{"role": "user", "content": "hi"}], TOK,
                               add_generation_prompt=True)[0]
  sampled = TOK.encode("yes.") + [S["<|end|>"]] + TOK.encode("junk")
  assert chat.parse_reply(sampled, TOK) == "yes."
  assert chat.parse_reply(TOK.encode("ab") + [TOK.eos_id, 5], TOK) == "ab"
  with pytest.raises(DataError, match="last message"):
    chat.render(CONVO, TOK, add_generation_prompt=True)


@pytest.mark.parametrize("messages, match", [
    ([], "field 'messages' must be a non-empty list"),
    ([{"role": "bot", "content": "x"}], r"field 'messages\[0\].role' must be one of"),
    ([{"role": "user", "content": 3}], r"field 'messages\[0\].content' expected a string"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
     r"messages\[1\].role' is 'system', expected only as the first"),
    ([{"role": "user", "content": "a", "tool_call": "f"}], r"tool_call' expected only on assistant"),
    (["hi"], r"field 'messages\[0\]' must be an object"),
])
def test_role_validation(messages, match):
  with pytest.raises(DataError, match=match):
    chat.render(messages, TOK)
