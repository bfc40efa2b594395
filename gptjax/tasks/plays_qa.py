"""Questions about Shakespeare's plays with exact answers, made from the embedded corpus, and the
passages that hold each answer: a task for retrieval.

    plays = shakespeare.load_plays()
    passages = make_passages(plays)
    questions = generate(plays, passages, ["who-says", "which-play"], 100, split="train", seed=0)
    questions[0].question     "Who says: 'Most like: it harrows me with fear and wonder.'?"
    questions[0].answer       'HORATIO'
    passages[questions[0].gold[0]].render()
                              'Hamlet | HORATIO: Most like: it harrows me with fear and wonder.'

Two kinds, each answered by construction over the plays given (the whole corpus by default):

    who-says     a verse line (at least `min_words` words) whose text occurs once in the corpus;
                 the answer is the speaker of the speech that holds it
    which-play   a speaker who speaks in exactly one play; the answer is that play's title

A passage is up to `lines_per_passage` consecutive lines of one speech, written with its play's
title and speaker, so a passage that holds a quoted line also names who says it, and every
passage of a character names their play. `gold` lists the passages that hold the evidence.
Train and held-out questions are disjoint by a hash of the question text, whatever the seed.
Answers are compared by `exact_match` (case, surrounding spaces and final punctuation aside).

What does not live here: the retriever (`prompting.BM25`), the pipeline stages
(`gptjax/retrieval.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from typing import Sequence

KINDS = ("who-says", "which-play")
_SMALL = {"a", "an", "and", "as", "at", "for", "in", "of", "on", "or", "that", "the", "to"}
_ROMAN = {"i", "ii", "iii", "iv", "v", "vi", "vii", "viii"}


@dataclasses.dataclass(frozen=True)
class Passage:
  play: str                       # the play's file stem, e.g. "hamlet"
  title: str
  speaker: str
  text: str                       # the lines, joined with " / "

  def render(self) -> str:
    return f"{self.title} | {self.speaker}: {self.text}"


@dataclasses.dataclass(frozen=True)
class Question:
  question: str
  answer: str
  kind: str                       # who-says | which-play
  play: str                       # the play the answer comes from
  gold: tuple[int, ...]           # indices of the passages that hold the evidence


def play_title(name: str) -> str:
  """A title from a play's file stem: 'a-midsummer-night-s-dream' -> "A Midsummer Night's Dream",
  'henry-iv-part-1' -> 'Henry IV Part 1'. The markdown's own headings are not used: some plays'
  first heading is an epilogue or an intermission."""
  words = []
  for w in name.split("-"):
    if w == "s" and words:
      words[-1] += "'s"
    elif w in _ROMAN:
      words.append(w.upper())
    elif w in _SMALL and words:
      words.append(w)
    else:
      words.append(w[:1].upper() + w[1:])
  return " ".join(words)


def normalize(text: str) -> str:
  """Lower case, runs of anything but letters, digits and apostrophes as one space."""
  return " ".join(re.sub(r"[^\w']+", " ", text.lower()).split())


def exact_match(reply: str, answer: str) -> bool:
  """The reply is the answer: case, surrounding spaces and quotes, and a final period aside."""
  clean = lambda s: " ".join(s.strip().strip("'\"").rstrip(".!?").split()).casefold()
  return clean(reply) == clean(answer)


def make_passages(plays, *, lines_per_passage: int = 2) -> list[Passage]:
  """Every speech of every play cut into passages of up to `lines_per_passage` lines, in order."""
  if lines_per_passage < 1:
    raise ValueError(f"lines_per_passage must be >= 1, got {lines_per_passage}")
  out = []
  for play in plays:
    title = play_title(play.name)
    for speech in play.speeches:
      lines = speech.text.split("\n")
      for i in range(0, len(lines), lines_per_passage):
        out.append(Passage(play.name, title, speech.speaker,
                           " / ".join(lines[i:i + lines_per_passage])))
  return out


def _is_character(speaker: str) -> bool:
  """Speakers that name one character: not a chorus of several ('ALL', 'BOTH', 'A and B')."""
  words = speaker.split()
  return bool(words) and not {"ALL", "BOTH", "AND", "&"} & set(words)


def who_says_candidates(passages: Sequence[Passage], *, min_words: int = 6,
                        max_chars: int = 80) -> list[Question]:
  """Every line that occurs once in the corpus (compared after `normalize`), has `min_words` to
  `max_chars`, and is spoken by one character."""
  seen: dict[str, int] = {}
  where = []
  for i, p in enumerate(passages):
    for line in p.text.split(" / "):
      key = normalize(line)
      seen[key] = seen.get(key, 0) + 1
      where.append((key, line, i))
  out = []
  for key, line, i in where:
    p = passages[i]
    if (seen[key] == 1 and len(key.split()) >= min_words and len(line) <= max_chars
        and _is_character(p.speaker)):
      out.append(Question(f"Who says: '{line}'?", p.speaker, "who-says", p.play, (i,)))
  return out


def which_play_candidates(passages: Sequence[Passage]) -> list[Question]:
  """Every character who speaks in exactly one play, with the passages they speak."""
  plays_of: dict[str, set] = {}
  spoken: dict[str, list] = {}
  for i, p in enumerate(passages):
    plays_of.setdefault(p.speaker, set()).add(p.play)
    spoken.setdefault(p.speaker, []).append(i)
  out = []
  for speaker in sorted(plays_of):
    if len(plays_of[speaker]) == 1 and _is_character(speaker):
      first = passages[spoken[speaker][0]]
      out.append(Question(f"In which play does {speaker} appear?", first.title, "which-play",
                          first.play, tuple(spoken[speaker])))
  return out


def is_heldout(question: str, fraction: float) -> bool:
  """Whether a question is held out: a hash of its text, not of any seed."""
  h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big")
  return h % 10_000 < int(round(fraction * 10_000))


def generate(passages: Sequence[Passage], kinds: Sequence[str], n_per_kind: int, *, split: str,
             seed: int, heldout_fraction: float = 0.2, min_words: int = 6,
             max_chars: int = 80) -> list[Question]:
  """`n_per_kind` questions of each kind for `split` ('train' or 'heldout'), kinds interleaved;
  a kind with fewer questions in the split gives all it has (0: all). The same arguments give
  the same list."""
  if split not in ("train", "heldout"):
    raise ValueError(f"split: expected 'train' or 'heldout', got {split!r}")
  groups = []
  for kind in kinds:
    if kind == "who-says":
      cands = who_says_candidates(passages, min_words=min_words, max_chars=max_chars)
    elif kind == "which-play":
      cands = which_play_candidates(passages)
    else:
      raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
    cands = [q for q in cands if is_heldout(q.question, heldout_fraction) == (split == "heldout")]
    rng = random.Random(f"gptjax-plays-qa:{seed}:{kind}:{split}")
    if n_per_kind and n_per_kind < len(cands):
      cands = rng.sample(cands, n_per_kind)
    else:
      rng.shuffle(cands)
    groups.append(cands)
  out = []
  for i in range(max(map(len, groups), default=0)):
    out += [g[i] for g in groups if i < len(g)]
  return out


def to_jsonable(q: Question) -> dict:
  return {**dataclasses.asdict(q), "gold": list(q.gold)}


def from_jsonable(d: dict) -> Question:
  return Question(d["question"], d["answer"], d["kind"], d["play"], tuple(d["gold"]))


# --------------------------------------------------------------------------------------------
# Prompts.
# --------------------------------------------------------------------------------------------

PASSAGES_HEADER = "Passages:"
# Words every question of a kind shares: as query terms they favour short passages that happen
# to hold "says" or "play" over the one that holds the quoted line or the character.
TEMPLATE_WORDS = frozenset({"who", "says", "in", "which", "play", "does", "appear"})


def retrieval_query(question: str) -> str:
  """The retriever's query: the question's words without the templates' own."""
  return " ".join(w for w in re.findall(r"\w+", question.lower()) if w not in TEMPLATE_WORDS)


def closed_book_prompt(question: str) -> str:
  return question


def retrieval_prompt(question: str, passages: Sequence[str]) -> str:
  """The passages, one a line under a header, then the question (the SFT and evaluation format
  for answering with retrieval)."""
  return "\n".join([PASSAGES_HEADER, *passages, "", question])
