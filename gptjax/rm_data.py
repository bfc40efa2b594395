"""Preference data for the reward model, made the InstructGPT way with a simulated labeler.

    paths = generate(cfg, sft_workdir="runs/sft", out_dir="runs/reward/preferences")
    paths -> {"train": ".../train.jsonl", "validation": ".../validation.jsonl"}

For each prompt, the SFT model samples K replies (through `gptjax.sampling` and the chat template's
generation prompt); the labeler (`gptjax.labeler`) scores each with VADER and ranks the K with
Bradley–Terry / Plackett–Luce noise at `rm_data.labeler_temperature` (replies with equal scores
tie, with `rm_data.labeler_ties`). Training prompts come from
the training plays, validation prompts from the held-out plays (the SFT split), so the held-out
accuracy is measured on prompts neither SFT nor the reward model has seen.

Each line of the output is a `preference_jsonl` record, extended with the whole ranking:

    {"prompt": [{"role": "user", "content": "..."}],
     "chosen": "...", "rejected": "...",          # the best and the worst by the noisy ranking
     "responses": ["...", ...], "ranks": [2, 0, 3, 1],   # K replies; higher rank = preferred
     "scores": [0.44, -0.3, 0.6, 0.0],            # the labeler's noiseless gold scores
     "ended": [true, true, false, true],           # did the reply end with <|end|> in the budget
     "response_ids": [[...], ...]}                 # the sampled ids (the SFT run's tokenizer)

A reader that knows only chosen/rejected still reads a valid pair. `generate` is idempotent: it
writes `manifest.json` last, and returns at once when the manifest matches the request.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np

from gptjax import checkpoint as ckpt_lib
from gptjax import labeler
from gptjax import sampling
from gptjax import sharding
from gptjax.data import chat, dialogue

MANIFEST = "manifest.json"


def prompt_set(cfg, split: str, n: int, *, field: str, seed_offset: int = 0) -> list[list[dict]]:
  """`n` generation prompts (message lists) of a split, a deterministic sample of the dialogue.
  `field` is the config field `n` came from, for the error when the split has fewer prompts.

  `rm_data.prompts` is `shakespeare:dialogue` (a speech, cut like SFT's) or `prompts_jsonl:PATH`.
  """
  src = cfg.rm_data.prompts
  if src == dialogue.DIALOGUE:
    examples = dialogue.dialogue_examples(split, val_fraction=cfg.data.val_fraction)
    chars = dialogue.prompt_char_budget(cfg)
    prompts = [dialogue.dialogue_messages(e, prompt_chars=chars, persona=cfg.sft.persona)[:-1]
               for e in examples]
  elif src.startswith("prompts_jsonl:"):
    from gptjax.data import sources
    ds = sources.open_source(src, split=split, data_dir=cfg.data.data_dir or None,
                             val_fraction=cfg.data.val_fraction)
    prompts = [ds[i]["prompt"] for i in range(len(ds))]
  else:
    from gptjax.config import ConfigError
    raise ConfigError(f"rm_data.prompts: expected '{dialogue.DIALOGUE}' or "
                      f"'prompts_jsonl:PATH', got {src!r}")
  if n > len(prompts):
    from gptjax.config import ConfigError
    raise ConfigError(f"{field}: {n} asked for, but {src} has only {len(prompts)} {split} prompts")
  order = np.random.default_rng([cfg.seed, seed_offset, split == "train"]).permutation(len(prompts))
  return [prompts[i] for i in order[:n]]


def _as_sampled(cfg, sft_workdir: str):
  """`cfg` with the SFT run's context length, as the reward stage sees it after adopting SFT's
  architecture. The prompt budget depends on it, and the pipeline's rm_data stage (which does not
  adopt) and the reward stage (which does) must ask for the same data: they used to differ, so a
  reward stage that regenerated the data (in a moved run directory) trained on other prompts."""
  import copy
  from gptjax import config as config_lib
  sft_cfg = config_lib.from_json(os.path.join(sft_workdir, "config.json"))
  c = copy.deepcopy(cfg)
  with c.unlocked():
    c.model.max_len = int(sft_cfg.model.max_len)
    c.data.seq_len = min(int(c.data.seq_len), int(c.model.max_len))
  return c, sft_cfg


def _request(cfg, sft_workdir: str, sft_cfg) -> dict:
  """Everything that decides the output; a manifest with the same request is reused. Nothing
  here names a location, so a run directory moved or copied elsewhere reuses its data."""
  r = cfg.rm_data
  ckpt = ckpt_lib.Checkpointer(sft_workdir)
  step = ckpt.latest_step()
  ckpt.close()
  sft_model = hashlib.sha256(json.dumps(sft_cfg.model.to_dict(), sort_keys=True,
                                        default=str).encode()).hexdigest()[:16]
  return {"sft_model": sft_model, "sft_step": step, "seed": cfg.seed,
          "rm_data": r.to_dict(), "sft": cfg.sft.to_dict(), "seq_len": cfg.data.seq_len,
          "max_len": cfg.model.max_len, "val_fraction": cfg.data.val_fraction}


def _write_jsonl(path: str, records: list[dict]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)


def sample_and_label(model, params, tok, prompts: list[list[dict]], *, k: int, seed: int,
                     reply_tokens: int, max_len: int, temperature: float, top_k: int,
                     labeler_temperature: float, batch_size: int, ties: bool = True,
                     progress: str = "") -> list[dict]:
  """K sampled replies per prompt, scored and ranked by the labeler; one record per prompt."""
  ids, kept = dialogue.fit_prompts(prompts, tok, max_len=max_len, reply_tokens=reply_tokens)
  repeated = [p for p in ids for _ in range(k)]
  replies, ended = sampling.sample_replies(
      model, params, repeated, seed=seed, max_new_tokens=reply_tokens, temperature=temperature,
      top_k=top_k, batch_size=batch_size, pad_id=tok.pad_id, eos_ids=chat.reply_stop_ids(tok),
      progress=progress)
  texts = [chat.parse_reply(r, tok) for r in replies]
  scores = labeler.gold_score(texts).reshape(len(ids), k)
  ranks = labeler.noisy_ranking(scores, temperature=labeler_temperature,
                                rng=np.random.default_rng([seed, 1]), ties=ties)
  ended = ended.reshape(len(ids), k)
  records = []
  for n, i in enumerate(kept):
    resp = texts[n * k:(n + 1) * k]
    rk = [int(x) for x in ranks[n]]
    # chosen/rejected: the first best and the first worst (a plain pair reader sees one pair).
    records.append({"prompt": prompts[i], "chosen": resp[int(np.argmax(rk))],
                    "rejected": resp[int(np.argmin(rk))], "responses": resp, "ranks": rk,
                    "scores": [round(float(s), 4) for s in scores[n]],
                    "ended": [bool(e) for e in ended[n]],
                    "response_ids": replies[n * k:(n + 1) * k]})
  return records


def generate(cfg, *, sft_workdir: str, out_dir: str, progress: bool = False) -> dict:
  """Writes train.jsonl and validation.jsonl under `out_dir` (skipped when already complete)."""
  paths = {s: os.path.join(out_dir, f"{s}.jsonl") for s in ("train", "validation")}
  cfg, sft_cfg = _as_sampled(cfg, sft_workdir)
  request = _request(cfg, sft_workdir, sft_cfg)
  digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
  manifest_path = os.path.join(out_dir, MANIFEST)
  complete = False
  if os.path.exists(manifest_path):
    with open(manifest_path) as f:
      manifest = json.load(f)
    complete = manifest.get("digest") == digest and all(os.path.exists(p) for p in paths.values())
  if sharding.process_zero_decides(complete):
    # The usual path in the pipeline (the rm_data stage wrote these files for the reward stage).
    print(f"[{out_dir}] reading the preference data sampled earlier from {sft_workdir}",
          flush=True)
    return paths
  os.makedirs(out_dir, exist_ok=True)
  r = cfg.rm_data
  model, params, tok, sft_cfg = ckpt_lib.load_for_inference(sft_workdir)
  counts = {}
  for split, n, offset in (("train", r.train_prompts, 1), ("validation", r.validation_prompts, 2)):
    prompts = prompt_set(cfg, split, n, field=f"rm_data.{split}_prompts", seed_offset=offset)
    records = sample_and_label(
        model, params, tok, prompts, k=r.replies_per_prompt, seed=cfg.seed * 1000 + offset,
        reply_tokens=cfg.sft.reply_tokens, max_len=sft_cfg.model.max_len,
        temperature=r.temperature, top_k=r.top_k, labeler_temperature=r.labeler_temperature,
        batch_size=r.batch_size, ties=r.labeler_ties,
        progress=f"rm_data: sampling {split} replies" if progress else "")
    counts[split] = {"prompts": len(records),
                     "replies": sum(len(x["responses"]) for x in records),
                     "ended_fraction": float(np.mean([e for x in records for e in x["ended"]])),
                     "mean_gold": float(np.mean([s for x in records for s in x["scores"]])),
                     "zero_gold_fraction": float(np.mean([s == 0 for x in records
                                                          for s in x["scores"]]))}
    if jax.process_index() == 0:
      _write_jsonl(paths[split], records)
  if jax.process_index() == 0:
    with open(manifest_path + ".tmp", "w") as f:
      json.dump({"digest": digest, "request": request, "counts": counts,
                 "files": {s: os.path.basename(p) for s, p in paths.items()}}, f, indent=2)
    os.replace(manifest_path + ".tmp", manifest_path)
  # Every process holds the same records (each sampled a share of the batches, then all were
  # gathered); process 0 alone wrote them, and the others read those files next, so none may go
  # on before they exist.
  sharding.barrier("rm_data:" + digest)
  print(f"[{out_dir}] preference data: " + "; ".join(
      f"{s} {c['prompts']} prompts x {r.replies_per_prompt} replies" for s, c in counts.items()),
      flush=True)
  return paths
