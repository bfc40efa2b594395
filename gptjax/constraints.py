"""Constrained decoding: a regular expression or a JSON schema as a token automaton.

    c = constraints.compile(tok, regex=r"#### -?[0-9]+", vocab_size=model.cfg.vocab_size,
                            stop_ids=(tok.eos_id,))
    out = sampling.generate(model, params, prompts, lengths, rng=0, max_new_tokens=32,
                            eos_ids=(tok.eos_id,), pad_id=tok.pad_id, constraint=c.automaton)
    c.text(completion_ids)          # the text the pattern matched (fullmatch)

A pattern is compiled once on the host into a dense next-state table over (automaton state,
token): `next_state[state, token]` is the state after emitting the token, -1 where the token is
forbidden. The table lives on the device, and the decode loop carries one automaton state per row:
each step masks the logits to the row's allowed tokens, samples, and moves the state along the
table. Nothing leaves the compiled loop.

Where the DFA comes from. `outlines-core` (Rust; the engine behind Outlines) compiles the regular
expression into a byte-level DFA and walks every token's bytes through it, which gives the
(state, token) transitions directly; `build_regex_from_schema` turns a JSON schema into such a
regular expression first. It takes any vocabulary given as token -> bytes, so each tokenizer
says what bytes its tokens spell (`tok.token_bytes()`: characters, SentencePiece pieces with
`▁` as a space and `<0xNN>` byte pieces, byte-level BPE through the GPT-2 byte alphabet), and
tokens that end half-way through a UTF-8 character work as well as whole ones. Special tokens
spell nothing and are never allowed, except the stop tokens below; nor are tokens that spell a
NUL byte (see `_END`).

Stopping. A stop token (EOS, `<|end|>`) is allowed only in an accepting state. The table also
knows, per state, the fewest tokens that reach an accepting state (`distance`); a token is allowed
only when its next state can still be completed within the tokens left, so a sample always ends
inside the language (by a stop token, or by running out of tokens in an accepting state) however
the model wanders. A pattern that needs more tokens than `max_new_tokens` is refused up front.

Log-probs recorded by the sampler stay those of the raw logits (as with top-k and top-p): the mask
decides which token is drawn, not how the trainer scores it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

UNREACHABLE = np.iinfo(np.int32).max // 2     # the distance of a state with no way to accept
MAX_TABLE_BYTES = 1 << 30


class ConstraintError(ValueError):
  """A pattern or schema that cannot be compiled: one line saying which and why."""


@struct.dataclass
class Automaton:
  """The device side of a constraint; a pytree, so it is an ordinary argument of jitted code.
  State 0 is the start."""
  next_state: jax.Array        # [num_states, V] int32, -1 = the token is forbidden there
  distance: jax.Array          # [num_states] int32: fewest tokens to an accepting state

  def allowed(self, state, remaining):
    """[B,V] bool: the tokens each row may emit in `state` [B] with `remaining` tokens left
    (this one included; [B] or a scalar)."""
    nxt = self.next_state[state]                                          # [B,V]
    dist = self.distance[jnp.maximum(nxt, 0)]
    left = jnp.broadcast_to(jnp.asarray(remaining, jnp.int32), state.shape)[:, None]
    return (nxt >= 0) & (dist <= left - 1)

  def advance(self, state, token):
    """The states [B] after each row emits `token` [B] (a forbidden token keeps the state)."""
    nxt = self.next_state[state, token]
    return jnp.where(nxt >= 0, nxt, state)

  def accepting(self, state):
    return self.distance[state] == 0


@dataclasses.dataclass(frozen=True, eq=False)
class Constraint:
  """A compiled pattern: the automaton (numpy, moved to the device when used) and how to read
  a completion back as the text the pattern matched."""
  pattern: str                       # the regular expression (a schema's, for JSON schemas)
  automaton: Automaton
  vocabulary: tuple                  # bytes each token spells (None: special, never allowed)

  @property
  def min_tokens(self) -> int:
    """The fewest tokens of any complete match."""
    return int(self.automaton.distance[0])

  @property
  def num_states(self) -> int:
    return int(self.automaton.next_state.shape[0])

  def text(self, ids: Sequence[int]) -> str:
    """The text a completion spells, stop tokens and specials left out: what the pattern saw
    (`tok.decode` can differ by a leading space, e.g. SentencePiece's dummy prefix)."""
    data = b"".join(self.vocabulary[int(i)] or b"" for i in ids if int(i) < len(self.vocabulary))
    return data.decode("utf-8", errors="replace")



# --------------------------------------------------------------------------------------------
# Patterns.
# --------------------------------------------------------------------------------------------

def regex_from_schema(schema) -> str:
  """A JSON schema (a dict, or its JSON text) as a regular expression over compact JSON text
  (outlines-core's `build_regex_from_schema`: types, properties and required fields, enums and
  consts, string lengths and formats, arrays, anyOf/oneOf/allOf, local $refs)."""
  from outlines_core.json_schema import build_regex_from_schema
  if isinstance(schema, str):
    try:
      schema = json.loads(schema)
    except json.JSONDecodeError as e:
      raise ConstraintError(f"JSON schema: not valid JSON ({e.msg} at line {e.lineno} column "
                            f"{e.colno})") from None
  if not isinstance(schema, dict):
    raise ConstraintError(f"JSON schema: expected a JSON object, got {type(schema).__name__}")
  try:
    return build_regex_from_schema(json.dumps(schema))
  except (ValueError, TypeError) as e:
    raise ConstraintError(f"JSON schema: {e}") from None


def check_regex(regex: str) -> None:
  """Python's parser first: its messages say where the pattern is wrong. The automaton's engine
  (Rust regex syntax, no lookaround or backreferences) is checked when it compiles."""
  try:
    re.compile(regex)
  except re.error as e:
    raise ConstraintError(f"regex {regex!r}: {e}") from None
  if not regex:
    raise ConstraintError("regex: empty pattern (it would only allow stopping at once)")


# --------------------------------------------------------------------------------------------
# Compiling.
# --------------------------------------------------------------------------------------------

# outlines-core keeps a transition only when the state it reaches is not a match state of its
# DFA, or is a full match. regex-automata reports a match one byte late, so a token that continues
# a complete match into a state that is not one ("ab" + "a" under `(ab)+`, "abc" + " " under
# `[a-z]+( [a-z]+)*`) lands in a match state that is not a full match, and outlines-core drops
# that transition (found by test_constraints' brute force against Python's `re`). Compiling
# `(?:pattern)\x00` instead puts the only match after a NUL byte that no real token spells (tokens
# spelling a NUL are left out), so every real transition is kept; a virtual token spelling the NUL
# then tells the accepting states: those from which it reaches a full match.
_END = b"\x00"


def _transitions(regex: str, vocabulary: Sequence[bytes | None]):
  """(initial state, accepting states, {state: {token: next}}) from outlines-core, over the
  ordinary tokens of `vocabulary` (ids as given)."""
  import outlines_core
  tokens = collections.defaultdict(list)
  for i, b in enumerate(vocabulary):
    if b and _END not in b:
      tokens[b].append(i)
  if not tokens:
    raise ConstraintError("constraint: the tokenizer has no ordinary tokens")
  end_id, builder_eos = len(vocabulary), len(vocabulary) + 1
  tokens[_END] = [end_id]
  vocab = outlines_core.Vocabulary(builder_eos, dict(tokens))
  try:
    index = outlines_core.Index(f"(?:{regex})\\x00", vocab)
  except ValueError as e:
    msg = str(e).split(". This may be")[0]
    if "building NFA" in msg or "DFA" in msg:
      msg = ("the automaton's regex engine rejects it (lookaround and backreferences have no "
             f"finite automaton; {msg})")
    raise ConstraintError(f"regex {regex!r}: {msg}") from None
  transitions = index.get_transitions()
  final = set(index.get_final_states())
  accepting = {s for s, out in transitions.items() if out.get(end_id) in final}
  real = {s: {t: n for t, n in out.items() if t < end_id} for s, out in transitions.items()}
  return index.get_initial_state(), accepting, real


def build_automaton(initial, accepting, transitions, *, vocab_size: int,
                    stop_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """The dense (next_state [num_states, V], distance [num_states]) arrays from a sparse DFA
  {state: {token: next}}, states renumbered in breadth-first order from `initial` (so the start
  is 0); every stop id loops on the accepting states. num_states is rounded up (see below)."""
  order, seen, queue = [], {initial}, collections.deque([initial])
  while queue:
    s = queue.popleft()
    order.append(s)
    for t, nxt in sorted(transitions.get(s, {}).items()):
      if nxt not in seen:
        seen.add(nxt)
        queue.append(nxt)
  number = {s: i for i, s in enumerate(order)}
  # Rows rounded up to a power of two (at least 8; the extra rows are states nothing reaches), so
  # patterns of similar size share one compiled sampler, as bucketed stop arrays do.
  n = max(8, 1 << (len(order) - 1).bit_length())
  if n * vocab_size * 4 > MAX_TABLE_BYTES:
    raise ConstraintError(f"constraint: {n} automaton states x {vocab_size} tokens is a "
                          f"{n * vocab_size * 4 / 2**30:.1f} GiB table; simplify the pattern")
  table = np.full((n, vocab_size), -1, np.int32)
  preds = [set() for _ in range(n)]
  for s in order:
    for t, nxt in transitions.get(s, {}).items():
      if t >= vocab_size:
        continue
      table[number[s], t] = number[nxt]
      preds[number[nxt]].add(number[s])
  accept = [number[s] for s in order if s in accepting]
  for s in accept:
    for t in stop_ids:
      table[s, int(t)] = s
  # Fewest tokens to acceptance: a breadth-first search backwards from the accepting states.
  distance = np.full((n,), UNREACHABLE, np.int32)
  distance[accept] = 0
  queue = collections.deque(accept)
  while queue:
    s = queue.popleft()
    for p in preds[s]:
      if distance[p] == UNREACHABLE:
        distance[p] = distance[s] + 1
        queue.append(p)
  return table, distance


@functools.lru_cache(maxsize=32)
def _compile_cached(regex: str, vocabulary: tuple, vocab_size: int,
                    stop_ids: tuple) -> Constraint:
  initial, accepting, transitions = _transitions(regex, vocabulary)
  table, distance = build_automaton(initial, accepting, transitions, vocab_size=vocab_size,
                                    stop_ids=stop_ids)
  return Constraint(pattern=regex, automaton=Automaton(next_state=table, distance=distance),
                    vocabulary=vocabulary)


def compile(tok_or_vocabulary, *, regex: str | None = None, json_schema=None, vocab_size: int,
            stop_ids: Sequence[int]) -> Constraint:
  """Compiles a regular expression (or a JSON schema, through its regex) against a tokenizer
  (anything with `token_bytes()`) or a vocabulary given as bytes per id. `vocab_size` is the
  model's logit width (at least the tokenizer's); `stop_ids` end a sample and are allowed only
  where the pattern is complete. Compiled constraints are cached by pattern and vocabulary."""
  if (regex is None) == (json_schema is None):
    raise ConstraintError("constraint: give exactly one of a regex and a JSON schema")
  if json_schema is not None:
    regex = regex_from_schema(json_schema)
  check_regex(regex)
  vocabulary = (tok_or_vocabulary.token_bytes() if hasattr(tok_or_vocabulary, "token_bytes")
                else list(tok_or_vocabulary))
  if len(vocabulary) > vocab_size:
    vocabulary = vocabulary[:vocab_size]
  stops = tuple(dict.fromkeys(int(s) for s in stop_ids))
  return _compile_cached(regex, tuple(vocabulary), int(vocab_size), stops)


def check_budget(automaton: Automaton, max_new_tokens: int) -> None:
  """A pattern whose shortest match is longer than the budget is refused before sampling: the
  mask would leave a row with no token to draw."""
  need = int(np.asarray(jax.device_get(automaton.distance))[0])
  if need >= UNREACHABLE:
    raise ConstraintError("the pattern cannot be completed with this tokenizer's tokens")
  if need > max_new_tokens:
    raise ConstraintError(f"the pattern needs at least {need} tokens, more than "
                          f"max_new_tokens={max_new_tokens}")


def unconstrained(vocab_size: int) -> Automaton:
  """One accepting state that allows every token: masking with it changes nothing (tests use it
  to show the masked path draws exactly what the plain one does)."""
  return Automaton(next_state=np.zeros((1, vocab_size), np.int32),
                   distance=np.zeros((1,), np.int32))


# --------------------------------------------------------------------------------------------
# Token bytes for byte-level BPE (the GPT-2 alphabet: each byte is shown as a printable
# character, so a token's string maps back to its bytes one character per byte).
# --------------------------------------------------------------------------------------------

def byte_level_alphabet() -> dict[str, int]:
  """Character -> byte of the GPT-2 byte-level alphabet: printable Latin-1 bytes stand for
  themselves, the other 68 take the characters from U+0100 up, in byte order."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  out, extra = {}, 0
  for b in range(256):
    if b in printable:
      out[chr(b)] = b
    else:
      out[chr(256 + extra)] = b
      extra += 1
  return out
