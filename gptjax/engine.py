"""Continuous-batching generation: a fixed number of decode slots, refilled as sequences finish.

    out = engine.generate(model, params, prompts, prompt_lengths, rng=key, max_new_tokens=256,
                          temperature=1.0, eos_ids=(tok.eos_id,), pad_id=tok.pad_id, slots=64)
    out: a `sampling.SampleOutput` in the order of `prompts` (tokens, completion, logprobs, ...)

`sampling.generate` decodes a static batch until its longest row stops, so an RL batch keeps paying
for rows that emitted EOS long ago. Here the host drives jitted chunks of `chunk` decode steps over
`slots` rows. Between chunks, finished rows hand their completion back and are refilled with
waiting prompts; when none are waiting, the live rows are compacted into the smallest power-of-two
number of slots that holds them. The cost then follows the tokens generated, not
rows × longest.

Cache layout. Every row writes its next token at the same slot `g` (the clock), at its own
position. A prompt admitted at clock g is written right-aligned into slots [g - P, g) of its row,
pad first (segment 0, masked) and its real tokens last; its completion follows at g, g + 1, ...
Admitting clears the row's old segment ids, so nothing of the previous request stays visible. A
row's content spans at most P + M slots behind the clock, so the cache holds at most P + M + chunk
slots and is shifted left (the same offset for every row) when the clock would run off its end;
the mask uses slot order and segment ids only, and positions are baked into the cached keys (RoPE)
or the inputs (learned), so a shift changes nothing a query sees. Every decode step reads every
slot, and on CPU that read is a large part of a step (at 64 rows of a 4 x 256 model, 18 ms a step
over 304 slots against 11 ms over 144), so the cache starts short and grows, as the static
sampler's does (`sampling.decode_phases`): it holds P + b + chunk slots for the first phase bound
b the clock has not passed, padded with empty (masked) slots when the clock gets there.

Randomness. Request i's token t uses fold_in(fold_in(rng, i), t): the tokens do not depend on
which slot a request lands in, the number of slots, the chunk size, or what else is in the batch.
They differ from `sampling.generate`, whose step key is shared by the batch (one uniform per row of
one [B] draw); with temperature 0 both are greedy and agree.

Log-probs are those of the raw logits at the sampling temperature, before top-k/top-p/min-p, as in
`sampling` (the trainer recomputes the same with a plain forward). A constraint
(`constraints.py`) is followed per row: each row's automaton state starts at admission and
travels with the row through refills and compaction. Not supported here: the
repetition penalty and stop sequences (`sampling.generate` has them); `supports` says when a
caller must fall back to it.

Tools (`tools=ToolLoop(...)`, e.g. `gptjax.tools.calculator_loop(tok)`). A row that samples one of
the loop's trigger ids pauses, and the chunk ends after that step (every row has then taken the
same number of steps, so the clock and the cache layout stay as above). On the host, `respond`
reads the row's completion and returns the tokens to append (a tool's result), or None (no call:
the trigger is an ordinary token, and ends the row if it is an EOS id). The appended tokens are
then fed through the following decode steps in place of sampled ones, in lockstep with the other
rows: they enter the same KV cache one slot each, exactly as if the model had written them, and
nothing is prefilled again. Their log-probs are recorded like any token's (`stats.tool_spans` says
where they are, e.g. to leave them out of a policy loss). A chunk that ends early costs one host
round trip; rows that did not call lose nothing. Without `tools` the programs are the ones above.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptjax import sampling
from gptjax import sharding as shd
from gptjax.losses.common import token_logprobs
from gptjax.model import grow_cache, init_cache


@dataclasses.dataclass(frozen=True)
class EngineControls:
  """Static settings of the compiled programs (hashable: a jit static argument)."""
  max_new_tokens: int
  prompt_width: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  pad_id: int = 0
  chunk: int = 16
  tool_tokens: int = 0          # the longest tool result, in tokens; 0 = no tools

  @property
  def cache_len(self) -> int:
    return self.prompt_width + self.max_new_tokens + self.chunk


def _draw(keys, logits, c: EngineControls, allowed=None):
  """One token per row [B] from raw logits [B,V] with per-row keys [B]; `allowed` [B,V] masks
  it to a constraint's tokens."""
  # The sampler's own logit chain, so both draw from the same distribution.
  logits = sampling.process_logits(logits, temperature=c.temperature, top_k=c.top_k,
                                   top_p=c.top_p, min_p=c.min_p, allowed=allowed)
  if c.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.vmap(sampling.sample_categorical)(keys, logits)


def _record(rows: dict, logits, rng, eos_ids, c: EngineControls, trigger_ids=None,
            automaton=None) -> dict:
  """Samples each live row's next completion token from `logits` [B,V] and records it. With
  tools, a row with tool tokens waiting records the next of those instead, and a row that
  samples a trigger id pauses (see the module docstring). With an `automaton`, rows carry
  their state in rows["fsm"] and draw among the tokens it allows with the row's own tokens
  left (`constraints.py`)."""
  step = rows["step"]                                                      # [B] tokens so far
  keys = jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(rng, r), t))(
      rows["request"], step)
  allowed = None
  if automaton is not None:
    allowed = automaton.allowed(rows["fsm"], c.max_new_tokens - step)
  token = _draw(keys, logits, c, allowed)
  b = jnp.arange(token.shape[0])
  extra = {}
  if c.tool_tokens:
    forcing = rows["forced_i"] < rows["forced_n"]
    waiting = rows["forced"][b, jnp.minimum(rows["forced_i"], c.tool_tokens - 1)]
    token = jnp.where(forcing, waiting, token)
  lp = token_logprobs(logits[:, None, :], token[:, None],
                      temperature=c.temperature if c.temperature > 0 else 1.0)[:, 0]
  live = ~rows["done"]
  token = jnp.where(live, token, c.pad_id)
  col = jnp.minimum(step, c.max_new_tokens - 1)
  completion = rows["completion"].at[b, col].set(
      jnp.where(live, token, rows["completion"][b, col]))
  logprobs = rows["logprobs"].at[b, col].set(jnp.where(live, lp, rows["logprobs"][b, col]))
  stop = jnp.any(token[:, None] == eos_ids[None, :], axis=1)
  new_step = step + live.astype(jnp.int32)
  if c.tool_tokens:
    # An appended tool token never stops or pauses its row, even when it is a trigger or EOS id
    # (a result turn closes with the template's end-of-turn marker).
    stop &= ~forcing
    trigger = jnp.any(token[:, None] == trigger_ids[None, :], axis=1) & ~forcing
    extra = {"forced_i": rows["forced_i"] + (live & forcing).astype(jnp.int32),
             "paused": live & trigger & (new_step < c.max_new_tokens)}
    stop &= ~extra["paused"]
  done = rows["done"] | (live & (stop | (new_step >= c.max_new_tokens)))
  if automaton is not None:
    extra["fsm"] = jnp.where(live, automaton.advance(rows["fsm"], token), rows["fsm"])
  return {**rows, "step": new_step, "done": done, "completion": completion, "logprobs": logprobs,
          "last": token, **extra}


@functools.partial(jax.jit, static_argnames=("model", "c"), donate_argnames=("cache", "rows"))
def _admit(model, params, cache, rows, slot_idx, prompts, prompt_lengths, requests, clock,
           rng, eos_ids, trigger_ids, c: EngineControls, automaton=None):
  """Writes prompts [R,P] (right-padded) into rows `slot_idx` [R] of the cache at slots
  [clock - P, clock), resets those rows' records and samples their first token. Entries of
  slot_idx may repeat the scratch row (the last one), which is never live."""
  params = nn.meta.unbox(params)
  cfg = model.cfg.resolved()
  r, p = prompts.shape
  lengths = prompt_lengths.astype(jnp.int32)
  # Right-align each prompt so its last real token sits at slot clock - 1.
  shift = p - lengths                                                     # [R]
  j = jnp.arange(p)[None, :]
  src = jnp.clip(j - shift[:, None], 0, p - 1)
  real = j >= shift[:, None]
  aligned = jnp.where(real, jnp.take_along_axis(prompts, src, axis=1), c.pad_id)
  positions = jnp.where(real, j - shift[:, None], 0).astype(jnp.int32)
  sub = {"k": tuple(k[slot_idx] for k in cache["k"]), "v": tuple(v[slot_idx] for v in cache["v"]),
         "segment_ids": jnp.zeros_like(cache["segment_ids"][slot_idx])}
  out = model.apply({"params": params}, aligned, positions=positions,
                    segment_ids=real.astype(jnp.int32), cache=sub, cache_index=clock - p,
                    compute_logits=False)
  hidden = out.hidden[:, -1:]                                             # the last real token
  logits = sampling._head_logits(cfg, params, hidden)[:, 0]
  new_cache = {"k": tuple(k.at[slot_idx].set(nk) for k, nk in zip(cache["k"], out.cache["k"])),
               "v": tuple(v.at[slot_idx].set(nv) for v, nv in zip(cache["v"], out.cache["v"])),
               "segment_ids": cache["segment_ids"].at[slot_idx].set(out.cache["segment_ids"])}
  fresh = {"step": jnp.zeros((r,), jnp.int32), "done": jnp.zeros((r,), bool),
           "completion": jnp.full((r, c.max_new_tokens), c.pad_id, jnp.int32),
           "logprobs": jnp.zeros((r, c.max_new_tokens), jnp.float32),
           "prompt_length": lengths, "request": requests.astype(jnp.int32),
           "last": jnp.zeros((r,), jnp.int32), **_tool_rows(r, c)}
  if automaton is not None:
    fresh["fsm"] = jnp.zeros((r,), jnp.int32)                             # the start state
  fresh = _record(fresh, logits, rng, eos_ids, c, trigger_ids, automaton)
  rows = {k: v.at[slot_idx].set(fresh[k]) for k, v in rows.items()}
  return new_cache, rows


def _tool_rows(b: int, c: EngineControls) -> dict:
  """The per-row tool state: tokens waiting to be appended [B,F], how many [B], how many of
  them are already recorded [B], and whether the row waits for the host [B]."""
  if not c.tool_tokens:
    return {}
  return {"forced": jnp.full((b, c.tool_tokens), c.pad_id, jnp.int32),
          "forced_n": jnp.zeros((b,), jnp.int32), "forced_i": jnp.zeros((b,), jnp.int32),
          "paused": jnp.zeros((b,), bool)}


@functools.partial(jax.jit, static_argnames=("model", "c", "steps"),
                   donate_argnames=("cache", "rows"))
def _decode(model, params, cache, rows, clock, rng, eos_ids, trigger_ids, c: EngineControls,
            steps: int, automaton=None):
  """Up to `steps` decode steps over every row: feed each row's last token at slot clock + s.
  Returns (cache, rows, steps taken): with tools the loop stops after a step in which a row
  paused at a trigger, so the host can answer it before any row goes further."""
  params = nn.meta.unbox(params)
  b = rows["step"].shape[0]

  def body(s, carry):
    cache, rows = carry
    pos = rows["prompt_length"] + rows["step"] - 1
    out = model.apply({"params": params}, rows["last"][:, None], positions=pos[:, None],
                      segment_ids=jnp.ones((b, 1), jnp.int32), cache=cache,
                      cache_index=clock + s)
    return out.cache, _record(rows, out.logits[:, 0], rng, eos_ids, c, trigger_ids, automaton)

  if not c.tool_tokens:
    cache, rows = jax.lax.fori_loop(0, steps, body, (cache, rows))
    return cache, rows, jnp.int32(steps)
  s, cache, rows = jax.lax.while_loop(
      lambda x: (x[0] < steps) & ~jnp.any(x[2]["paused"]),
      lambda x: (x[0] + 1, *body(x[0], (x[1], x[2]))), (jnp.int32(0), cache, rows))
  return cache, rows, s


@functools.partial(jax.jit, donate_argnames=("rows",))
def _answer(rows, answered, forced, forced_n, end):
  """The host's answers to paused rows [B]: tokens to append ([B,F], count [B]), or the end of
  the row. Rows not `answered` are left as they are."""
  keep = lambda new, old: jnp.where(answered.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
  return {**rows, "forced": keep(forced, rows["forced"]),
          "forced_n": keep(forced_n, rows["forced_n"]),
          "forced_i": keep(jnp.zeros_like(rows["forced_i"]), rows["forced_i"]),
          "paused": rows["paused"] & ~answered, "done": rows["done"] | (answered & end)}


@functools.partial(jax.jit, static_argnames=("d",), donate_argnames=("cache",))
def _shift(cache, d: int):
  """Moves every row's slots d to the left; the d slots freed on the right are empty."""
  left = lambda x, axis: jnp.concatenate(
      [jax.lax.slice_in_dim(x, d, x.shape[axis], axis=axis),
       jnp.zeros(x.shape[:axis] + (d,) + x.shape[axis + 1:], x.dtype)], axis=axis)
  return {"k": tuple(left(k, 3) for k in cache["k"]), "v": tuple(left(v, 2) for v in cache["v"]),
          "segment_ids": left(cache["segment_ids"], 1)}


# The padded cache is a new buffer, so the old one is not donated.
_grow = jax.jit(grow_cache, static_argnames=("length",))


def cache_ladder(c: EngineControls) -> tuple[int, ...]:
  """The cache lengths a run grows through: P + b + chunk for each of `sampling.decode_phases`'
  step bounds b, the last being `c.cache_len`. A decode of `chunk` steps from clock g needs
  g + chunk slots."""
  return tuple(c.prompt_width + b + c.chunk for b in sampling.decode_phases(c.max_new_tokens))


@jax.jit
def _gather(cache, rows, idx):
  return ({"k": tuple(k[idx] for k in cache["k"]), "v": tuple(v[idx] for v in cache["v"]),
           "segment_ids": cache["segment_ids"][idx]},
          {k: v[idx] for k, v in rows.items()})


def _bucket(n: int, cap: int) -> int:
  size = 1
  while size < n:
    size *= 2
  return min(size, cap)


@dataclasses.dataclass(frozen=True)
class ToolLoop:
  """Tools run by the host between decode steps (see the module docstring).

  trigger_ids   tokens at which a row pauses for `respond`
  respond       respond(completion ids so far, the trigger last) -> the ids to append, or None
                when this is no call (the trigger is then an ordinary token; an EOS id ends the
                row). Called on the host, once per pause.
  max_tokens    the most ids one answer may hold (the size of a compiled buffer)
  max_calls     answers per row; at later triggers `respond` is not asked
  """
  trigger_ids: tuple
  respond: Callable[[list], Sequence[int] | None]
  max_tokens: int = 48
  max_calls: int = 8


@dataclasses.dataclass
class EngineStats:
  decode_steps: int = 0          # decode steps run (each over the current number of slots)
  row_steps: int = 0             # sum over steps of the slots computed (the cost)
  admitted: int = 0
  refills: int = 0               # prompts admitted into a slot freed by a finished request
  compactions: int = 0
  slot_counts: set = dataclasses.field(default_factory=set)   # the decode batch sizes run
  cache_lengths: set = dataclasses.field(default_factory=set)  # the cache slots decoded over
  slot_reads: int = 0            # sum over steps of slots x cache length (what attention reads)
  shifts: int = 0                # times the full-length cache was shifted left
  tool_calls: int = 0            # answers appended by a ToolLoop
  tool_pauses: int = 0           # pauses at a trigger, answered or not
  # request -> [(start, end)) completion indices of the tokens a tool appended
  tool_spans: dict = dataclasses.field(default_factory=dict)


def supports(*, repetition_penalty: float = 1.0, stop_sequences: Sequence = (),
             params=None) -> bool:
  """Whether the engine can decode with these controls and these parameters. Callers decode with
  `sampling` when it cannot, and their docs say when that is: the engine has no repetition
  penalty and no stop sequences, and its host-driven loop needs `params` whole on this process
  (`sharding.is_process_local`: always on one process; on several, when they are replicated),
  since it reads each row's state back between chunks."""
  return (float(repetition_penalty) == 1.0 and not any(len(s) for s in stop_sequences)
          and (params is None or shd.is_process_local(params)))


def generate(model, params, prompts, prompt_lengths, *, rng, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             eos_ids: Sequence[int] = (), pad_id: int = 0, slots: int = 64, chunk: int = 16,
             tools: ToolLoop | None = None, stats: EngineStats | None = None, constraint=None,
             first_request: int = 0, grow_cache: bool = True) -> sampling.SampleOutput:
  """Samples one completion per prompt (right-padded [N,P] int32) with continuous batching.

  `slots` rows decode at once; `chunk` steps run between host checks (fewer wasted steps on
  finished rows against more host round trips). `tools`: a `ToolLoop` answered between decode
  steps. Returns the same `SampleOutput` as `sampling.generate`, rows in the order of `prompts`.
  `rng`: a key or an int seed. `constraint`: as in `sampling.generate`; each row follows the
  automaton from its admission. `first_request`: row i draws as request first_request + i, so
  a batch split into parts (e.g. one per process) draws what it draws in one call.
  `grow_cache`: grow the KV cache with the clock (`cache_ladder`); it saves reads on every later
  batch of the same shapes, but compiles a decode program per length, so a one-off call (one
  batch in a process, e.g. `gptjax sample`) is faster with False: one full-length cache. The
  tokens are the same either way.
  """
  prompts = np.asarray(jax.device_get(prompts), np.int32)
  lengths = np.asarray(jax.device_get(prompt_lengths), np.int32)
  n, p = prompts.shape
  run = _Run(model, params, prompts, lengths, rng=rng, max_new_tokens=max_new_tokens,
             temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, eos_ids=eos_ids,
             pad_id=pad_id, slots=slots, chunk=chunk, tools=tools, stats=stats,
             constraint=constraint, first_request=first_request, grow_cache=grow_cache)
  for _ in run.chunks():
    pass
  c = run.c
  completion, logprobs, steps_taken = run.completion, run.logprobs, run.steps_taken
  completion_mask = (np.arange(c.max_new_tokens)[None, :] < steps_taken[:, None]).astype(
      np.float32)
  completion = np.where(completion_mask > 0, completion, c.pad_id)
  logprobs = logprobs * completion_mask
  total = lengths + steps_taken
  j = np.arange(p + c.max_new_tokens)[None, :]
  into = j - lengths[:, None]
  from_comp = np.take_along_axis(completion, np.clip(into, 0, c.max_new_tokens - 1), axis=1)
  padded = np.concatenate([prompts, np.full((n, c.max_new_tokens), c.pad_id, np.int32)], axis=1)
  tokens = np.where(into < 0, padded, np.where(into < steps_taken[:, None], from_comp, c.pad_id))
  return sampling.SampleOutput(
      tokens=jnp.asarray(tokens, jnp.int32), completion=jnp.asarray(completion),
      logprobs=jnp.asarray(logprobs), completion_mask=jnp.asarray(completion_mask),
      lengths=jnp.asarray(steps_taken), prompt_lengths=jnp.asarray(lengths),
      total_lengths=jnp.asarray(total))


def stream(model, params, prompt_ids: Sequence[int], *, rng, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
           eos_ids: Sequence[int] = (), pad_id: int = 0, chunk: int = 1, bucket: int = 32,
           tools: ToolLoop | None = None, stats: EngineStats | None = None, constraint=None):
  """Yields one prompt's completion ids as they are produced (`chunk` decode steps at a time),
  tool results included, the stop token last: the engine's loop for a chat. The prompt is padded
  up to a multiple of `bucket` (within a learned-position model's window), so a conversation that
  grows turn by turn reuses a few compiled programs."""
  n = len(prompt_ids)
  width = max(n, -(-n // bucket) * bucket)
  cfg = model.cfg.resolved()
  if cfg.positional == "learned":
    width = max(n, min(width, cfg.max_len - max_new_tokens))
  prompts = np.full((1, width), pad_id, np.int32)
  prompts[0, :n] = prompt_ids
  run = _Run(model, params, prompts, np.asarray([n], np.int32), rng=rng,
             max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
             min_p=min_p, eos_ids=eos_ids, pad_id=pad_id, slots=1, chunk=chunk, tools=tools,
             # One row, and a turn's prompt width is often new: a growing cache would compile a
             # program per length for one use (a chat turn took 4x as long, measured).
             stats=stats, constraint=constraint, grow_cache=False)
  shown = 0
  for comp, step in run.chunks():
    upto = int(step[0]) if comp is not None else int(run.steps_taken[0])
    row = comp[0] if comp is not None else run.completion[0]
    for t in row[shown:upto]:
      yield int(t)
    shown = upto


class _Run:
  """One engine generation, driven chunk by chunk from the host (`chunks`)."""

  def __init__(self, model, params, prompts, lengths, *, rng, max_new_tokens, temperature,
               top_k, top_p, min_p, eos_ids, pad_id, slots, chunk, tools, stats,
               constraint=None, first_request: int = 0, grow_cache: bool = True):
    n, p = prompts.shape
    if int(pad_id) in [int(e) for e in eos_ids]:
      raise ValueError(f"sampling.pad_id: {pad_id} is also an EOS id; pad must differ from EOS")
    if max_new_tokens <= 0:
      raise ValueError(f"sampling.max_new_tokens: must be positive, got {max_new_tokens}")
    if tools is not None and (tools.max_tokens <= 0 or not tools.trigger_ids):
      raise ValueError("engine.tools: a ToolLoop needs trigger ids and max_tokens > 0")
    c = EngineControls(max_new_tokens=int(max_new_tokens), prompt_width=p,
                       temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                       min_p=float(min_p), pad_id=int(pad_id),
                       # A row needs at most max_new_tokens - 1 decode steps after admission, so
                       # a longer chunk would only run finished rows.
                       chunk=max(1, min(int(chunk), int(max_new_tokens) - 1)),
                       tool_tokens=int(tools.max_tokens) if tools is not None else 0)
    sampling.SamplingControls(max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                              top_k=c.top_k, top_p=c.top_p, min_p=c.min_p).validate()
    sampling._check_shapes(model, prompts,
                           sampling.SamplingControls(max_new_tokens=c.max_new_tokens))
    self.automaton = sampling._automaton(constraint, sampling.SamplingControls(
        max_new_tokens=c.max_new_tokens), model.cfg.resolved().vocab_size)
    eos, _ = sampling.stop_arrays(eos_ids, ())
    trig, _ = sampling.stop_arrays(tools.trigger_ids if tools is not None else (), ())
    if not shd.is_process_local(params):
      raise ValueError("engine: the parameters are split across processes; the engine decodes "
                       "on one process at a time (engine.supports(params=...) says so first)")
    # Replicated over several processes: this process's copy, so every program stays local.
    params = shd.process_local(params)
    self.model, self.params, self.prompts, self.lengths = model, params, prompts, lengths
    self.first_request = int(first_request)
    self.grow_cache = bool(grow_cache)
    self.c, self.tools = c, tools
    self.eos_list = [int(e) for e in eos_ids]
    self.eos, self.trig = jnp.asarray(eos), jnp.asarray(trig)
    self.rng = sampling._rng(rng)
    self.stats = stats if stats is not None else EngineStats()
    self.width = min(int(slots), n)
    self.completion = np.full((n, c.max_new_tokens), c.pad_id, np.int32)
    self.logprobs = np.zeros((n, c.max_new_tokens), np.float32)
    self.steps_taken = np.zeros((n,), np.int32)
    self.calls = np.zeros((n,), np.int32)

  def _admit(self, cache, rows, owner, waiting, free, clock):
    take = waiting[:len(free)]
    del waiting[:len(take)]
    free = free[:len(take)]
    r = _bucket(len(take), self.width)
    scratch = len(owner)
    idx = np.full((r,), scratch, np.int32)
    idx[:len(take)] = free
    req = np.zeros((r,), np.int32)
    req[:len(take)] = take
    cache, rows = _admit(self.model, self.params, cache, rows, jnp.asarray(idx),
                         jnp.asarray(self.prompts[req]), jnp.asarray(self.lengths[req]),
                         jnp.asarray(req + self.first_request), clock, self.rng, self.eos,
                         self.trig, self.c, self.automaton)
    for s, q in zip(free, take):
      owner[s] = q
    self.stats.admitted += len(take)
    return cache, rows, len(take)

  def _answer_pauses(self, rows, owner, paused, comp, step):
    """Asks `respond` for each paused row; returns the rows with the answers recorded."""
    t, c = self.tools, self.c
    b = len(paused)
    answered = np.zeros((b,), bool)
    end = np.zeros((b,), bool)
    forced = np.full((b, c.tool_tokens), c.pad_id, np.int32)
    forced_n = np.zeros((b,), np.int32)
    for s in np.flatnonzero(paused):
      q = owner[s] if s < len(owner) else -1
      answered[s] = True
      if q < 0:
        end[s] = True             # the scratch row (admission padding): never read, so stop it
        continue
      self.stats.tool_pauses += 1
      ids = [int(x) for x in comp[s, :step[s]]]
      reply = t.respond(ids) if self.calls[q] < t.max_calls else None
      if reply is None:
        end[s] = ids[-1] in self.eos_list
        continue
      reply = [int(x) for x in reply]
      if len(reply) > c.tool_tokens:
        raise ValueError(f"engine.tools: respond gave {len(reply)} tokens; the ToolLoop allows "
                         f"max_tokens={c.tool_tokens}")
      forced[s, :len(reply)] = reply
      forced_n[s] = len(reply)
      self.calls[q] += 1
      self.stats.tool_calls += 1
      start = int(step[s])
      span = (start, min(start + len(reply), c.max_new_tokens))
      self.stats.tool_spans.setdefault(q, []).append(span)
    return _answer(rows, jnp.asarray(answered), jnp.asarray(forced), jnp.asarray(forced_n),
                   jnp.asarray(end))

  def chunks(self):
    """Runs the generation; yields (completion [B,M], steps [B]) of the slots after each host
    check (None, None once every request is finished). Results land in self.completion etc."""
    c, stats, cfg = self.c, self.stats, self.model.cfg.resolved()
    n = len(self.lengths)
    width = self.width
    # One extra row at the end is scratch: admissions padded to a bucket write their dummies
    # there.
    ladder = cache_ladder(c) if self.grow_cache else (c.cache_len,)
    length = ladder[0]
    cache = init_cache(cfg, width + 1, length)
    rows = {"step": jnp.zeros((width + 1,), jnp.int32), "done": jnp.ones((width + 1,), bool),
            "completion": jnp.full((width + 1, c.max_new_tokens), c.pad_id, jnp.int32),
            "logprobs": jnp.zeros((width + 1, c.max_new_tokens), jnp.float32),
            "prompt_length": jnp.ones((width + 1,), jnp.int32),
            "request": jnp.zeros((width + 1,), jnp.int32),
            "last": jnp.zeros((width + 1,), jnp.int32), **_tool_rows(width + 1, c)}
    if self.automaton is not None:
      rows["fsm"] = jnp.zeros((width + 1,), jnp.int32)
    owner = [-1] * width                  # request held by each slot (-1: free)
    waiting = list(range(n))
    clock = c.prompt_width
    cache, rows, _ = self._admit(cache, rows, owner, waiting, list(range(width)), clock)
    while True:
      if self.tools is not None:
        paused, = jax.device_get((rows["paused"],))
        if paused.any():
          comp, step = jax.device_get((rows["completion"], rows["step"]))
          rows = self._answer_pauses(rows, owner, np.asarray(paused), np.asarray(comp),
                                     np.asarray(step))
      done, step = jax.device_get((rows["done"], rows["step"]))
      finished = [s for s, q in enumerate(owner) if q >= 0 and done[s]]
      comp = None
      if finished or self.tools is not None or width == 1:
        comp, lps = jax.device_get((rows["completion"], rows["logprobs"]))
      for s in finished:
        q = owner[s]
        self.completion[q], self.logprobs[q], self.steps_taken[q] = comp[s], lps[s], step[s]
        owner[s] = -1
      live = [s for s, q in enumerate(owner) if q >= 0]
      if not live and not waiting:
        yield None, None
        break
      yield comp, step
      if clock + c.chunk > length and length < c.cache_len:
        length = next((n for n in ladder if n >= clock + c.chunk), c.cache_len)
        cache = _grow(cache, length)
      if clock + c.chunk > length:
        d = clock + c.chunk - length
        cache = _shift(cache, d)
        stats.shifts += 1
        clock -= d
      free = [s for s, q in enumerate(owner) if q < 0]
      if waiting and free:
        cache, rows, k = self._admit(cache, rows, owner, waiting, free, clock)
        stats.refills += k
        if self.tools is not None:
          continue              # a new row may pause at its first token: answer it first
      elif not waiting and _bucket(len(live), width) < len(owner):
        # Nothing left to admit: move the live rows into fewer slots (power-of-two sizes, so
        # only a few shapes are ever compiled).
        width = _bucket(len(live), width)
        # The live rows, then free (finished, so done) slots up to the bucket's size: the
        # compacted state always has a power-of-two slot count, so each size compiles once (a
        # state of len(live) slots compiled anew for nearly every count reached).
        spare = [s for s, q in enumerate(owner) if q < 0][:width - len(live)]
        keep = live + spare + [len(owner)]           # the scratch row stays last
        cache, rows = _gather(cache, rows, jnp.asarray(keep, jnp.int32))
        owner = [owner[s] for s in live] + [-1] * len(spare)
        stats.compactions += 1
      cache, rows, taken = _decode(self.model, self.params, cache, rows, clock, self.rng,
                                   self.eos, self.trig, c, c.chunk, self.automaton)
      taken = int(taken) if self.tools is not None else c.chunk
      clock += taken
      stats.decode_steps += taken
      stats.row_steps += taken * len(owner)
      stats.slot_counts.add(len(owner))
      stats.cache_lengths.add(length)
      stats.slot_reads += taken * len(owner) * length
