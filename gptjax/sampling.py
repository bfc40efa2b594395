"""Autoregressive sampling: one prefill call, then a decode loop over a preallocated KV cache.

    out = generate(model, params, prompts, prompt_lengths, rng=key, max_new_tokens=64,
                   temperature=0.8, top_k=40, top_p=0.95, eos_ids=(tok.eos_id,), pad_id=tok.pad_id)
    out.tokens [B, P+M]   each row's real prompt, then its completion, then pad (contiguous, so a
                          plain forward with positions = arange scores it)
    out.completion, out.logprobs, out.completion_mask [B, M];  out.lengths [B]

Shapes (letters as in `gptjax/__init__.py`): P padded prompt length, M = max_new_tokens,
S = P + M cache slots.

Cache layout. The prompts are right-padded; prefill writes them to slots [0, P) with segment id 1
for real tokens and 0 for pad, so pad slots are masked for every later query. Decode step i writes
every row's token to the same slot P + i, but at the row's own position prompt_length + i. The
attention mask is causal over slots and equal over segment ids, so each row sees exactly its own
prompt and completion, and positions (learned or RoPE) are the ones a plain forward would use.

Long generations decode in phases over a cache that grows (`decode_phases`), so that early steps
do not read slots that cannot be filled yet; the result is the same as one loop over S slots.

Log-probs. `logprobs` are `token_logprobs` of the *raw* model logits at the sampling temperature,
before the repetition penalty and the top-k / top-p / min-p filters. That is the distribution the
trainer recomputes with a plain forward (it knows nothing about the filters), so the PPO ratio is
1 on the first update and the KL to an identical reference is 0. With temperature 0 (greedy) the
log-probs are taken at temperature 1.

Decoding controls follow Hugging Face transformers, in its order: repetition penalty on the raw
logits, then temperature, then top-k, top-p and min-p, each on the output of the one before. The
filters are static switches: a control left at its neutral value costs nothing in the loop.

Constrained decoding (`constraint=`, see `constraints.py`): the loop carries one automaton state
per row, masks each row's logits to the tokens its state allows before the chain above, and
moves the state along the automaton's table. Without a constraint the program is unchanged.

What does not live here: prompt strategies (`prompting.py`), the CLI (`generate_cli.py`), and
rollout bookkeeping for RL (`rl/`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gptjax import sharding as shd
from gptjax.losses.common import token_logprobs
from gptjax.model import _DTYPES, grow_cache, init_cache

NEG_INF = -jnp.inf


# --------------------------------------------------------------------------------------------
# Filters: pure functions over logits [..., V]. Masks are True where a token stays eligible.
# --------------------------------------------------------------------------------------------

def top_k_mask(logits, k: int):
  """Keeps the k largest logits; ties with the k-th value are kept too (as in HF's TopK warper)."""
  k = min(int(k), logits.shape[-1])
  if k <= 0:
    return jnp.ones(logits.shape, bool)
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return logits >= kth


def _top_p_cutoff(sorted_logits, p: float):
  """The smallest kept logit for top-p, given logits sorted in descending order [..., K]."""
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  # Mass of the tokens ranked strictly above each one: a token is kept while that mass is < p,
  # which keeps the smallest prefix whose mass reaches p (the first token always has 0 above it).
  above = jnp.cumsum(probs, axis=-1) - probs
  kept = jnp.sum(above < p, axis=-1, keepdims=True)
  return jnp.take_along_axis(sorted_logits, kept - 1, axis=-1)


def top_p_mask(logits, p: float):
  """Nucleus filter: keeps the smallest set of top tokens whose probability mass reaches p.

  Comparing against the cutoff logit (not a position in a sort order) keeps every token tied with
  the last kept one, so the mask does not depend on how a sort breaks ties. p >= 1 keeps all.
  """
  if p >= 1.0:
    return jnp.ones(logits.shape, bool)
  sorted_logits = jax.lax.top_k(logits, logits.shape[-1])[0]
  return logits >= _top_p_cutoff(sorted_logits, p)


def min_p_mask(logits, min_p: float):
  """Keeps tokens whose probability is at least min_p times the top token's probability."""
  if min_p <= 0.0:
    return jnp.ones(logits.shape, bool)
  probs = jax.nn.softmax(logits, axis=-1)
  return probs >= min_p * jnp.max(probs, axis=-1, keepdims=True)


def apply_repetition_penalty(logits, seen, penalty: float):
  """HF's repetition penalty on tokens already seen: positive logits / penalty, negative × penalty."""
  if penalty == 1.0:
    return logits
  penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
  return jnp.where(seen, penalised, logits)


def filter_logits(logits, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
  """Applies top-k, then top-p, then min-p (each to the output of the one before, as HF does);
  removed tokens get -inf. Takes logits that are already divided by the temperature."""
  logits = logits.astype(jnp.float32)
  k = min(int(top_k), logits.shape[-1])
  if 0 < k < logits.shape[-1]:
    top_values = jax.lax.top_k(logits, k)[0]                          # sorted, descending
    logits = jnp.where(logits >= top_values[..., -1:], logits, NEG_INF)
    if top_p < 1.0:
      # After top-k everything outside the top k has zero mass, so the nucleus is found among
      # the k sorted values without a full-vocabulary sort.
      logits = jnp.where(logits >= _top_p_cutoff(top_values, top_p), logits, NEG_INF)
  elif top_p < 1.0:
    logits = jnp.where(top_p_mask(logits, top_p), logits, NEG_INF)
  if min_p > 0.0:
    logits = jnp.where(min_p_mask(logits, min_p), logits, NEG_INF)
  return logits


def process_logits(logits, *, seen=None, repetition_penalty: float = 1.0,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0, allowed=None):
  """The sampler's whole logit chain, in its order: the constraint's mask (tokens `allowed`
  [..., V] bool; `constraints.py`), repetition penalty (on tokens `seen` [..., V] bool), then
  temperature, then top-k, top-p and min-p. [..., V] -> [..., V] float32, removed tokens at
  -inf; sampling draws from softmax of the result. Temperature 0 means greedy: the masked and
  penalised logits come back unscaled and unfiltered, and the sampler takes their argmax.
  `generate`, `stream` and anything else that wants the same distribution call this."""
  if allowed is not None:
    # First, so that top-k and top-p choose among the tokens the pattern allows.
    logits = jnp.where(allowed, logits, NEG_INF)
  if seen is not None:
    logits = apply_repetition_penalty(logits, seen, repetition_penalty)
  if temperature == 0.0:
    return logits
  return filter_logits(logits / temperature, top_k=top_k, top_p=top_p, min_p=min_p)


def sample_categorical(key, logits):
  """One draw per row from softmax(logits) [..., V] -> int32 [...], by inverting the CDF with a
  single uniform per row. Tokens at -inf (filtered out) have zero mass and are never drawn.

  `jax.random.categorical` (Gumbel-max) needs V random numbers per row; on 2 CPU cores,
  generating them took about 3 ms of an 11 ms batch-64 decode step at V=2048. One uniform per row
  plus a cumulative sum gives the same distribution for about a third of that. Like Gumbel-max
  in float32 ("low" mode), tokens with probability below about 1e-7 are drawn at a slightly
  wrong rate.
  """
  logits = logits.astype(jnp.float32)
  cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)                     # [...,V]
  total = cdf[..., -1:]
  u = jax.random.uniform(key, total.shape, jnp.float32) * total                   # [...,1]
  # The drawn token is the first one whose cdf exceeds u, i.e. the number of cdf values <= u.
  # u < total mathematically, but u * total can round up to total; the clamp then takes the first
  # token at which the cdf reaches its total, which has positive mass (the cdf rises there).
  drawn = jnp.sum(cdf <= u, axis=-1)
  last = jnp.sum(cdf < total, axis=-1)
  return jnp.minimum(drawn, last).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# Decoding state and one step.
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SamplingControls:
  """Everything that changes the compiled program; hashable, so it is a static jit argument."""
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  pad_id: int = 0
  # Stop ids are data, not program: only the sizes of their (bucketed) arrays are static, so a
  # new EOS id or stop sequence does not recompile.
  num_eos: int = 4
  stop_shape: tuple = (4, 8)        # (sequences, width)

  def validate(self):
    def bad(field, msg):
      raise ValueError(f"sampling.{field}: {msg}")
    if self.max_new_tokens <= 0:
      bad("max_new_tokens", f"must be positive, got {self.max_new_tokens}")
    if self.temperature < 0:
      bad("temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
    if self.top_k < 0:
      bad("top_k", f"must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      bad("top_p", f"must be in (0, 1], got {self.top_p}")
    if not 0.0 <= self.min_p <= 1.0:
      bad("min_p", f"must be in [0, 1], got {self.min_p}")
    if self.repetition_penalty <= 0:
      bad("repetition_penalty", f"must be positive, got {self.repetition_penalty}")

  @property
  def window(self) -> int:
    return self.stop_shape[1]


# Fillers of the stop arrays; neither is a token id, nor the -1 that fills the recent window.
_NEVER = -3       # an unused EOS slot, or an unused stop sequence: matches nothing
_ANY = -2         # left filler of a stop sequence shorter than the array's width: matches anything


def _round_up(n: int, m: int) -> int:
  return max(m, -(-n // m) * m)


def stop_arrays(eos_ids: Sequence[int], stop_sequences: Sequence[Sequence[int]]):
  """EOS ids [E] and stop sequences [NS, W] (right-aligned) as int32 arrays whose sizes are
  rounded up to buckets, so most changes to them reuse the compiled sampler."""
  eos_ids = [int(e) for e in eos_ids]
  stop_sequences = [[int(t) for t in s] for s in stop_sequences]
  if any(len(s) == 0 for s in stop_sequences):
    raise ValueError("sampling.stop_sequences: an empty stop sequence would stop every row at once")
  eos = np.full((_round_up(len(eos_ids), 4),), _NEVER, np.int32)
  eos[:len(eos_ids)] = eos_ids
  width = _round_up(max((len(s) for s in stop_sequences), default=0), 8)
  stops = np.full((_round_up(len(stop_sequences), 4), width), _NEVER, np.int32)
  for i, seq in enumerate(stop_sequences):
    stops[i] = _ANY
    stops[i, width - len(seq):] = seq
  return eos, stops


@struct.dataclass
class DecodeState:
  """The decode loop's carry. Step i samples completion token i from `logits`."""
  cache: dict
  logits: jax.Array            # [B,V] raw logits for the next token
  step: jax.Array              # [] int32: number of completion tokens sampled so far
  prompt_lengths: jax.Array    # [B]
  done: jax.Array              # [B] bool: the row has stopped (its stop token is recorded)
  completion: jax.Array        # [B,M] pad after a row stops
  logprobs: jax.Array          # [B,M] 0 after a row stops
  completion_mask: jax.Array   # [B,M] 1 up to and including the stop token
  seen: jax.Array              # [B,V] bool for the repetition penalty, or [B,0] when it is off
  recent: jax.Array            # [B,W] the last W completion tokens (-1 before the start)
  eos_ids: jax.Array           # [E] see `stop_arrays`
  stop_sequences: jax.Array    # [NS,W]
  fsm: jax.Array | None = None  # [B] int32 automaton state of each row; None: unconstrained


@struct.dataclass
class SampleOutput:
  tokens: jax.Array            # [B,P+M] real prompt, completion, then pad
  completion: jax.Array        # [B,M]
  logprobs: jax.Array          # [B,M] float32, raw-logit log-probs at the sampling temperature
  completion_mask: jax.Array   # [B,M] float32
  lengths: jax.Array           # [B] completion lengths (stop token included)
  prompt_lengths: jax.Array    # [B]
  total_lengths: jax.Array     # [B] prompt + completion: the real tokens of each row of `tokens`


def _head_logits(cfg, params, hidden):
  """The model's LM head on hidden [B,T,D] -> [B,T,V] float32, built from the same flax modules
  with the same settings as `GPT`, so prefill can compute logits at one position per row instead
  of all P (a [B,P,V] float32 array is the largest thing in a long-prompt prefill)."""
  dt, pdt = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
  if cfg.tie_embeddings:
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=pdt)
    out = embed.apply({"params": params["embed"]}, hidden, method=nn.Embed.attend)
  else:
    head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=pdt)
    out = head.apply({"params": params["lm_head"]}, hidden)
  out = out.astype(jnp.float32)
  if cfg.final_logit_softcap:      # as GPT applies it (Gemma-style models)
    out = cfg.final_logit_softcap * jnp.tanh(out / cfg.final_logit_softcap)
  return out


def _choose(state: DecodeState, rng, c: SamplingControls, automaton=None):
  """Samples token `state.step` for every row and records it. Returns the new state. With an
  `automaton` (constraints.Automaton), each row draws among the tokens its state allows."""
  raw = state.logits
  allowed = None
  if automaton is not None:
    allowed = automaton.allowed(state.fsm, c.max_new_tokens - state.step)
  logits = process_logits(raw, seen=state.seen, repetition_penalty=c.repetition_penalty,
                          temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                          min_p=c.min_p, allowed=allowed)
  key = jax.random.fold_in(rng, state.step)
  if c.temperature == 0.0:
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  else:
    token = sample_categorical(key, logits)
  lp = token_logprobs(raw[:, None, :], token[:, None],
                      temperature=c.temperature if c.temperature > 0 else 1.0)[:, 0]

  live = ~state.done
  token = jnp.where(live, token, c.pad_id)
  i = state.step
  completion = state.completion.at[:, i].set(token)
  logprobs = state.logprobs.at[:, i].set(jnp.where(live, lp, 0.0))
  completion_mask = state.completion_mask.at[:, i].set(live.astype(jnp.float32))

  stop = jnp.any(token[:, None] == state.eos_ids[None, :], axis=1)
  # Stop sequences are matched against the completion only (the window starts filled with -1),
  # so a prompt that happens to end in half a stop sequence does not cut the first tokens short.
  recent = jnp.concatenate([state.recent[:, 1:], token[:, None]], axis=1)          # [B,W]
  seqs = state.stop_sequences[None]                                                 # [1,NS,W]
  hit = (recent[:, None, :] == seqs) | (seqs == _ANY)
  stop |= jnp.any(jnp.all(hit, axis=2), axis=1)
  seen = state.seen
  if c.repetition_penalty != 1.0:
    seen = seen | (jax.nn.one_hot(token, seen.shape[-1], dtype=bool) & live[:, None])
  fsm = state.fsm
  if automaton is not None:
    fsm = jnp.where(live, automaton.advance(fsm, token), fsm)
  return state.replace(step=i + 1, done=state.done | (live & stop), completion=completion,
                       logprobs=logprobs, completion_mask=completion_mask, seen=seen,
                       recent=recent, fsm=fsm)


def _prefill(model, params, prompts, prompt_lengths, eos_ids, stop_sequences, rng,
             c: SamplingControls, cache_len: int | None = None, automaton=None) -> DecodeState:
  """Runs the prompts through the model into a fresh cache of `cache_len` slots (default P + M)
  and samples the first token."""
  cfg = model.cfg.resolved()
  params = nn.meta.unbox(params)
  b, p = prompts.shape
  m = c.max_new_tokens
  prompt_lengths = prompt_lengths.astype(jnp.int32)
  real = jnp.arange(p)[None, :] < prompt_lengths[:, None]                        # [B,P]
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  cache = init_cache(cfg, b, cache_len or p + m)
  out = model.apply({"params": params}, prompts, positions=positions,
                    segment_ids=real.astype(jnp.int32), cache=cache, cache_index=0,
                    compute_logits=False)
  last = jnp.maximum(prompt_lengths - 1, 0)
  hidden = jnp.take_along_axis(out.hidden, last[:, None, None], axis=1)         # [B,1,D]
  logits = _head_logits(cfg, params, hidden)[:, 0]                               # [B,V]

  v = logits.shape[-1]
  if c.repetition_penalty != 1.0:
    # HF penalises every token of the input, prompt included; pad is not part of the prompt.
    onehot = jax.nn.one_hot(prompts, v, dtype=bool) & real[..., None]
    seen = jnp.any(onehot, axis=1)
  else:
    seen = jnp.zeros((b, 0), bool)
  state = DecodeState(
      cache=out.cache, logits=logits, step=jnp.zeros((), jnp.int32),
      prompt_lengths=prompt_lengths, done=jnp.zeros((b,), bool),
      completion=jnp.full((b, m), c.pad_id, jnp.int32), logprobs=jnp.zeros((b, m), jnp.float32),
      completion_mask=jnp.zeros((b, m), jnp.float32), seen=seen,
      recent=jnp.full((b, c.window), -1, jnp.int32), eos_ids=eos_ids.astype(jnp.int32),
      stop_sequences=stop_sequences.astype(jnp.int32),
      fsm=None if automaton is None else jnp.zeros((b,), jnp.int32))
  return _choose(state, rng, c, automaton)


def _advance(model, params, state: DecodeState, rng, c: SamplingControls,
             prompt_width: int, automaton=None) -> DecodeState:
  """Feeds the last sampled token through the model (slot P + step - 1 for every row, position
  prompt_length + step - 1 per row) and samples the next one. P is `prompt_width`; the cache may
  be shorter than P + M (see `decode_phases`), as long as it holds slot P + step - 1."""
  params = nn.meta.unbox(params)
  b = state.completion.shape[0]
  p = prompt_width
  i = state.step - 1
  token = jax.lax.dynamic_slice_in_dim(state.completion, i, 1, axis=1)           # [B,1]
  out = model.apply({"params": params}, token, positions=(state.prompt_lengths + i)[:, None],
                    segment_ids=jnp.ones((b, 1), jnp.int32), cache=state.cache,
                    cache_index=p + i)
  return _choose(state.replace(cache=out.cache, logits=out.logits[:, 0]), rng, c, automaton)


def _finish(prompts, state: DecodeState, c: SamplingControls) -> SampleOutput:
  b, p = prompts.shape
  m = c.max_new_tokens
  lengths = jnp.sum(state.completion_mask, axis=1).astype(jnp.int32)
  # Place each completion right after its row's real prompt, so `tokens` is contiguous.
  j = jnp.arange(p + m)[None, :]
  into = j - state.prompt_lengths[:, None]
  from_completion = jnp.take_along_axis(state.completion, jnp.clip(into, 0, m - 1), axis=1)
  padded_prompts = jnp.concatenate([prompts, jnp.full((b, m), c.pad_id, prompts.dtype)], axis=1)
  tokens = jnp.where(into < 0, padded_prompts,
                     jnp.where(into < lengths[:, None], from_completion, c.pad_id))
  return SampleOutput(tokens=tokens.astype(jnp.int32), completion=state.completion,
                      logprobs=state.logprobs, completion_mask=state.completion_mask,
                      lengths=lengths, prompt_lengths=state.prompt_lengths,
                      total_lengths=state.prompt_lengths + lengths)


# Decode phases. Every decode step attends over the whole cache, and on CPU (and for long
# generations anywhere) reading it is most of the step: at batch 64 on 2 CPU cores a step costs
# about 1.4 ms plus 0.02 ms per cache slot. A cache sized P + M from the start makes early steps
# read slots that are still empty. Instead the loop runs in phases over a cache that grows: phase
# j decodes steps [bounds[j-1], bounds[j]) with P + bounds[j] slots, and the cache is padded with
# empty slots between phases. Slots are masked by segment id either way, so the tokens and
# log-probs are those of one loop over P + M slots. Each phase is its own compiled loop body,
# hence at most _MAX_PHASES, each at least _MIN_PHASE steps long.
_MIN_PHASE = 32
_MAX_PHASES = 8


def decode_phases(max_new_tokens: int) -> tuple[int, ...]:
  """Step boundaries of the decode phases: equal lengths, the last ending at max_new_tokens."""
  n = max(1, min(_MAX_PHASES, max_new_tokens // _MIN_PHASE))
  return tuple(-(-max_new_tokens * (j + 1) // n) for j in range(n))


@functools.partial(jax.jit, static_argnames=("model", "c"))
def _generate(model, params, prompts, prompt_lengths, eos_ids, stop_sequences, rng,
              c: SamplingControls, automaton=None):
  p = prompts.shape[1]
  bounds = decode_phases(c.max_new_tokens)
  state = _prefill(model, params, prompts, prompt_lengths, eos_ids, stop_sequences, rng, c,
                   cache_len=p + bounds[0], automaton=automaton)
  for end in bounds:
    # Step s writes slot P + s - 1, so steps below `end` fit in P + end slots.
    state = state.replace(cache=grow_cache(state.cache, p + end))
    state = jax.lax.while_loop(lambda s, end=end: (s.step < end) & ~jnp.all(s.done),
                               lambda s: _advance(model, params, s, rng, c, p, automaton),
                               state)
  return _finish(prompts, state, c)


def _rng(rng):
  if isinstance(rng, int):
    return jax.random.key(rng)
  return rng


def _automaton(constraint, c: SamplingControls, vocab_size: int):
  """The device automaton of a `constraints.Constraint` (or an Automaton given as is), checked
  against the budget and the model's vocabulary; None when unconstrained."""
  if constraint is None:
    return None
  from gptjax import constraints
  automaton = getattr(constraint, "automaton", constraint)
  if automaton.next_state.shape[1] != vocab_size:
    raise ValueError(f"constraint: compiled for {automaton.next_state.shape[1]} tokens, but the "
                     f"model has {vocab_size}; compile it with vocab_size={vocab_size}")
  constraints.check_budget(automaton, c.max_new_tokens)
  return jax.tree.map(jnp.asarray, automaton)


def _controls(*, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, eos_ids,
              stop_sequences, pad_id):
  """Static controls plus the stop arrays, validated."""
  eos, stops = stop_arrays(eos_ids, stop_sequences)
  if int(pad_id) in [int(e) for e in eos_ids]:
    raise ValueError(f"sampling.pad_id: {pad_id} is also an EOS id; pad must differ from EOS")
  c = SamplingControls(
      max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
      top_p=float(top_p), min_p=float(min_p), repetition_penalty=float(repetition_penalty),
      pad_id=int(pad_id), num_eos=eos.shape[0], stop_shape=stops.shape)
  c.validate()
  return c, eos, stops


def _check_shapes(model, prompts, c: SamplingControls):
  cfg = model.cfg.resolved()
  if prompts.ndim != 2:
    raise ValueError(f"prompts must be [B,P], got shape {prompts.shape}")
  need = prompts.shape[1] + c.max_new_tokens
  if cfg.positional == "learned" and need > cfg.max_len:
    raise ValueError(f"prompt length {prompts.shape[1]} + max_new_tokens {c.max_new_tokens} = "
                     f"{need} exceeds model.max_len={cfg.max_len} (learned positions)")


def generate(model, params, prompts, prompt_lengths, *, rng, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, eos_ids: Sequence[int] = (),
             stop_sequences: Sequence[Sequence[int]] = (), pad_id: int = 0,
             constraint=None) -> SampleOutput:
  """Samples up to `max_new_tokens` per row from right-padded prompts [B,P] int32.

  `constraint` (a `constraints.Constraint` compiled with the same stop ids, or its Automaton):
  every row's completion is kept inside the pattern's language, inside the compiled loop; None
  leaves the program exactly as it is without one.

  Each row stops on its own at an EOS id or at the end of a stop sequence (matched within the
  completion; the stop tokens are kept and counted in its mask), and the loop ends early once all
  rows have stopped. `rng` is a key or an int seed; step i uses fold_in(rng, i), so a seed
  reproduces the output exactly, whatever the batch sharding. Compiled once per (model, shapes,
  controls). Runs under a mesh as is: shard prompts over the data axes; params are used in place.
  """
  c, eos, stops = _controls(
      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
      min_p=min_p, repetition_penalty=repetition_penalty, eos_ids=eos_ids,
      stop_sequences=stop_sequences, pad_id=pad_id)
  prompts = jnp.asarray(prompts, jnp.int32) if isinstance(prompts, np.ndarray) else prompts
  _check_shapes(model, prompts, c)
  prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32) if isinstance(
      prompt_lengths, (np.ndarray, list, tuple)) else prompt_lengths
  automaton = _automaton(constraint, c, model.cfg.resolved().vocab_size)
  return _generate(model, params, prompts.astype(jnp.int32), prompt_lengths, eos, stops,
                   _rng(rng), c, automaton)


# --------------------------------------------------------------------------------------------
# Streaming: the same prefill and step, driven from Python one token at a time.
# --------------------------------------------------------------------------------------------

_prefill_jit = jax.jit(_prefill, static_argnames=("model", "c", "cache_len"))
# The state (and its cache) is donated: each step updates it in place instead of copying it.
_advance_jit = jax.jit(_advance, static_argnames=("model", "c", "prompt_width"),
                       donate_argnames=("state",))


def stream(model, params, prompt_ids: Sequence[int], *, rng, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
           repetition_penalty: float = 1.0, eos_ids: Sequence[int] = (),
           stop_sequences: Sequence[Sequence[int]] = (), pad_id: int = 0,
           bucket: int = 32, constraint=None) -> Iterator[int]:
  """Yields the completion of one prompt token by token, as it is produced (for chat).

  Same program pieces and keys as `generate`, so with the same seed it yields the same tokens.
  The stop token itself is yielded last. The prompt is padded up to a multiple of `bucket`, so a
  conversation that grows turn by turn reuses a few compiled programs.
  """
  c, eos, stops = _controls(
      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
      min_p=min_p, repetition_penalty=repetition_penalty, eos_ids=eos_ids,
      stop_sequences=stop_sequences, pad_id=pad_id)
  n = len(prompt_ids)
  width = max(n, -(-n // bucket) * bucket)
  cfg = model.cfg.resolved()
  if cfg.positional == "learned":
    width = max(n, min(width, cfg.max_len - c.max_new_tokens))
  prompts = np.full((1, width), c.pad_id, np.int32)
  prompts[0, :n] = prompt_ids
  _check_shapes(model, prompts, c)
  rng = _rng(rng)
  automaton = _automaton(constraint, c, cfg.vocab_size)
  state = _prefill_jit(model, params, prompts, np.asarray([n], np.int32), eos, stops, rng, c,
                       automaton=automaton)
  for i in range(c.max_new_tokens):
    if i:
      state = _advance_jit(model, params, state, rng, c, width, automaton)
    token, done = jax.device_get((state.completion[0, i], state.done[0]))
    yield int(token)
    if done:
      return


@functools.partial(jax.jit, static_argnames=("model", "temperature"))
def completion_logprobs(model, params, out: SampleOutput, *, temperature: float = 1.0):
  """Log-probs of each completion token under a plain forward over `out.tokens` [B,M], aligned
  with `out.completion` and zeroed off its mask: what the trainer recomputes from a rollout."""
  params = nn.meta.unbox(params)
  tokens = out.tokens
  b, t = tokens.shape
  m = out.completion.shape[1]
  real = jnp.arange(t)[None, :] < out.total_lengths[:, None]
  logits = model.apply({"params": params}, tokens, segment_ids=real.astype(jnp.int32)).logits
  lp = token_logprobs(logits[:, :-1], tokens[:, 1:], temperature=temperature)     # [B,T-1]
  # Completion token i sits at index prompt_length + i and is predicted from the index before.
  idx = out.prompt_lengths[:, None] - 1 + jnp.arange(m)[None, :]
  picked = jnp.take_along_axis(lp, jnp.clip(idx, 0, t - 2), axis=1)
  return picked * out.completion_mask


# --------------------------------------------------------------------------------------------
# Many prompts of different lengths: pad, sample in fixed-shape batches, unpad.
# --------------------------------------------------------------------------------------------

def pad_prompts(prompt_ids: Sequence[Sequence[int]], *, pad_id: int, rows: int | None = None,
                width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists into ([rows, width] int32, lengths [rows] int32). Rows past the lists
  are all pad with length 1, so a short last batch still has the one compiled shape."""
  rows = len(prompt_ids) if rows is None else rows
  width = max(len(p) for p in prompt_ids) if width is None else width
  arr = np.full((rows, width), pad_id, np.int32)
  lengths = np.ones(rows, np.int32)
  for i, p in enumerate(prompt_ids):
    arr[i, :len(p)] = p
    lengths[i] = len(p)
  return arr, lengths


def sample_replies(model, params, prompt_ids: Sequence[Sequence[int]], *, seed: int,
                   max_new_tokens: int, pad_id: int, eos_ids: Sequence[int],
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   batch_size: int = 256, progress: str = "", engine: bool = False
                   ) -> tuple[list[list[int]], np.ndarray]:
  """One completion per prompt. Returns (completion ids, the stop token included; did it end [N]).
  `progress`: the label of a console bar over the batches ("" = none). `engine`: decode each
  batch with the continuous-batching engine (`gptjax/engine.py`: a finished row stops costing,
  which matters for best-of-N, where most rows end long before the longest), wherever
  `engine.supports` the parameters (whole on each process); its draws differ from this module's
  for the same seed, and greedy they are equal.

  Prompts are padded to one width and batches to one size, so the sampler compiles once; batch b
  samples with fold_in(key(seed), b), so a reply does not depend on what else is sampled in the
  same call. With parameters whole on each process, each process samples its share of the
  batches and the results are gathered (`sharding.map_batches`): the replies equal one process's.
  """
  stops = tuple(int(e) for e in eos_ids)
  n = len(prompt_ids)
  width = max(len(p) for p in prompt_ids)
  rows = min(batch_size, n)

  def one_batch(params, b):
    arr, lengths = pad_prompts(prompt_ids[b * rows:(b + 1) * rows], pad_id=pad_id, rows=rows,
                               width=width)
    sample = generate
    if engine:
      from gptjax import engine as engine_lib      # the engine builds on this module
      if engine_lib.supports(params=params):
        sample = functools.partial(engine_lib.generate, slots=rows)
    out = sample(model, params, arr, lengths, rng=jax.random.fold_in(jax.random.key(seed), b),
                 max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, eos_ids=stops, pad_id=pad_id)
    got = tuple(np.asarray(a) for a in jax.device_get((out.completion, out.completion_mask)))
    if bar is not None:
      bar.update(1)
    return got

  from gptjax import metrics as metrics_lib
  bar = metrics_lib.batch_bar(progress, -(-n // rows))
  batches = shd.map_batches(one_batch, -(-n // rows), params)
  if bar is not None:
    bar.close()
  replies, ended = [], []
  for b, (comp, mask) in enumerate(batches):
    for i in range(min(rows, n - b * rows)):
      ids = [int(t) for t in comp[i][mask[i] > 0]]
      replies.append(ids)
      ended.append(bool(ids) and ids[-1] in stops)
  return replies, np.asarray(ended, bool)
