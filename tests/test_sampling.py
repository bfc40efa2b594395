"""Sampler tests on tiny random-weight models in float32: cache parity, log-prob parity, filter
masks against NumPy references, per-row stopping, seeds, streaming, and an 8-device sharded run.

Most of the time here is XLA compilation, so tests share a few control sets (and shapes) and
therefore compiled programs; a new control set costs a compile.
"""

import functools
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import sampling
from gptjax.losses.common import token_logprobs
from gptjax.model import GPT, ModelConfig

PAD, EOS = 0, 2
M = 10   # new tokens in every test
GREEDY = dict(max_new_tokens=M, temperature=0.0, pad_id=PAD)
FILTERED = dict(max_new_tokens=M, temperature=0.7, top_k=5, top_p=0.8, pad_id=PAD)
PENALISED = dict(max_new_tokens=M, temperature=1.3, top_p=0.9, min_p=0.05,
                 repetition_penalty=1.3, pad_id=PAD)

PROMPTS = np.array([[5, 6, 7, PAD, PAD, PAD],
                    [8, 9, 10, 11, 12, 13],
                    [14, PAD, PAD, PAD, PAD, PAD]], np.int32)
LENGTHS = np.array([3, 6, 1], np.int32)


@functools.cache
def _model(variant="gpt2", attention_impl=None):
  cfg = ModelConfig(vocab_size=48, num_layers=2, num_heads=2, d_model=32, max_len=64,
                    variant=variant, attention_impl=attention_impl)
  model = GPT(cfg)

  @jax.jit
  def init(key):
    params = nn.meta.unbox(model.init(key, jnp.zeros((1, 4), jnp.int32))["params"])
    # Larger weights than at init, so the distributions are peaked enough for filters and stops
    # to matter.
    return jax.tree.map(lambda x: x * 3.0, params)

  return model, init(jax.random.key(0))


@functools.partial(jax.jit, static_argnames="model")
def _plain_logits(model, params, tokens):
  return model.apply({"params": params}, tokens).logits


# ----- cache and log-prob parity ------------------------------------------------------------

@pytest.mark.parametrize("variant,attention_impl",
                         [("gpt2", None), ("llama", None), ("gpt2", "xla")])
def test_cached_decode_logits_match_full_forward(variant, attention_impl):
  """The logits the sampler sees at every step equal a plain forward over the contiguous
  sequence, for prompts of mixed lengths (learned positions and RoPE). With attention_impl='xla'
  the prefill goes through jax.nn.dot_product_attention on the cache, as on an accelerator."""
  model, params = _model(variant, attention_impl)
  c, eos, stops = sampling._controls(top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                                     eos_ids=(), stop_sequences=(), **GREEDY)
  rng = jax.random.key(0)
  state = sampling._prefill_jit(model, params, jnp.asarray(PROMPTS), jnp.asarray(LENGTHS), eos,
                                stops, rng, c)
  seen = [np.asarray(state.logits)]
  for _ in range(M - 1):
    state = sampling._advance_jit(model, params, state, rng, c, PROMPTS.shape[1])
    seen.append(np.asarray(state.logits))
  out = jax.jit(sampling._finish, static_argnames="c")(jnp.asarray(PROMPTS), state, c)
  full = np.asarray(_plain_logits(model, params, out.tokens))                     # [B,T,V]
  for b, n in enumerate(LENGTHS):
    for i, logits in enumerate(seen):
      np.testing.assert_allclose(logits[b], full[b, n - 1 + i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("controls", [FILTERED, PENALISED, GREEDY],
                         ids=["top_k+top_p", "penalty+top_p+min_p", "greedy"])
def test_logprobs_match_plain_forward(controls):
  model, params = _model()
  out = sampling.generate(model, params, PROMPTS, LENGTHS, rng=3, eos_ids=(EOS,), **controls)
  t = controls["temperature"] or 1.0
  ref = sampling.completion_logprobs(model, params, out, temperature=t)
  np.testing.assert_allclose(out.logprobs, ref, atol=1e-5, rtol=0)
  # The same check written out by hand, straight through token_logprobs.
  logits = _plain_logits(model, params, out.tokens)
  lp = np.asarray(token_logprobs(logits[:, :-1], out.tokens[:, 1:], temperature=t))
  for b in range(len(PROMPTS)):
    n, k = int(out.prompt_lengths[b]), int(out.lengths[b])
    assert k > 0
    here = slice(n - 1, n - 1 + k)
    np.testing.assert_allclose(out.logprobs[b, :k], lp[b, here], atol=1e-5, rtol=0)
    picked = np.asarray(out.completion[b, :k])
    if controls is FILTERED:
      # Every sampled token survived the filters applied to the plain forward's logits.
      kept = np.asarray(sampling.filter_logits(logits[b, here] / t, top_k=5, top_p=0.8))
      assert np.isfinite(kept[np.arange(k), picked]).all()
    if controls is GREEDY:
      np.testing.assert_array_equal(picked, np.argmax(logits[b, here], -1))


def test_phased_decode_matches_plain_forward_and_one_full_cache():
  """A long generation decodes in phases over a growing cache. Its log-probs still equal a plain
  forward's, and its tokens equal those of a step-by-step loop over one P + M cache (`stream`)."""
  m = 3 * sampling._MIN_PHASE + 5
  assert len(sampling.decode_phases(m)) == 3
  model, params = _model("llama")                    # RoPE: no max_len limit on P + M
  controls = dict(max_new_tokens=m, temperature=1.0, pad_id=PAD)
  out = sampling.generate(model, params, PROMPTS, LENGTHS, rng=5, **controls)
  assert (np.asarray(out.lengths) == m).all()        # no EOS: every row runs through all phases
  ref = sampling.completion_logprobs(model, params, out, temperature=1.0)
  np.testing.assert_allclose(out.logprobs, ref, atol=1e-5, rtol=0)
  got = list(sampling.stream(model, params, [5, 6, 7], rng=5, bucket=1, **controls))
  # Sampling is per row from the row's own logits and the step's key, so the first row's tokens
  # do not depend on the other rows.
  assert got == [int(t) for t in np.asarray(out.completion[0])]


# ----- filters against NumPy references ----------------------------------------------------

def _np_softmax(x):
  e = np.exp(x - np.max(x, -1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_top_k(logits, k):
  if k <= 0:
    return np.ones(logits.shape, bool)
  kth = -np.sort(-logits, -1)[:, min(k, logits.shape[-1]) - 1:][:, :1]
  return logits >= kth


def _np_top_p(logits, p):
  """Token by token: kept when the mass of strictly larger logits is still below p."""
  out = np.zeros(logits.shape, bool)
  for r, row in enumerate(logits):
    probs = _np_softmax(row.astype(np.float64))
    for j, value in enumerate(row):
      out[r, j] = p >= 1.0 or probs[row > value].sum() < p
  return out


def _np_min_p(logits, min_p):
  probs = _np_softmax(logits.astype(np.float64))
  return probs >= min_p * probs.max(-1, keepdims=True)


def _random_logits(seed, shape=(16, 40)):
  x = np.random.RandomState(seed).randn(*shape).astype(np.float32) * 2
  x[:, 5] = x[:, 6]                                  # ties in the middle
  x[:, 7:10] = np.max(x, -1, keepdims=True)          # ties at the top
  x[3] = 1.5                                         # a flat row
  return x


@pytest.mark.parametrize("k", [0, 1, 3, 8, 40, 100])
def test_top_k_mask(k):
  x = _random_logits(k)
  np.testing.assert_array_equal(sampling.top_k_mask(jnp.asarray(x), k), _np_top_k(x, k))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.9, 0.999, 1.0])
def test_top_p_mask(p):
  x = _random_logits(int(p * 100))
  got = np.asarray(sampling.top_p_mask(jnp.asarray(x), p))
  np.testing.assert_array_equal(got, _np_top_p(x, p))
  assert got[np.arange(16), np.argmax(x, -1)].all()


@pytest.mark.parametrize("m", [0.0, 0.05, 0.3, 1.0])
def test_min_p_mask(m):
  x = _random_logits(7)
  np.testing.assert_array_equal(sampling.min_p_mask(jnp.asarray(x), m), _np_min_p(x, m))


@pytest.mark.parametrize("k,p,m", [(5, 0.7, 0.0), (0, 0.7, 0.2), (10, 1.0, 0.1), (6, 0.5, 0.3),
                                   (0, 1.0, 0.0)])
def test_filter_logits_chains_in_hf_order(k, p, m):
  """top-k, then top-p over the renormalised survivors, then min-p, as HF's warpers chain."""
  x = _random_logits(11)
  keep = _np_top_k(x, k)
  keep &= _np_top_p(np.where(keep, x, -np.inf), p)
  keep &= _np_min_p(np.where(keep, x, -np.inf), m)
  got = np.asarray(sampling.filter_logits(jnp.asarray(x), top_k=k, top_p=p, min_p=m))
  np.testing.assert_array_equal(np.isfinite(got), keep)
  np.testing.assert_array_equal(got[keep], x[keep])


def test_sample_categorical_matches_softmax_and_never_draws_filtered_tokens():
  """Inverse-CDF draws follow softmax(logits) row by row: each token's frequency over 100k draws
  is within 5 standard errors of its probability, and -inf tokens are never drawn."""
  n = 100_000
  rows = np.array([[0.5, -np.inf, 2.0, -1.0, -np.inf, 1.0],       # masked tokens in between
                   [-np.inf, -np.inf, 3.0, 3.0, -np.inf, -np.inf],  # a tie, masked ends
                   [-np.inf, -np.inf, -np.inf, -np.inf, -np.inf, 7.0]], np.float32)  # one left
  for row in rows:
    logits = jnp.broadcast_to(jnp.asarray(row), (n, row.size))
    draws = np.asarray(jax.jit(sampling.sample_categorical)(jax.random.key(3), logits))
    counts = np.bincount(draws, minlength=row.size)
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    np.testing.assert_array_equal(counts[probs == 0], 0)
    stderr = np.sqrt(n * probs * (1 - probs))
    assert np.all(np.abs(counts - n * probs) <= 5 * stderr + 1e-9), (counts, n * probs)


def test_repetition_penalty_hf_rule():
  x = jnp.asarray([[2.0, -2.0, 1.0, -1.0]])
  seen = jnp.asarray([[True, True, False, False]])
  np.testing.assert_allclose(sampling.apply_repetition_penalty(x, seen, 2.0),
                             [[1.0, -4.0, 1.0, -1.0]])


# ----- stopping, seeds, streaming -----------------------------------------------------------

def test_rows_stop_on_their_own_at_eos_and_stop_sequences():
  model, params = _model()
  free = np.asarray(sampling.generate(model, params, PROMPTS, LENGTHS, rng=0, **GREEDY).completion)
  # Row 0's third greedy token becomes an EOS id; row 1's tokens 3..5 a stop sequence. Stop ids
  # are data, so this reuses the compiled program.
  eos = int(free[0, 2])
  stop = tuple(int(t) for t in free[1, 3:6])
  out = sampling.generate(model, params, PROMPTS, LENGTHS, rng=0, eos_ids=(eos,),
                          stop_sequences=(stop, (47, 46)), **GREEDY)

  def first_stop(row):
    for i in range(M):
      if row[i] == eos or (i >= 2 and tuple(row[i - 2:i + 1]) == stop):
        return i + 1
    return M

  for b in range(3):
    n = first_stop(free[b])
    assert int(out.lengths[b]) == n
    np.testing.assert_array_equal(out.completion[b, :n], free[b, :n])
    assert (np.asarray(out.completion[b, n:]) == PAD).all()
    np.testing.assert_array_equal(out.completion_mask[b], np.arange(M) < n)
    assert (np.asarray(out.logprobs[b, n:]) == 0).all()
    end = int(LENGTHS[b]) + n
    np.testing.assert_array_equal(out.tokens[b, :LENGTHS[b]], PROMPTS[b, :LENGTHS[b]])
    np.testing.assert_array_equal(out.tokens[b, LENGTHS[b]:end], free[b, :n])
    assert (np.asarray(out.tokens[b, end:]) == PAD).all()
  assert int(out.lengths[0]) <= 3 and int(out.lengths[1]) <= 6


def test_all_rows_stopped_ends_the_loop_and_max_new_bounds_rows():
  model, params = _model()
  free = sampling.generate(model, params, PROMPTS, LENGTHS, rng=0, **GREEDY)
  assert (np.asarray(free.lengths) == M).all()
  firsts = sorted(set(int(t) for t in np.asarray(free.completion[:, 0])))
  out = sampling.generate(model, params, PROMPTS, LENGTHS, rng=0, eos_ids=firsts, **GREEDY)
  np.testing.assert_array_equal(out.lengths, [1, 1, 1])


def test_seed_reproduces_and_different_seeds_differ():
  model, params = _model()
  a = sampling.generate(model, params, PROMPTS, LENGTHS, rng=7, **PENALISED)
  b = sampling.generate(model, params, PROMPTS, LENGTHS, rng=jax.random.key(7), **PENALISED)
  c = sampling.generate(model, params, PROMPTS, LENGTHS, rng=8, **PENALISED)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)


def test_stream_yields_the_same_tokens_as_generate():
  model, params = _model()
  out = sampling.generate(model, params, PROMPTS[:1, :3], LENGTHS[:1], rng=4, eos_ids=(EOS,),
                          **FILTERED)
  got = list(sampling.stream(model, params, [5, 6, 7], rng=4, eos_ids=(EOS,), **FILTERED))
  assert got == [int(t) for t in np.asarray(out.completion[0, :int(out.lengths[0])])]


def test_rejects_bad_controls_naming_the_field():
  model, params = _model()
  with pytest.raises(ValueError, match="top_p"):
    sampling.generate(model, params, PROMPTS, LENGTHS, rng=0, max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="pad_id"):
    sampling.generate(model, params, PROMPTS, LENGTHS, rng=0, max_new_tokens=2, eos_ids=(0,),
                      pad_id=0)
  with pytest.raises(ValueError, match="stop_sequences"):
    sampling.generate(model, params, PROMPTS, LENGTHS, rng=0, max_new_tokens=2,
                      stop_sequences=((),))
  with pytest.raises(ValueError, match="max_len"):
    sampling.generate(model, params, PROMPTS, LENGTHS, rng=0, max_new_tokens=64)


# ----- 8 simulated devices -----------------------------------------------------------------

_SHARDED = textwrap.dedent("""
  import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
  from jax.sharding import NamedSharding, PartitionSpec as P
  from gptjax import sampling
  from gptjax.model import GPT, ModelConfig
  assert len(jax.devices()) == 8, jax.devices()
  model = GPT(ModelConfig(vocab_size=48, num_layers=2, num_heads=2, d_model=32, max_len=64))
  init = lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 4), jnp.int32))["params"])
  params = jax.tree.map(lambda x: x * 3.0, jax.jit(init)(jax.random.key(0)))
  rs = np.random.RandomState(0)
  lengths = rs.randint(1, 7, size=16).astype(np.int32)
  prompts = rs.randint(3, 48, size=(16, 6)).astype(np.int32)
  prompts[np.arange(6)[None] >= lengths[:, None]] = 0
  kw = dict(rng=1, max_new_tokens=10, temperature=1.0, top_k=8, top_p=0.9, eos_ids=(2, 3, 4),
            pad_id=0)
  dev0 = jax.devices()[0]
  one = jax.device_get(sampling.generate(model, jax.device_put(params, dev0),
                                         jax.device_put(prompts, dev0),
                                         jax.device_put(lengths, dev0), **kw))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch = NamedSharding(mesh, P("data"))
  params = jax.device_put(params, NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    out = sampling.generate(model, params, jax.device_put(prompts, batch),
                            jax.device_put(lengths, batch), **kw)
  assert out.tokens.sharding.spec[0] == "data", out.tokens.sharding
  out = jax.device_get(out)
  np.testing.assert_array_equal(out.tokens, one.tokens)
  np.testing.assert_allclose(out.logprobs, one.logprobs, atol=1e-5)
  assert 1 < out.lengths.min() < 10 or 1 < out.lengths.max() < 10, out.lengths
  print("sharded ok", out.lengths)
""")


def test_sharded_over_8_devices_matches_one_device():
  from conftest import REPO, child_env
  proc = subprocess.run([sys.executable, "-c", _SHARDED], env=child_env(8), cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "sharded ok" in proc.stdout


# ----- the CLI, on a tiny model standing in for a workdir -----------------------------------

@pytest.fixture
def fake_workdir(monkeypatch):
  from gptjax import checkpoint
  from gptjax.data.tokenizers import CharTokenizer
  tok = CharTokenizer("abcdefgh ?!")
  model = GPT(ModelConfig(vocab_size=tok.vocab_size, num_layers=1, num_heads=2, d_model=16,
                          max_len=64))
  params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 4), jnp.int32))["params"]))(
      jax.random.key(0))
  monkeypatch.setattr(checkpoint, "load_for_inference",
                      lambda workdir, step=None: (model, params, tok, None))
  return tok


def test_sample_cli_prints_each_sample(fake_workdir):
  from gptjax import generate_cli
  lines = []
  argv = ["--workdir", "unused", "--prompt", "abc", "--num_samples", "3", "--max_new_tokens",
          "12", "--temperature", "0.8", "--top_k", "5", "--top_p", "0.95", "--seed", "1"]
  assert generate_cli.sample_main(argv, write=lines.append) == 0
  assert len(lines) == 3 and all(line.startswith(f"--- sample {i + 1}/3\nabc")
                                 for i, line in enumerate(lines))
  again = []
  generate_cli.sample_main(argv, write=again.append)
  assert again == lines


def test_chat_cli_streams_replies_and_keeps_history(fake_workdir):
  from gptjax import generate_cli
  inputs = iter(["hi", "/system be brief", "again?", "/reset", "/quit"])
  out = []
  code = generate_cli.chat_main(["--workdir", "unused", "--max_new_tokens", "6", "--seed", "0"],
                                read_line=lambda prompt: next(inputs), write=out.append)
  text = "".join(out)
  assert code == 0 and text.count("model> ") == 2
  # A reply is written piece by piece as tokens arrive.
  first_reply = out[out.index("model> ") + 1:]
  assert len(first_reply[:first_reply.index("\n")]) >= 1


def test_sample_cli_stops_at_the_end_of_turn_marker_without_chat(fake_workdir, monkeypatch):
  """A plain prompt is continued until EOS or `<|end|>`: a chat-tuned model ends its reply with
  the marker, and the marker's text must not be streamed."""
  from gptjax import engine, generate_cli
  seen = []
  real = engine.generate

  def spy(*args, **kwargs):
    seen.append(tuple(kwargs["eos_ids"]))
    return real(*args, **kwargs)
  monkeypatch.setattr(engine, "generate", spy)
  out = []
  assert generate_cli.sample_main(["--workdir", "unused", "--prompt", "abc",
                                   "--max_new_tokens", "4"], write=out.append) == 0
  tok = fake_workdir
  assert set(seen[0]) == {tok.eos_id, tok.special_ids["<|end|>"]}
  assert "<|end|>" not in out[0]


def _count_calls(monkeypatch, module, names):
  """Wraps module.<name> for each name so calls are recorded in order; returns the record."""
  calls = []
  for name in names:
    real = getattr(module, name)

    def wrapped(*a, _real=real, _name=name, **k):
      calls.append(f"{module.__name__.rsplit('.', 1)[-1]}.{_name}")
      return _real(*a, **k)
    monkeypatch.setattr(module, name, wrapped)
  return calls


def test_sample_and_chat_decode_on_the_engine_and_greedy_equals_the_static_sampler(
    fake_workdir, monkeypatch):
  """`sample` and `chat` decode with the continuous-batching engine. Greedy, their text equals
  the static sampler's (the path every control took before); a repetition penalty or a stop
  string, which the engine lacks (`engine.supports`), goes to the static sampler instead."""
  from gptjax import engine, generate_cli
  calls = _count_calls(monkeypatch, engine, ("generate", "stream"))
  static_calls = _count_calls(monkeypatch, sampling, ("generate", "stream"))
  argv = ["--workdir", "unused", "--prompt", "abc", "--num_samples", "3", "--max_new_tokens",
          "10", "--temperature", "0"]
  chat_argv = ["--workdir", "unused", "--max_new_tokens", "8", "--temperature", "0"]

  def run_both():
    out, talk = [], []
    assert generate_cli.sample_main(argv, write=out.append) == 0
    turns = iter(["hi", "again?", "/quit"])
    assert generate_cli.chat_main(chat_argv, read_line=lambda _: next(turns),
                                  write=talk.append) == 0
    return out, "".join(talk)

  on_engine = run_both()
  assert calls == ["engine.generate", "engine.stream", "engine.stream"] and static_calls == []
  with monkeypatch.context() as m:
    # The previous path: the static sampler for every control set.
    m.setattr(engine, "supports", lambda **kw: False)
    static = run_both()
  assert static_calls == ["sampling.generate", "sampling.stream", "sampling.stream"]
  assert on_engine == static
  assert len(on_engine[0]) == 3 and on_engine[1].count("model> ") == 2
  calls.clear()
  static_calls.clear()
  assert generate_cli.sample_main(argv + ["--repetition_penalty", "1.3"], write=[].append) == 0
  assert generate_cli.sample_main(argv + ["--stop", "b"], write=[].append) == 0
  turns = iter(["hi", "/quit"])
  assert generate_cli.chat_main(chat_argv + ["--repetition_penalty", "1.3"],
                                read_line=lambda _: next(turns), write=[].append) == 0
  assert calls == [] and static_calls == ["sampling.generate", "sampling.generate",
                                          "sampling.stream"]


def test_sample_cli_samples_are_the_engines_per_request_draws(fake_workdir):
  """Sampled (temperature > 0), sample i of `gptjax sample` is request i of engine.generate
  with the seed: the same text whatever --num_samples is."""
  from gptjax import generate_cli
  argv = ["--workdir", "unused", "--prompt", "abc", "--max_new_tokens", "12", "--seed", "4",
          "--temperature", "1.0"]
  three, five = [], []
  assert generate_cli.sample_main(argv + ["--num_samples", "3"], write=three.append) == 0
  assert generate_cli.sample_main(argv + ["--num_samples", "5"], write=five.append) == 0
  body = lambda lines: [line.split("\n", 1)[1] for line in lines]
  assert body(five[:3]) == body(three)
  assert len(set(body(five))) > 1                     # the samples are draws, not one text


def test_sample_cli_with_chat_separates_the_reply_from_the_prompt(fake_workdir):
  from gptjax import generate_cli
  out = []
  assert generate_cli.sample_main(["--workdir", "unused", "--prompt", "abc", "--chat",
                                   "--max_new_tokens", "5"], write=out.append) == 0
  assert out[0].startswith("--- sample 1/1\nuser> abc\nmodel> "), out


def test_max_new_tokens_beyond_the_window_is_an_error_and_the_default_fits(fake_workdir,
                                                                            capsys):
  from gptjax import generate_cli
  out = []
  # The fake model's window is 64 tokens; BOS + "abc" leave 60.
  assert generate_cli.sample_main(["--workdir", "unused", "--prompt", "abc",
                                   "--max_new_tokens", "61"], write=out.append) == 2
  err = capsys.readouterr().err
  assert err == ("gptjax sample: --max_new_tokens: 61 does not fit; the model's window is 64 "
                 "tokens and the prompt takes 4, so at most 60 new tokens\n")
  assert out == []
  assert generate_cli.sample_main(["--workdir", "unused", "--prompt", "abc", "--temperature",
                                   "0", "--max_new_tokens", "60"], write=out.append) == 0
  assert generate_cli.chat_main(["--workdir", "unused", "--max_new_tokens", "64"],
                                read_line=lambda _: "/quit", write=out.append) == 2
  assert "--max_new_tokens: 64 does not fit" in capsys.readouterr().err


def test_chat_cli_acknowledges_system_and_reset(fake_workdir):
  from gptjax import generate_cli
  inputs = iter(["/system be brief", "/reset", "/system", "/quit"])
  out = []
  assert generate_cli.chat_main(["--workdir", "unused"], read_line=lambda _: next(inputs),
                                write=out.append) == 0
  assert out[1:] == ["(system message set: be brief)\n",
                     "(conversation cleared; the system message is kept)\n",
                     "(system message cleared)\n"]


def test_sample_replies_shows_a_bar_over_its_batches_only_when_asked(capsys):
  """rm_data, the RM's best-of-N and the comparison sample for minutes; each shows a bar."""
  from gptjax.data import chat
  from gptjax.data.tokenizers import CharTokenizer
  tok = CharTokenizer("abc ")
  model = GPT(ModelConfig(vocab_size=tok.vocab_size, num_layers=1, num_heads=2, d_model=16,
                          max_len=32))
  params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 4), jnp.int32))["params"]))(
      jax.random.key(0))
  prompts = [[tok.bos_id] + tok.encode("ab")] * 6
  kw = dict(seed=0, max_new_tokens=3, batch_size=2, pad_id=tok.pad_id,
            eos_ids=chat.reply_stop_ids(tok))
  quiet = sampling.sample_replies(model, params, prompts, **kw)
  assert capsys.readouterr().err == ""
  shown = sampling.sample_replies(model, params, prompts, progress="rm_data: sampling train replies",
                                  **kw)
  err = capsys.readouterr().err
  assert "rm_data: sampling train replies" in err and "3/3" in err, err
  assert quiet[0] == shown[0]


def test_the_logit_chain_is_one_public_function_in_its_order():
  """Repetition penalty, then temperature, then top-k, top-p, min-p: worked by hand."""
  from gptjax import sampling as sampling_lib
  logits = jnp.asarray([[2.0, 1.0, -1.0, 0.5]])
  seen = jnp.asarray([[True, False, True, False]])
  # Penalty 2 on seen tokens: 2 -> 1, -1 -> -2; then /0.5: [2, 2, -4, 1]; top-3 drops -4; min-p
  # 0.5 keeps tokens with p >= p_max / 2: e^1 < e^2 / 2, so 1 goes too.
  out = sampling_lib.process_logits(logits, seen=seen, repetition_penalty=2.0, temperature=0.5,
                                    top_k=3, min_p=0.5)
  np.testing.assert_array_equal(np.isfinite(out), [[True, True, False, False]])
  np.testing.assert_allclose(np.asarray(out)[0, :2], [2.0, 2.0])
  greedy = sampling_lib.process_logits(logits, seen=seen, repetition_penalty=2.0, temperature=0.0)
  np.testing.assert_allclose(greedy, [[1.0, 1.0, -2.0, 0.5]])
