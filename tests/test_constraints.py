"""Constrained decoding: the token automaton against Python's `re` by brute force, what each
tokenizer's tokens spell, every constrained sample (static sampler, engine, stream) inside its
pattern for many seeds and temperatures, the unconstrained path unchanged, JSON schemas, and the
CLI's one-line errors."""

import functools
import itertools
import json
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import constraints, engine, sampling
from gptjax.data.tokenizers import CharTokenizer
from gptjax.model import GPT, ModelConfig

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 #-{}[]\":,.\n"


@functools.cache
def _setup(variant="gpt2"):
  tok = CharTokenizer(CHARS)
  model = GPT(ModelConfig(vocab_size=tok.vocab_size, num_layers=2, num_heads=2, d_model=32,
                          max_len=96, variant=variant))
  # Larger weights than at init, so the distributions are peaked enough to prefer some tokens.
  params = jax.tree.map(lambda x: x * 3.0, nn.meta.unbox(
      model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))
  return tok, model, params


def _prompts(tok, texts):
  return sampling.pad_prompts([[tok.bos_id] + tok.encode(t) for t in texts], pad_id=tok.pad_id)


def _samples(out, c, stops):
  comp, lengths = np.asarray(out.completion), np.asarray(out.lengths)
  return [c.text([t for t in row[:n] if t not in stops]) for row, n in zip(comp, lengths)]


# ----- the automaton ------------------------------------------------------------------------

# Multi-character tokens, tokens that overlap, and the two UTF-8 bytes of "é" as separate
# tokens beside the whole character; ids 0-2 are specials (2 is the stop token).
VOCAB = [None, None, None, b"a", b"b", b"ab", b"ba", b"abab", b"1", b"12", b"2", b"\xc3",
         b"\xa9", "é".encode(), b"-"]


def _walk(c, ids):
  s = 0
  for t in ids:
    s = int(c.automaton.next_state[s, t])
    if s < 0:
      return None
  return s


@pytest.mark.parametrize("pattern", [r"(ab)+1?", r"a(ba)*2?", r"é+-[12]", r"(a|b)+12",
                                     r"-?(0|[1-9][0-9]*)|ab"])
def test_table_agrees_with_python_re_on_every_short_token_sequence(pattern):
  c = constraints.compile(VOCAB, regex=pattern, vocab_size=len(VOCAB), stop_ids=(2,))
  ordinary = [i for i, b in enumerate(VOCAB) if b]
  for n in range(1, 5):
    for ids in itertools.product(ordinary, repeat=n):
      text = b"".join(VOCAB[i] for i in ids)
      s = _walk(c, ids)
      try:
        matches = re.fullmatch(pattern, text.decode()) is not None
      except UnicodeDecodeError:
        matches = False
      accepted = s is not None and int(c.automaton.distance[s]) == 0
      assert accepted == matches, (pattern, ids, text)
      if s is not None:
        # A state the table reaches can always be completed, and the stop token is allowed
        # exactly where the text so far is a whole match.
        assert int(c.automaton.distance[s]) < constraints.UNREACHABLE
        assert (int(c.automaton.next_state[s, 2]) >= 0) == accepted


def test_distances_are_the_fewest_tokens_to_a_match_and_specials_are_never_allowed():
  c = constraints.compile(VOCAB, regex=r"ab(ab)*1", vocab_size=len(VOCAB) + 3, stop_ids=(2,))
  nxt, dist = c.automaton.next_state, c.automaton.distance
  assert c.min_tokens == 2                                      # "ab" then "1"
  assert nxt.shape == (c.num_states, len(VOCAB) + 3)
  assert (nxt[:, [0, 1]] == -1).all() and (nxt[:, len(VOCAB):] == -1).all()
  allowed = {VOCAB[t] for t in np.nonzero(nxt[0] >= 0)[0]}
  assert allowed == {b"a", b"ab", b"abab"}
  # With one token left, only a token that completes the match may be drawn.
  after_ab = int(nxt[0, VOCAB.index(b"ab")])
  one_left = np.asarray(c.automaton.allowed(jnp.asarray([after_ab]), 1))[0]
  assert {VOCAB[t] for t in np.nonzero(one_left)[0]} == {b"1"}
  assert dist[after_ab] == 1 and dist[int(nxt[0, VOCAB.index(b"a")])] == 2


def test_every_tokenizer_kind_spells_its_own_encoding(tmp_path):
  sys.path.insert(0, "tests/helpers")
  import hf_tiny
  from gptjax.data.sentencepiece_tokenizer import train_sentencepiece
  from gptjax.data.shakespeare import corpus_text
  from gptjax.hf.tokenizer import HFTokenizer
  hf_tiny.write_tokenizer(str(tmp_path))
  toks = {"char": CharTokenizer.from_text(corpus_text("train")[:20_000] + "é😀"),
          "sentencepiece": train_sentencepiece([corpus_text("train")[:20_000]], vocab_size=340,
                                               out_dir=str(tmp_path / "sp")),
          "hf": HFTokenizer(str(tmp_path), quiet=True)}
  texts = ["To be, or not to be: that is the question.", "  two  spaces\nand é😀 bytes"]
  for kind, tok in toks.items():
    spelled = tok.token_bytes()
    assert len(spelled) == tok.vocab_size
    assert all(spelled[i] is None for i in (tok.pad_id, tok.bos_id, tok.eos_id))
    for text in texts:
      got = b"".join(spelled[i] for i in tok.encode(text)).decode()
      # SentencePiece's dummy prefix is a real "▁" token: it spells the leading space that
      # decode drops.
      assert got == (" " + text if kind == "sentencepiece" else text), kind
  # Byte pieces make a pattern over any character reachable, whole or in UTF-8 pieces.
  sp = toks["sentencepiece"]
  c = constraints.compile(sp, regex="😀+", vocab_size=sp.vocab_size, stop_ids=(sp.eos_id,))
  assert c.min_tokens == 4


# ----- sampling inside the pattern ----------------------------------------------------------

PATTERNS = [r"#### -?[0-9]{1,4}", r"[a-c]+x?", r"(yes|no)", r"([a-z]+ ){2,3}[0-9]+\.",
            r"(ab|cd)*#"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_sample_matches_its_pattern_over_seeds_and_temperatures(pattern):
  tok, model, params = _setup()
  stops = (tok.eos_id,)
  c = constraints.compile(tok, regex=pattern, vocab_size=tok.vocab_size, stop_ids=stops)
  prompts, lengths = _prompts(tok, ["the answer", "x", "question 12 is"] * 2)
  for seed, controls in itertools.product(range(3), [
      dict(temperature=0.0), dict(temperature=1.0),
      dict(temperature=2.0, top_k=20, top_p=0.95, repetition_penalty=1.3)]):
    out = sampling.generate(model, params, prompts, lengths, rng=seed, max_new_tokens=12,
                            eos_ids=stops, pad_id=tok.pad_id, constraint=c, **controls)
    for text in _samples(out, c, stops):
      assert re.fullmatch(pattern, text), (pattern, seed, controls, text)


def test_the_budget_forces_a_match_before_the_tokens_run_out():
  tok, model, params = _setup()
  # Free text that must end with "#### N": with 6 tokens the model has to close early.
  pattern = r"[a-z ]*#### [0-9]+"
  c = constraints.compile(tok, regex=pattern, vocab_size=tok.vocab_size, stop_ids=(tok.eos_id,))
  assert c.min_tokens == 6
  prompts, lengths = _prompts(tok, ["abc"] * 8)
  for m in (6, 9):
    out = sampling.generate(model, params, prompts, lengths, rng=3, max_new_tokens=m,
                            temperature=1.5, eos_ids=(tok.eos_id,), pad_id=tok.pad_id,
                            constraint=c)
    assert all(re.fullmatch(pattern, t) for t in _samples(out, c, (tok.eos_id,)))
  with pytest.raises(constraints.ConstraintError, match="at least 6 tokens"):
    sampling.generate(model, params, prompts, lengths, rng=3, max_new_tokens=5,
                      eos_ids=(tok.eos_id,), pad_id=tok.pad_id, constraint=c)


@pytest.mark.parametrize("controls", [dict(temperature=0.0),
                                      dict(temperature=1.3, top_k=12, top_p=0.9, min_p=0.05,
                                           repetition_penalty=1.3)])
def test_an_automaton_that_allows_everything_draws_exactly_the_unconstrained_tokens(controls):
  tok, model, params = _setup()
  prompts, lengths = _prompts(tok, ["abc", "the quick brown", "x"])
  kw = dict(max_new_tokens=20, eos_ids=(tok.eos_id,), pad_id=tok.pad_id, **controls)
  for seed in range(3):
    plain = sampling.generate(model, params, prompts, lengths, rng=seed, **kw)
    masked = sampling.generate(model, params, prompts, lengths, rng=seed,
                               constraint=constraints.unconstrained(tok.vocab_size), **kw)
    for field in ("tokens", "completion", "logprobs", "completion_mask", "lengths"):
      np.testing.assert_array_equal(np.asarray(getattr(plain, field)),
                                    np.asarray(getattr(masked, field)), err_msg=field)


def test_constrained_logprobs_are_the_raw_logits_and_stream_equals_generate():
  tok, model, params = _setup()
  c = constraints.compile(tok, regex=r"[a-e]{3,8}( [0-9]+)?", vocab_size=tok.vocab_size,
                          stop_ids=(tok.eos_id,))
  prompts, lengths = _prompts(tok, ["abc"])
  kw = dict(max_new_tokens=12, temperature=0.9, eos_ids=(tok.eos_id,), pad_id=tok.pad_id,
            constraint=c)
  out = sampling.generate(model, params, prompts, lengths, rng=5, **kw)
  plain = sampling.completion_logprobs(model, params, out, temperature=0.9)
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(plain), atol=2e-5)
  streamed = list(sampling.stream(model, params, prompts[0, :lengths[0]].tolist(), rng=5, **kw))
  n = int(out.lengths[0])
  assert streamed == np.asarray(out.completion)[0, :n].tolist()


def test_the_engine_keeps_every_row_in_the_pattern_and_greedy_equals_the_static_sampler():
  tok, model, params = _setup("llama")
  pattern = r"(yes|no), [a-z]{2,6}|[0-9]{3}"
  stops = (tok.eos_id,)
  c = constraints.compile(tok, regex=pattern, vocab_size=tok.vocab_size, stop_ids=stops)
  prompts, lengths = _prompts(tok, ["is it", "how many", "a", "the quick brown fox", "b"] * 2)
  for seed in range(3):
    out = engine.generate(model, params, prompts, lengths, rng=seed, max_new_tokens=14,
                          temperature=1.5, eos_ids=stops, pad_id=tok.pad_id, slots=4, chunk=3,
                          constraint=c)
    assert all(re.fullmatch(pattern, t) for t in _samples(out, c, stops))
  kw = dict(rng=0, max_new_tokens=14, temperature=0.0, eos_ids=stops, pad_id=tok.pad_id,
            constraint=c)
  eng = engine.generate(model, params, prompts, lengths, slots=4, chunk=3, **kw)
  static = sampling.generate(model, params, prompts, lengths, **kw)
  np.testing.assert_array_equal(np.asarray(eng.tokens), np.asarray(static.tokens))


def test_a_json_schema_sample_parses_and_validates():
  jsonschema = pytest.importorskip("jsonschema")
  tok, model, params = _setup()
  schema = {"type": "object", "properties": {
      "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
      "age": {"type": "integer"},
      "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2},
      "ok": {"type": "boolean"}},
      "required": ["name", "age", "ok"], "additionalProperties": False}
  stops = (tok.eos_id,)
  c = constraints.compile(tok, json_schema=schema, vocab_size=tok.vocab_size, stop_ids=stops)
  prompts, lengths = _prompts(tok, ["{", "person:"] * 3)
  for seed in range(3):
    out = sampling.generate(model, params, prompts, lengths, rng=seed, max_new_tokens=80,
                            temperature=1.0, eos_ids=stops, pad_id=tok.pad_id, constraint=c)
    for text in _samples(out, c, stops):
      jsonschema.validate(json.loads(text), schema)


def test_bad_patterns_and_schemas_say_what_is_wrong():
  tok, *_ = _setup()
  kw = dict(vocab_size=tok.vocab_size, stop_ids=(tok.eos_id,))
  for kwargs, message in [
      (dict(regex="(ab"), r"regex '\(ab': missing \), unterminated subpattern"),
      (dict(regex="(?=a)b"), "lookaround"),
      (dict(regex="Z+"), "incompatible with the regex"),              # no token spells "Z"
      (dict(json_schema="{not json"), "JSON schema: not valid JSON"),
      (dict(json_schema={"type": "nonsense"}), "JSON schema: Unsupported type: nonsense"),
      (dict(regex="a", json_schema={}), "exactly one of")]:
    with pytest.raises(constraints.ConstraintError, match=message):
      constraints.compile(tok, **kwargs, **kw)


# ----- the CLI ------------------------------------------------------------------------------

@pytest.fixture
def fake_workdir(monkeypatch):
  from gptjax import checkpoint
  tok, model, params = _setup()
  monkeypatch.setattr(checkpoint, "load_for_inference",
                      lambda workdir, step=None: (model, params, tok, None))
  return tok


def test_sample_cli_with_a_regex_or_a_schema(fake_workdir, tmp_path):
  from gptjax import generate_cli
  lines = []
  argv = ["--workdir", "w", "--prompt", "the answer", "--num_samples", "4", "--seed", "2",
          "--max_new_tokens", "16", "--temperature", "1.2"]
  assert generate_cli.sample_main(argv + ["--regex", "#### [0-9]{1,3}"], write=lines.append) == 0
  assert len(lines) == 4
  for line in lines:
    assert re.fullmatch(r"--- sample \d/4\nthe answer#### [0-9]{1,3}\n", line), line
  schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
  path = tmp_path / "schema.json"
  path.write_text(json.dumps(schema))
  for given in (str(path), json.dumps(schema)):
    lines = []
    assert generate_cli.sample_main(["--workdir", "w", "--prompt", "x", "--json_schema", given,
                                     "--max_new_tokens", "30"], write=lines.append) == 0
    assert isinstance(json.loads(lines[0].split("\n", 1)[1][1:])["n"], int)


@pytest.mark.parametrize("flags,message", [
    (["--regex", "(ab"], "--regex: regex '(ab': missing ), unterminated subpattern at position 0"),
    (["--regex", "Q+"], "--regex: regex 'Q+': The vocabulary provided is incompatible"),
    (["--regex", "[0-9]{20}"], "--regex: the pattern needs at least 20 tokens, more than "
                               "max_new_tokens=8"),
    (["--json_schema", "missing.json"], "--json_schema: cannot read 'missing.json'"),
    (["--json_schema", '{"type": 3}'], "--json_schema: JSON schema:"),
    (["--regex", "a", "--json_schema", "{}"], "--regex and --json_schema: give one of them"),
])
def test_sample_cli_bad_constraints_end_in_one_line_and_status_2(fake_workdir, capsys, flags,
                                                                 message):
  from gptjax import generate_cli
  code = generate_cli.sample_main(["--workdir", "w", "--max_new_tokens", "8", *flags],
                                  write=lambda s: None)
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("gptjax sample: ") and message in err, err
  assert err.count("\n") == 1
