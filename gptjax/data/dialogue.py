"""Dialogue data shared by the assistant stages: the plays' speech-and-reply pairs, prompts cut to
a budget, and chat prompts rendered and padded for the sampler.

SFT trains on `dialogue_examples`; the preference-data generator and the reward model's
best-of-N sample replies to `dialogue_messages` prompts; the RL stages, DPO and the pipeline's
comparison read prompts with `prompt_messages` and `encode_prompts`. The functions live here, in
the data layer, so no stage runner has to import another to get them.
"""

from __future__ import annotations

import numpy as np

from gptjax.data import chat, shakespeare

DIALOGUE = "shakespeare:dialogue"


def dialogue_examples(split: str, *, val_fraction: float = 0.1) -> list[dict]:
  """The plays' dialogue view in memory: each speech and the next speaker's reply in its scene.

  The same pairs, split and fields as the TFDS `shakespeare:dialogue` source, built straight from
  the parsed plays: reading 25k examples back through TFDS costs about a minute on two CPU
  cores, more than the whole tiny SFT run.
  """
  train, val = shakespeare.split_plays(shakespeare.load_plays(), val_fraction)
  plays = {"train": train, "validation": val}[split]
  out = []
  for play in plays:
    for scene in play.scenes:
      for speech, reply in zip(scene.speeches, scene.speeches[1:]):
        if speech.speaker != reply.speaker:
          out.append({"prompt": speech.text, "reply": reply.text, "prompt_speaker": speech.speaker,
                      "reply_speaker": reply.speaker, "play": play.title})
  return out


def tail_words(text: str, max_chars: int) -> str:
  """The end of `text` in at most `max_chars` characters, starting at a word where possible."""
  text = " ".join(text.split())
  if len(text) <= max_chars:
    return text
  cut = text[len(text) - max_chars:]
  space = cut.find(" ")
  return cut[space + 1:] if 0 <= space < len(cut) - 1 else cut


def prompt_char_budget(cfg) -> int:
  """Characters of speech that fit in front of a reply, both in a training row and when sampling."""
  s = cfg.sft
  if s.max_prompt_chars:
    return int(s.max_prompt_chars)
  # bos, <|user|>, <|end|>, <|assistant|> around the speech; the reply and its <|end|> after it.
  in_row = cfg.data.seq_len + 1 - 4 - (s.max_reply_chars + 1)
  for_sampling = cfg.model.max_len - s.reply_tokens - 4
  return max(1, min(in_row, for_sampling))


def dialogue_messages(example: dict, *, prompt_chars: int, persona: bool) -> list[dict]:
  """One conversation: [system naming the persona], the speech (its last words), the reply."""
  messages = []
  budget = prompt_chars
  if persona:
    system = f"You are {example['reply_speaker'].title()}."
    messages.append({"role": "system", "content": system})
    budget -= len(system) + 2          # its marker and <|end|>
  messages.append({"role": "user", "content": tail_words(example["prompt"], max(budget, 1))})
  messages.append({"role": "assistant", "content": " ".join(example["reply"].split())})
  return messages


def split_for_generation(messages: list[dict]) -> tuple[list[dict], str]:
  """(the conversation before its last assistant turn, that turn's content as the reference)."""
  last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
  return messages[:last], messages[last]["content"]


def fit_prompts(prompts: list[list[dict]], tok, *, max_len: int, reply_tokens: int):
  """Rendered generation prompts that leave `reply_tokens` positions free; (ids, kept indices)."""
  ids, kept = [], []
  for i, m in enumerate(prompts):
    p = chat.render_prompt(m, tok)
    if len(p) + reply_tokens <= max_len:
      ids.append(p)
      kept.append(i)
  return ids, kept


def prompt_messages(cfg, split: str) -> list[list[dict]]:
  """The prompts of `split` as chat messages: `rl.prompts` when given (tests), else the examples'
  `prompt` field of `data.source` ('shakespeare:dialogue', 'prompts_jsonl:...',
  'preference_jsonl:...'), at most `rl.max_prompts` (0 = all)."""
  inline = list(cfg.rl.get("prompts", ()) or ())
  if inline:
    out = [chat.as_messages(p) for p in inline]
  else:
    from gptjax.data import sources
    ds = sources.open_source(cfg.data.source, split=split, data_dir=cfg.data.data_dir or None)
    n = len(ds)
    limit = cfg.rl.max_prompts if split == "train" else cfg.rl.eval_prompts
    if limit:
      n = min(n, int(limit))
    out = []
    for i in range(n):
      ex = ds[i]
      if "prompt" not in ex:
        raise ValueError(f"data.source {cfg.data.source!r}: example {i} has no 'prompt' field "
                         f"(fields: {sorted(ex)})")
      out.append(chat.as_messages(ex["prompt"]))
  if not out:
    raise ValueError(f"no prompts for split {split!r} (rl.prompts / data.source)")
  return out


def encode_prompts(messages: list[list[dict]], tok, prompt_len: int):
  """(ids [N, prompt_len] right-padded, lengths [N], texts): rendered with the chat template up to
  `<|assistant|>`. A prompt that is too long keeps its first two ids (<bos>, the role marker) and
  its last ones, so it still ends at the generation marker."""
  ids = np.full((len(messages), prompt_len), tok.pad_id, np.int32)
  lengths = np.zeros((len(messages),), np.int32)
  texts = []
  for i, m in enumerate(messages):
    x = chat.render_prompt(m, tok)
    if len(x) > prompt_len:
      x = x[:2] + x[len(x) - (prompt_len - 2):]
    ids[i, :len(x)] = x
    lengths[i] = len(x)
    texts.append(m[-1]["content"])
  return ids, lengths, texts


def _fit_reply(prompt_ids, reply_ids, seq_len):
  """ids (≤ seq_len + 1) and the prompt's length for one prompt + reply: the reply keeps at most
  seq_len − 3 tokens; a long prompt keeps its first two ids (<bos>, the role marker) and its end."""
  room = seq_len + 1
  reply_ids = reply_ids[:max(room - 4, 1)]
  keep = room - len(reply_ids)
  if len(prompt_ids) > keep:
    prompt_ids = prompt_ids[:2] + prompt_ids[len(prompt_ids) - (keep - 2):]
  ids = prompt_ids + reply_ids
  return ids, len(prompt_ids)


def encode_replies(prompts, replies, tok, seq_len: int) -> dict:
  """LMBatch fields, numpy [N, seq_len], of chat prompts (messages) each followed by its reply
  and the end of turn (`chat.reply_ids`: `<|end|>`, or an HF template's own); the loss mask
  covers the reply and its end of turn. For losses over whole replies (DPO's pairs, KTO's
  labelled replies)."""
  n = len(prompts)
  f = {k: np.zeros((n, seq_len), np.int32) for k in ("inputs", "targets", "segment_ids")}
  f["inputs"][:] = tok.pad_id
  f["targets"][:] = tok.pad_id
  f["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy()
  f["loss_mask"] = np.zeros((n, seq_len), np.float32)
  for i, (prompt, reply) in enumerate(zip(prompts, replies)):
    ids, p = _fit_reply(chat.render_prompt(prompt, tok), chat.reply_ids(tok, prompt, reply),
                        seq_len)
    t = len(ids) - 1
    f["inputs"][i, :t], f["targets"][i, :t] = ids[:-1], ids[1:]
    f["segment_ids"][i, :t] = 1
    f["loss_mask"][i, p - 1:t] = 1
  return f
