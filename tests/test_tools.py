"""Tools in the decode loop: the calculator is safe, the engine continues a paused row from its own
KV cache (logits equal a plain forward over the whole text, tool tokens included), batched rows
that call at different steps get the tokens each gets alone, the no-tool path is unchanged, and
the arithmetic task's `tool` format round-trips through the template, the loop and the verifier."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import engine, sampling, tools
from gptjax.data import chat
from gptjax.data.tokenizers import CharTokenizer
from gptjax.losses.common import token_logprobs
from gptjax.model import GPT, ModelConfig
from gptjax.tasks import arithmetic as ar

# ------------------------------------------------------------------------------ calculator --


@pytest.mark.parametrize("expression, value", [
    ("52*6", 312), (" 2 + 3 * 4 ", 14), ("(2+3)*4", 20), ("-7+2", -5), ("--3", 3), ("+4", 4),
    ("17//5", 3), ("-17//5", -4), ("17%5", 2), ("84/4", 21), ("0*99999", 0), ("1000-999", 1),
    ("9" * 40, int("9" * 40)), ("(" * 40 + "1" + ")" * 40, 1)])
def test_calculator_evaluates_integer_arithmetic(expression, value):
  assert tools.calculate(expression) == value
  assert tools.calculator(expression) == str(value)


@pytest.mark.parametrize("expression, why", [
    ("__import__('os').system('true')", "unexpected character '_'"),
    ("open('x')", "unexpected character 'o'"),
    ("(1).__class__", "unexpected character '.'"),
    ("1.5+1", "unexpected character '.'"),
    ("1e9", "unexpected character 'e'"),
    ("True+1", "unexpected character 'T'"),
    ("'7'*3", "unexpected character"),
    ("2**10", "powers are not supported"),
    ("9**9**9", "powers are not supported"),
    ("7/2", "7/2 is not a whole number"),
    ("1/0", "division by zero"), ("5//0", "division by zero"), ("5%(3-3)", "division by zero"),
    ("", "empty expression"), ("  ", "empty expression"),
    ("1+", "not an arithmetic expression"), ("(1", "not an arithmetic expression"),
    ("1 2", "not an arithmetic expression"),
    ("1+" * 150 + "1", "longer than 200 characters"),
    ("-(" * 33 + "1" + ")" * 33, "nested deeper than 32"),
    ("-" * 40 + "1", "nested deeper than 32"),
    ("9" * 41, "more than 40 digits"),
    ("9" * 21 + "*" + "9" * 21, "more than 40 digits"),
])
def test_calculator_refuses_everything_else(expression, why):
  with pytest.raises(tools.CalculatorError, match=why.replace("(", r"\(").replace("*", r"\*")):
    tools.calculate(expression)
  assert tools.calculator(expression).startswith("error: ")


def test_calculator_refuses_non_strings():
  with pytest.raises(tools.CalculatorError, match="expected a string, got int"):
    tools.calculate(7)


# ------------------------------------------------------------- the task's tool format --

BANDS = ["add-1d", "add-3d", "sub-3d", "mul-1d", "mul-2d", "word-1s", "word-3s"]


def _task_tokenizer(problems):
  # As the reasoning pipeline builds it: the characters of the questions and the text targets.
  chars = {ch for p in problems for fmt in ar.FORMATS for ch in p.target(fmt) + p.question}
  return CharTokenizer.from_text("".join(chars))


def test_tool_format_needs_no_new_character():
  for band in BANDS:
    for p in ar.generate([band], 20, split="train", seed=3):
      calls = "".join(m.get("tool_call", "") + m["content"] for m in ar.tool_messages(p))
      assert set(calls) <= set(p.cot + p.question), (band, p.question)


def test_tool_format_round_trips_through_the_loop_and_the_verifier():
  problems = [p for band in BANDS for p in ar.generate([band], 4, split="train", seed=1)]
  tok = _task_tokenizer(problems)
  loop = tools.calculator_loop(tok)
  sp = tok.special_ids
  for p in problems:
    msgs = ar.messages(p, "tool")
    ids, mask = chat.render(msgs, tok)
    prompt = chat.render_prompt(msgs[:1], tok)
    completion = ids[len(prompt):]
    # Replay the loop: the model's tokens are the rendered ones; at each trigger the loop must
    # append exactly the tool turn the template rendered, and end the reply at the last one.
    i = 0
    while i < len(completion):
      t = completion[i]
      i += 1
      if t in loop.trigger_ids:
        reply = loop.respond(completion[:i])
        if i == len(completion):
          assert reply is None
        else:
          assert reply == completion[i:i + len(reply)], p.question
          # The template trains none of what the tool writes.
          assert not any(mask[len(prompt) + i:len(prompt) + i + len(reply)])
          i += len(reply)
    steps = ar.tool_steps(p)
    assert completion.count(sp[tools.CALL]) == len(steps) >= 1
    got = tools.read_transcript(completion, tok)
    assert got.messages == msgs[1:]
    assert got.calls == [(e, str(v)) for e, v in steps]
    assert ar.is_correct(got.text, p.answer) and got.answer_text == ar.final_line(p.answer)
    assert ar.extract_final(got.text) == p.answer


def test_a_problem_without_known_steps_answers_with_its_chain():
  p = ar.Problem("Tom has 3 apples and eats one. How many are left?", 2, "gsm8k",
                 "3-1=2\n#### 2")
  assert ar.tool_steps(p) == []
  assert ar.messages(p, "tool")[1:] == [{"role": "assistant", "content": p.cot}]


def test_transcript_of_a_cut_reply_and_of_a_failed_call():
  tok = CharTokenizer.from_text("0123456789+-*/# ")
  sp = tok.special_ids
  ids = ([sp[tools.CALL]] + tok.encode("7/0") + [sp[tools.END]]
         + tools.result_ids(tools.calculator("7/0"), tok, max_tokens=48) + tok.encode("#### 1"))
  got = tools.read_transcript(ids, tok)
  # Letters of the error are not in this vocabulary: they come back as <unk>, the length kept.
  assert got.calls == [("7/0", tok.decode(tok.encode("error: division by zero")))]
  assert "<unk>" in got.calls[0][1]
  # The reply was cut before its last turn ended: that turn is still read.
  assert got.messages[-1] == {"role": "assistant", "content": "#### 1"}
  assert got.answer_text == "#### 1" and ar.extract_final(got.text) == 1
  assert tools.pending_call(ids[:5], tok) == "7/0" and tools.pending_call(ids[:6], tok) is None
  assert tools.pending_call(tok.encode("#### 1") + [sp[tools.END]], tok) is None
  assert len(tools.result_ids("1" * 100, tok, max_tokens=10)) == 10


def test_the_protocol_needs_the_chat_templates_tokens():
  class Imported:
    special_ids = {"<|end|>": 1}
  with pytest.raises(ValueError, match="no <|tool_call|>"):
    tools.calculator_loop(Imported())
  with pytest.raises(ValueError, match="unknown tool 'python'"):
    tools.loop_for("python", CharTokenizer.from_text("0123"))


# ------------------------------------------------------------------ the engine's loop --

CFG = ModelConfig(vocab_size=40, num_layers=2, num_heads=4, num_kv_heads=2, d_model=32,
                  max_len=96, variant="llama")
EOS = 3
RESULT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def setup():
  model = GPT(CFG)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  # EOS likely enough that rows reach it (the trigger) at different steps.
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, EOS].add(0.45)
  rng = np.random.default_rng(0)
  n, p = 8, 7
  lengths = rng.integers(2, p + 1, size=n).astype(np.int32)
  prompts = np.zeros((n, p), np.int32)
  for i, l in enumerate(lengths):
    prompts[i, :l] = rng.integers(9, CFG.vocab_size, size=l)
  return model, params, prompts, lengths


def _respond(ids):
  """A stand-in tool whose trigger is also the stop id, as `<|end|>` is for the calculator: the
  first two times it appends RESULT, the third time the row ends."""
  return list(RESULT) if ids.count(EOS) <= 2 else None


LOOP = engine.ToolLoop(trigger_ids=(EOS,), respond=_respond, max_tokens=6)


def _gen(setup, prompts=None, lengths=None, **kw):
  model, params, all_prompts, all_lengths = setup
  args = dict(rng=11, max_new_tokens=40, temperature=0.0, eos_ids=(EOS,), pad_id=0, slots=4,
              chunk=4, tools=LOOP)
  args.update(kw)
  stats = engine.EngineStats()
  out = engine.generate(model, params, all_prompts if prompts is None else prompts,
                        all_lengths if lengths is None else lengths, stats=stats, **args)
  return out, stats


def test_cache_continuation_equals_a_plain_forward(setup):
  model, params, *_ = setup
  out, stats = _gen(setup)
  comp, lengths = np.asarray(out.completion), np.asarray(out.lengths)
  # Calls happened, at different steps in different rows, and rows kept going after them.
  starts = {s for spans in stats.tool_spans.values() for s, _ in spans}
  assert stats.tool_calls >= 6 and len(starts) >= 3
  for q, spans in stats.tool_spans.items():
    for s, e in spans:
      assert comp[q, s - 1] == EOS and comp[q, s:e].tolist() == RESULT[:e - s]
  # A plain forward over prompt + completion (tool tokens included): every recorded log-prob,
  # and every token the model chose greedily, is the one the full text gives.
  real = jnp.arange(out.tokens.shape[1])[None, :] < out.total_lengths[:, None]
  logits = model.apply({"params": params}, out.tokens, segment_ids=real.astype(jnp.int32)).logits
  plain = np.asarray(sampling.completion_logprobs(model, params, out, temperature=1.0))
  np.testing.assert_allclose(np.asarray(out.logprobs), plain, atol=2e-5)
  logits = np.asarray(logits)
  pl = np.asarray(out.prompt_lengths)
  for q in range(len(comp)):
    forced = {i for s, e in stats.tool_spans.get(q, []) for i in range(s, e)}
    for i in range(lengths[q]):
      if i not in forced:
        assert comp[q, i] == logits[q, pl[q] - 1 + i].argmax(), (q, i)
  # The logits right after each injected result, in full, against the plain forward's.
  for q, spans in stats.tool_spans.items():
    s, e = spans[0]
    if e < lengths[q]:
      want = token_logprobs(jnp.asarray(logits[q:q + 1, pl[q] - 1 + e])[:, None],
                            jnp.asarray(comp[q:q + 1, e])[:, None])
      np.testing.assert_allclose(np.asarray(out.logprobs)[q, e], np.asarray(want)[0, 0],
                                 atol=2e-5)


def test_batched_rows_with_tools_equal_each_row_alone(setup):
  _, _, prompts, lengths = setup
  batched, stats = _gen(setup, slots=4, chunk=4)
  assert len({s for spans in stats.tool_spans.values() for s, _ in spans}) >= 3
  for q in range(len(prompts)):
    alone, _ = _gen(setup, prompts=prompts[q:q + 1], lengths=lengths[q:q + 1], slots=1, chunk=5)
    n = int(alone.lengths[0])
    assert int(batched.lengths[q]) == n
    np.testing.assert_array_equal(np.asarray(batched.completion)[q], np.asarray(alone.completion)[0])
    np.testing.assert_allclose(np.asarray(batched.logprobs)[q], np.asarray(alone.logprobs)[0],
                               atol=2e-5)
  # Sampled: a row's draws depend on its request and step only, not on what else decodes.
  a, _ = _gen(setup, temperature=1.0, slots=4, chunk=4)
  b, _ = _gen(setup, temperature=1.0, slots=1, chunk=3)
  np.testing.assert_array_equal(np.asarray(a.completion), np.asarray(b.completion))


def test_without_calls_the_loop_changes_no_token(setup):
  plain, _ = _gen(setup, temperature=1.0, tools=None)
  # Every row pauses at its stop id, and the answer is "no call": the tokens are the same.
  # (max_tokens as LOOP's, so the compiled programs of the test above serve this one too)
  never = engine.ToolLoop(trigger_ids=(EOS,), respond=lambda ids: None, max_tokens=6)
  paused, stats = _gen(setup, temperature=1.0, tools=never)
  assert stats.tool_pauses >= len(plain.lengths) - 1 and stats.tool_calls == 0
  for f in ("tokens", "completion", "completion_mask", "lengths"):
    np.testing.assert_array_equal(np.asarray(getattr(paused, f)), np.asarray(getattr(plain, f)))
  np.testing.assert_allclose(np.asarray(paused.logprobs), np.asarray(plain.logprobs), atol=2e-5)


def test_calls_per_row_are_capped_and_answers_are_sized(setup):
  capped = engine.ToolLoop(trigger_ids=(EOS,), respond=_respond, max_tokens=6, max_calls=1)
  out, stats = _gen(setup, tools=capped)
  assert all(len(spans) == 1 for spans in stats.tool_spans.values())
  # After its one call a row stops at its next stop id, as without tools.
  comp, lengths = np.asarray(out.completion), np.asarray(out.lengths)
  for q in stats.tool_spans:
    assert comp[q, lengths[q] - 1] == EOS or lengths[q] == 40
  big = engine.ToolLoop(trigger_ids=(EOS,), respond=lambda ids: [5] * 9, max_tokens=6)
  with pytest.raises(ValueError, match="respond gave 9 tokens; the ToolLoop allows max_tokens=6"):
    _gen(setup, tools=big)


# ------------------------------------------------- a model that calls, for the command line --

def _scripted_policy(question, answer_digits_written="00000"):
  """A GPT whose greedy next token depends on the position alone (blocks zeroed, token
  embeddings zeroed, one-hot positions, a head that maps position i to the token scripted after
  it), scripted to write the tool format's reply to `question`. Where the calculator's result
  goes it would write `answer_digits_written`: the loop must put the tool's digits there."""
  tok = CharTokenizer.from_text("0123456789+-*# ?Whatis")
  cfg = ModelConfig(vocab_size=tok.vocab_size, num_layers=1, num_heads=2, d_model=64,
                    max_len=64, tie_embeddings=False)
  model = GPT(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  params = jax.tree_util.tree_map(np.array, params)
  for name in ("out", ):
    params["blocks"]["attn"][name]["kernel"][:] = 0
    params["blocks"]["attn"][name]["bias"][:] = 0
  params["blocks"]["mlp"]["proj"]["kernel"][:] = 0
  params["blocks"]["mlp"]["proj"]["bias"][:] = 0
  params["embed"]["embedding"][:] = 0
  params["pos_embed"]["embedding"][:] = 10 * np.eye(64)
  sp = tok.special_ids
  prompt = chat.render_prompt(question, tok)
  written = ([sp[tools.CALL]] + tok.encode("347*86") + [sp[tools.END]] + [sp[tools.RESULT]]
             + tok.encode(answer_digits_written) + [sp[tools.END], sp[tools.ASSISTANT]]
             + tok.encode("#### 29842") + [sp[tools.END]])
  head = np.zeros((64, tok.vocab_size), np.float32)
  for j, t in enumerate(written):
    head[len(prompt) - 1 + j, t] = 1.0
  params["lm_head"]["kernel"] = head
  return model, jax.tree_util.tree_map(jnp.asarray, params), tok


def test_chat_with_the_calculator_streams_the_tools_result(monkeypatch):
  from gptjax import checkpoint, generate_cli
  model, params, tok = _scripted_policy("What is 347 * 86?")
  monkeypatch.setattr(checkpoint, "load_for_inference",
                      lambda workdir, step=None: (model, params, tok, None))
  inputs = iter(["What is 347 * 86?", "/quit"])
  out = []
  assert generate_cli.chat_main(["--workdir", "unused", "--tools", "calculator",
                                 "--temperature", "0"],
                                read_line=lambda _: next(inputs), write=out.append) == 0
  text = "".join(out)
  assert "model> [calculator: 347*86 = 29842]\n#### 29842\n" in text
  # The scripted model writes 00000 where the result goes: the digits above are the tool's.
  # Streamed piece by piece, and the plain chat (no tool) stops at the call's end of turn.
  assert len(out) > 5
  inputs = iter(["What is 347 * 86?", "/quit"])
  out = []
  assert generate_cli.chat_main(["--workdir", "unused", "--temperature", "0"],
                                read_line=lambda _: next(inputs), write=out.append) == 0
  assert "model> <|tool_call|>347*86\n" in "".join(out)


def test_chat_tools_flag_errors_are_one_line(monkeypatch, capsys):
  from gptjax import checkpoint, generate_cli
  model, params, tok = _scripted_policy("What is 347 * 86?")
  monkeypatch.setattr(checkpoint, "load_for_inference",
                      lambda workdir, step=None: (model, params, tok, None))
  assert generate_cli.chat_main(["--workdir", "unused", "--tools", "python"],
                                read_line=lambda _: "/quit", write=lambda s: None) == 2
  assert capsys.readouterr().err == "gptjax chat: --tools: expected calculator, got 'python'\n"
  assert generate_cli.chat_main(["--workdir", "unused", "--tools", "calculator",
                                 "--repetition_penalty", "1.2"],
                                read_line=lambda _: "/quit", write=lambda s: None) == 2
  assert capsys.readouterr().err.startswith("gptjax chat: --repetition_penalty: not available "
                                            "with --tools")


def test_sample_with_the_calculator_prints_each_rows_exchange(monkeypatch):
  from gptjax import checkpoint, generate_cli
  model, params, tok = _scripted_policy("What is 347 * 86?")
  monkeypatch.setattr(checkpoint, "load_for_inference",
                      lambda workdir, step=None: (model, params, tok, None))
  out = []
  assert generate_cli.sample_main(["--workdir", "unused", "--chat", "--prompt", "What is 347 * 86?",
                                   "--tools", "calculator", "--temperature", "0",
                                   "--num_samples", "2"], write=out.append) == 0
  # Both rows call at the same step and each gets the tool's digits (the model writes 00000).
  reply = "user> What is 347 * 86?\nmodel> [calculator: 347*86 = 29842]\n#### 29842\n"
  assert "".join(out) == f"--- sample 1/2\n{reply}--- sample 2/2\n{reply}"
  # A raw prompt (the same text, template markers written out) goes through the same loop.
  raw = tok.decode(chat.render_prompt("What is 347 * 86?", tok)[1:])
  out = []
  assert generate_cli.sample_main(["--workdir", "unused", "--prompt", raw, "--tools", "calculator",
                                   "--temperature", "0"], write=out.append) == 0
  assert "".join(out) == f"--- sample 1/1\n{raw}[calculator: 347*86 = 29842]\n#### 29842\n"
  # Without --tools the sample ends at the call's end of turn, as before.
  out = []
  assert generate_cli.sample_main(["--workdir", "unused", "--chat", "--prompt", "What is 347 * 86?",
                                   "--temperature", "0"], write=out.append) == 0
  assert "".join(out).endswith("model> <|tool_call|>347*86\n")


@pytest.mark.parametrize("flags, err", [
    (["--tools", "python"], "--tools: expected calculator, got 'python'"),
    (["--tools", "calculator", "--stop", "#"],
     "--stop: not available with --tools (the engine's tool loop ends a reply at its stop token "
     "only)"),
    (["--tools", "calculator", "--regex", "[0-9]+"],
     "--regex: not available with --tools (the tool's result, written by the host, is outside "
     "any pattern)"),
    (["--tools", "calculator", "--repetition_penalty", "1.3"],
     "--repetition_penalty: not available with --tools (the tool loop runs in the "
     "continuous-batching engine, which has no repetition penalty)")])
def test_sample_tools_flag_errors_are_one_line(monkeypatch, capsys, flags, err):
  from gptjax import checkpoint, generate_cli
  # Refused before anything loads.
  monkeypatch.setattr(checkpoint, "load_for_inference", lambda *a, **k: pytest.fail("loaded"))
  assert generate_cli.sample_main(["--workdir", "unused", "--prompt", "x", *flags],
                                  write=lambda s: None) == 2
  assert capsys.readouterr().err == f"gptjax sample: {err}\n"


def test_the_reasoning_evaluation_samples_through_the_same_loop():
  from gptjax import reasoning
  policy = _scripted_policy("What is 347 * 86?")
  s = reasoning.sample_with_tools(policy, ["What is 347 * 86?"], max_new_tokens=32, seed=0)
  assert s["texts"] == ["[calculator: 347*86 = 29842]\n#### 29842"]
  assert s["calls"] == [[("347*86", "29842")]] and s["tool_tokens"] == [8] and s["ended"] == [True]
  assert ar.is_correct(s["texts"][0], 347 * 86)
