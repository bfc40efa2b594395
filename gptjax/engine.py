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
row's content spans at most P + M slots behind the clock, so the cache holds P + M + chunk slots
and is shifted left (the same offset for every row) when the clock would run off its end; the
mask uses slot order and segment ids only, and positions are baked into the cached keys (RoPE) or
the inputs (learned), so a shift changes nothing a query sees.

Randomness. Request i's token t uses fold_in(fold_in(rng, i), t): the tokens do not depend on
which slot a request lands in, the number of slots, the chunk size, or what else is in the batch.
They differ from `sampling.generate`, whose step key is shared by the batch (one uniform per row of
one [B] draw); with temperature 0 both are greedy and agree.

Log-probs are those of the raw logits at the sampling temperature, before top-k/top-p/min-p, as in
`sampling` (the trainer recomputes the same with a plain forward). Not supported here: the
repetition penalty and stop sequences (`sampling.generate` has them).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptjax import sampling
from gptjax.losses.common import token_logprobs
from gptjax.model import init_cache


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

  @property
  def cache_len(self) -> int:
    return self.prompt_width + self.max_new_tokens + self.chunk


def _draw(keys, logits, c: EngineControls):
  """One token per row [B] from raw logits [B,V] with per-row keys [B]."""
  # The sampler's own logit chain, so both draw from the same distribution.
  logits = sampling.process_logits(logits, temperature=c.temperature, top_k=c.top_k,
                                   top_p=c.top_p, min_p=c.min_p)
  if c.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.vmap(sampling.sample_categorical)(keys, logits)


def _record(rows: dict, logits, rng, eos_ids, c: EngineControls) -> dict:
  """Samples each live row's next completion token from `logits` [B,V] and records it."""
  step = rows["step"]                                                      # [B] tokens so far
  keys = jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(rng, r), t))(
      rows["request"], step)
  token = _draw(keys, logits, c)
  lp = token_logprobs(logits[:, None, :], token[:, None],
                      temperature=c.temperature if c.temperature > 0 else 1.0)[:, 0]
  live = ~rows["done"]
  token = jnp.where(live, token, c.pad_id)
  col = jnp.minimum(step, c.max_new_tokens - 1)
  b = jnp.arange(token.shape[0])
  completion = rows["completion"].at[b, col].set(
      jnp.where(live, token, rows["completion"][b, col]))
  logprobs = rows["logprobs"].at[b, col].set(jnp.where(live, lp, rows["logprobs"][b, col]))
  stop = jnp.any(token[:, None] == eos_ids[None, :], axis=1)
  new_step = step + live.astype(jnp.int32)
  done = rows["done"] | (live & (stop | (new_step >= c.max_new_tokens)))
  return {**rows, "step": new_step, "done": done, "completion": completion, "logprobs": logprobs,
          "last": token}


@functools.partial(jax.jit, static_argnames=("model", "c"), donate_argnames=("cache", "rows"))
def _admit(model, params, cache, rows, slot_idx, prompts, prompt_lengths, requests, clock,
           rng, eos_ids, c: EngineControls):
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
           "last": jnp.zeros((r,), jnp.int32)}
  fresh = _record(fresh, logits, rng, eos_ids, c)
  rows = {k: v.at[slot_idx].set(fresh[k]) for k, v in rows.items()}
  return new_cache, rows


@functools.partial(jax.jit, static_argnames=("model", "c", "steps"),
                   donate_argnames=("cache", "rows"))
def _decode(model, params, cache, rows, clock, rng, eos_ids, c: EngineControls, steps: int):
  """`steps` decode steps over every row: feed each row's last token at slot clock + s."""
  params = nn.meta.unbox(params)
  b = rows["step"].shape[0]

  def body(s, carry):
    cache, rows = carry
    pos = rows["prompt_length"] + rows["step"] - 1
    out = model.apply({"params": params}, rows["last"][:, None], positions=pos[:, None],
                      segment_ids=jnp.ones((b, 1), jnp.int32), cache=cache,
                      cache_index=clock + s)
    return out.cache, _record(rows, out.logits[:, 0], rng, eos_ids, c)

  return jax.lax.fori_loop(0, steps, body, (cache, rows))


@functools.partial(jax.jit, static_argnames=("d",), donate_argnames=("cache",))
def _shift(cache, d: int):
  """Moves every row's slots d to the left; the d slots freed on the right are empty."""
  left = lambda x, axis: jnp.concatenate(
      [jax.lax.slice_in_dim(x, d, x.shape[axis], axis=axis),
       jnp.zeros(x.shape[:axis] + (d,) + x.shape[axis + 1:], x.dtype)], axis=axis)
  return {"k": tuple(left(k, 3) for k in cache["k"]), "v": tuple(left(v, 2) for v in cache["v"]),
          "segment_ids": left(cache["segment_ids"], 1)}


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


@dataclasses.dataclass
class EngineStats:
  decode_steps: int = 0          # decode steps run (each over the current number of slots)
  row_steps: int = 0             # sum over steps of the slots computed (the cost)
  admitted: int = 0
  refills: int = 0               # prompts admitted into a slot freed by a finished request
  compactions: int = 0


def generate(model, params, prompts, prompt_lengths, *, rng, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             eos_ids: Sequence[int] = (), pad_id: int = 0, slots: int = 64, chunk: int = 16,
             stats: EngineStats | None = None) -> sampling.SampleOutput:
  """Samples one completion per prompt (right-padded [N,P] int32) with continuous batching.

  `slots` rows decode at once; `chunk` steps run between host checks (fewer wasted steps on
  finished rows against more host round trips). Returns the same `SampleOutput` as
  `sampling.generate`, rows in the order of `prompts`. `rng`: a key or an int seed.
  """
  prompts = np.asarray(jax.device_get(prompts), np.int32)
  lengths = np.asarray(jax.device_get(prompt_lengths), np.int32)
  n, p = prompts.shape
  if int(pad_id) in [int(e) for e in eos_ids]:
    raise ValueError(f"sampling.pad_id: {pad_id} is also an EOS id; pad must differ from EOS")
  if max_new_tokens <= 0:
    raise ValueError(f"sampling.max_new_tokens: must be positive, got {max_new_tokens}")
  c = EngineControls(max_new_tokens=int(max_new_tokens), prompt_width=p,
                     temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                     min_p=float(min_p), pad_id=int(pad_id), chunk=int(chunk))
  sampling.SamplingControls(max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                            top_k=c.top_k, top_p=c.top_p, min_p=c.min_p).validate()
  sampling._check_shapes(model, prompts, sampling.SamplingControls(max_new_tokens=c.max_new_tokens))
  eos, _ = sampling.stop_arrays(eos_ids, ())
  eos = jnp.asarray(eos)
  rng = sampling._rng(rng)
  stats = stats if stats is not None else EngineStats()
  cfg = model.cfg.resolved()

  width = min(int(slots), n)
  # One extra row at the end is scratch: admissions padded to a bucket write their dummies there.
  cache = init_cache(cfg, width + 1, c.cache_len)
  rows = {"step": jnp.zeros((width + 1,), jnp.int32), "done": jnp.ones((width + 1,), bool),
          "completion": jnp.full((width + 1, c.max_new_tokens), c.pad_id, jnp.int32),
          "logprobs": jnp.zeros((width + 1, c.max_new_tokens), jnp.float32),
          "prompt_length": jnp.ones((width + 1,), jnp.int32),
          "request": jnp.zeros((width + 1,), jnp.int32), "last": jnp.zeros((width + 1,), jnp.int32)}
  owner = [-1] * width                  # request held by each slot (-1: free)
  waiting = list(range(n))
  clock = p
  completion = np.full((n, c.max_new_tokens), c.pad_id, np.int32)
  logprobs = np.zeros((n, c.max_new_tokens), np.float32)
  steps_taken = np.zeros((n,), np.int32)

  def admit(free):
    nonlocal cache, rows
    take = waiting[:len(free)]
    del waiting[:len(take)]
    free = free[:len(take)]
    r = _bucket(len(take), width)
    scratch = len(owner)
    idx = np.full((r,), scratch, np.int32)
    idx[:len(take)] = free
    req = np.zeros((r,), np.int32)
    req[:len(take)] = take
    cache, rows = _admit(model, params, cache, rows, jnp.asarray(idx),
                         jnp.asarray(prompts[req]), jnp.asarray(lengths[req]), jnp.asarray(req),
                         clock, rng, eos, c)
    for s, q in zip(free, take):
      owner[s] = q
    stats.admitted += len(take)
    return len(take)

  admit(list(range(width)))
  while True:
    done, step = jax.device_get((rows["done"], rows["step"]))
    finished = [s for s, q in enumerate(owner) if q >= 0 and done[s]]
    if finished:
      comp, lps = jax.device_get((rows["completion"], rows["logprobs"]))
      for s in finished:
        q = owner[s]
        completion[q], logprobs[q], steps_taken[q] = comp[s], lps[s], step[s]
        owner[s] = -1
    live = [s for s, q in enumerate(owner) if q >= 0]
    if not live and not waiting:
      break
    if clock + c.chunk > c.cache_len:
      d = clock + c.chunk - c.cache_len
      cache = _shift(cache, d)
      clock -= d
    free = [s for s, q in enumerate(owner) if q < 0]
    if waiting and free:
      stats.refills += admit(free)
    elif not waiting and _bucket(len(live), width) < len(owner):
      # Nothing left to admit: move the live rows into fewer slots (power-of-two sizes, so only a
      # few shapes are ever compiled).
      width = _bucket(len(live), width)
      keep = live + [len(owner)]                   # the scratch row stays last
      cache, rows = _gather(cache, rows, jnp.asarray(keep, jnp.int32))
      owner = [owner[s] for s in live]
      stats.compactions += 1
    cache, rows = _decode(model, params, cache, rows, clock, rng, eos, c, c.chunk)
    clock += c.chunk
    stats.decode_steps += c.chunk
    stats.row_steps += c.chunk * len(owner)

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
