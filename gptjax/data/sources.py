"""One entry point from a source spec to a random-access source of plain Python dicts.

    shakespeare:text | shakespeare:dialogue
    text_files:GLOB[,GLOB...]          (.txt files, or .jsonl with a "text" field)
    chat_jsonl:PATH_OR_GLOB
    preference_jsonl:PATH_OR_GLOB
    prompts_jsonl:PATH_OR_GLOB
    tfds:NAME:FEATURE                  any prepared TFDS dataset, e.g. tfds:lm1b:text; the FEATURE
                                       comes back as "text"

The first use builds the array_record files into `data_dir` (argument, else $GPTJAX_DATA_DIR, else
~/.cache/gptjax/tfds). Later uses read the cached files. A source has `len` and `__getitem__`, and
gives strings (not bytes) and messages as lists of {"role", "content"[, "tool_call"]} dicts.
"""

from __future__ import annotations

import os

from gptjax.data.errors import DataError

DEFAULT_DATA_DIR = os.path.join("~", ".cache", "gptjax", "tfds")
KINDS = ("shakespeare", "text_files", "chat_jsonl", "preference_jsonl", "prompts_jsonl", "tfds")


def default_data_dir() -> str:
  return os.path.expanduser(os.environ.get("GPTJAX_DATA_DIR", DEFAULT_DATA_DIR))


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _messages(stored: dict) -> list[dict]:
  roles, contents = stored["role"], stored["content"]
  calls = stored.get("tool_call", [b""] * len(roles))
  out = []
  for role, content, call in zip(roles, contents, calls):
    m = {"role": _text(role), "content": _text(content)}
    if call:
      m["tool_call"] = _text(call)
    out.append(m)
  return out


def _decode(example: dict) -> dict:
  out = {}
  for key, value in example.items():
    if isinstance(value, dict) and "role" in value:
      out[key] = _messages(value)
    elif isinstance(value, bytes):
      out[key] = value.decode("utf-8")
    else:
      out[key] = value
  return out


class Source:
  """Random access over a TFDS data source with decoded examples."""

  def __init__(self, data_source, *, spec: str, split: str, decode=_decode):
    self._data, self.spec, self.split, self._decode = data_source, spec, split, decode
    if len(data_source) == 0:
      raise DataError(f"source {spec!r}: split {split!r} is empty")

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, i: int) -> dict:
    n = len(self._data)
    if not -n <= i < n:
      raise IndexError(f"source {self.spec!r} split {self.split!r}: index {i} out of range [0, {n})")
    return self._decode(self._data[i % n])

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  def __repr__(self):
    return f"Source({self.spec!r}, split={self.split!r}, len={len(self)})"


def _quiet_tfds():
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  return tfds


def _download_and_prepare(builder) -> None:
  """TFDS prints "Downloading and preparing dataset Unknown size ..." even for a builder that
  downloads nothing (ours read embedded or local files); that line is replaced by a true one.
  A builder with a known download size keeps TFDS's own messages: its sizes are worth seeing."""
  if builder.is_prepared() or builder.info.download_size:
    builder.download_and_prepare(file_format="array_record")
    return
  import contextlib
  import io
  print(f"[data] preparing the {builder.name} dataset from local data in {builder.data_dir} "
        "(once; later runs read it)", flush=True)
  with contextlib.redirect_stdout(io.StringIO()):
    builder.download_and_prepare(file_format="array_record")


class _QuietTfdsWarnings:
  """TFDS warns "Using custom data configuration" and "Variant folder ... has no
  dataset_info.json" for every first build of our configurable builders: both are the normal
  path here, and read like faults. Its warnings are held back while our builders build; errors
  still show."""

  def __enter__(self):
    import logging
    self.logger = logging.getLogger("absl")
    self.level = self.logger.level
    self.logger.setLevel(logging.ERROR)

  def __exit__(self, *exc):
    self.logger.setLevel(self.level)


def _prepared(make_builder, *, spec: str, split: str) -> Source:
  # TFDS writes into a temporary folder and renames it at the end, so an interrupted build is
  # never mistaken for a finished one.
  with _QuietTfdsWarnings():
    builder = make_builder()
    try:
      _download_and_prepare(builder)
    except FileExistsError:
      # Processes that share a data_dir (several on one machine, or a shared disk) may build the
      # same dataset at once; the one whose rename comes second finds a finished copy in place
      # (a rename only ever installs a complete build). Read that copy with a builder made
      # afresh, since this one's info describes the build it abandoned.
      builder = make_builder()
      builder.download_and_prepare(file_format="array_record")
  splits = builder.info.splits
  base = split.split("[")[0]
  if base not in splits:
    raise DataError(f"source {spec!r} has no split {base!r} (it has: "
                    f"{', '.join(sorted(splits)) or 'none'}); for user files, set val_fraction "
                    "or pass the validation file as its own source")
  return Source(builder.as_data_source(split=split), spec=spec, split=split)


def open_source(spec: str, *, split: str = "train", data_dir: str | None = None,
                val_fraction: float = 0.0) -> Source:
  """Opens (building on first use) the source named by `spec`; see the module docstring.

  `val_fraction` only applies to user files: that fraction of records (chosen by a hash of file
  name and line, so stable) forms the `validation` split.
  """
  kind, sep, arg = spec.partition(":")
  if kind not in KINDS or not sep or not arg:
    raise DataError(f"source spec {spec!r}: expected KIND:ARG with KIND one of {', '.join(KINDS)} "
                    "(e.g. shakespeare:text, chat_jsonl:/data/chats.jsonl, tfds:lm1b:text)")
  data_dir = os.path.expanduser(data_dir) if data_dir else default_data_dir()
  tfds = _quiet_tfds()
  from gptjax.data import builders, records

  if kind == "shakespeare":
    if arg not in ("text", "dialogue"):
      raise DataError(f"source spec {spec!r}: shakespeare has configs 'text' and 'dialogue'")
    return _prepared(lambda: builders.GptjaxShakespeare(
        config=arg, data_dir=data_dir, file_format="array_record"), spec=spec, split=split)

  if kind == "tfds":
    name, sep, feature = arg.rpartition(":")
    if not sep or not name or not feature:
      raise DataError(f"source spec {spec!r}: expected tfds:NAME:FEATURE, e.g. tfds:lm1b:text")
    try:
      data = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # TFDS raises many types; the user needs the spec and the cause
      raise DataError(f"source {spec!r}: could not open TFDS dataset {name!r} split {split!r} "
                      f"in {data_dir}: {type(e).__name__}: {e}") from e
    if len(data) and feature not in data[0]:
      raise DataError(f"source {spec!r}: dataset {name!r} has no feature {feature!r} "
                      f"(it has: {', '.join(sorted(data[0]))})")
    return Source(data, spec=spec, split=split,
                  decode=lambda ex: {"text": _text(ex[feature])})

  paths = records.expand_paths(arg, source=spec)
  cls = builders.USER_BUILDERS[kind]
  fp = builders.fingerprint(kind, paths, val_fraction=val_fraction)
  return _prepared(lambda: cls(config=tfds.core.BuilderConfig(name=fp, description=spec),
                               data_dir=data_dir, file_format="array_record", paths=paths,
                               val_fraction=val_fraction), spec=spec, split=split)


def source_text_field(example: dict) -> str:
  """The text of a pretraining example from any text-like source."""
  if "text" in example:
    return example["text"]
  raise DataError(f"example has no 'text' field (fields: {', '.join(sorted(example))})")


