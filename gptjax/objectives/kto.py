"""KTO: Kahneman–Tversky optimisation (Ethayarajh et al., 2024), on single replies labelled
desirable or undesirable instead of pairs.

With r = log π(y|x) − log π_ref(y|x) (summed over the reply) and a reference point
z = max(0, KL estimate), the value of a reply is

    v = λ_D σ(β (r − z))   if desirable          v = λ_U σ(β (z − r))   if undesirable

and the loss is E[λ_y − v]. The reference point is estimated per batch, as the paper and TRL do,
from mismatched pairs: each prompt with another example's reply (y' ~ the data, not the prompt's
own), z = max(0, mean_batch[log π(y'|x) − log π_ref(y'|x)]), with no gradient through it.

Data: `data.train_source=kto_jsonl:PATH`, one {"prompt": str or messages, "completion": str,
"label": true|false} per line; or `preference_jsonl:PATH`, whose pairs become a desirable chosen
reply and an undesirable rejected one.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gptjax import batches
from gptjax.data import chat, dialogue, records, sources
from gptjax.data.errors import DataError
from gptjax.losses import common
from gptjax.objectives import Objective, register


@struct.dataclass
class KTOBatch:
  """Labelled replies and mismatched ones for the reference point. [B, T] and [B]."""
  completion: batches.LMBatch        # prompt + its reply, loss mask on the reply
  kl: batches.LMBatch                # the same prompt + another example's reply
  label: jax.Array                   # 1 desirable, 0 undesirable
  ref_completion_logp: jax.Array
  ref_kl_logp: jax.Array


def kto_loss(logp, ref_logp, kl_logp, ref_kl_logp, label, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
  """KTO from summed reply log-probs [B] each and labels [B] -> (mean loss, metrics)."""
  label = label.astype(jnp.float32)
  r = logp - ref_logp
  z = jax.lax.stop_gradient(jnp.maximum(jnp.mean(kl_logp - ref_kl_logp), 0.0))
  desirable = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (r - z)))
  undesirable = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z - r)))
  losses = label * desirable + (1.0 - label) * undesirable
  n_d, n_u = jnp.maximum(label.sum(), 1.0), jnp.maximum((1.0 - label).sum(), 1.0)
  return losses.mean(), {
      "kto/reference_point": z,
      "kto/desirable_reward": jnp.sum(beta * r * label) / n_d,
      "kto/undesirable_reward": jnp.sum(beta * r * (1.0 - label)) / n_u,
      "kto/desirable_fraction": label.mean(),
  }


def kto(params, batch, *, frozen=None, rng=None, model, beta: float = 0.1,
        desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
  del frozen, rng
  both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), batch.completion, batch.kl)
  out = model.apply({"params": params}, both.inputs, positions=both.positions,
                    segment_ids=both.segment_ids, deterministic=True)
  seq = jnp.sum(common.token_logprobs(out.logits, both.targets) * both.loss_mask, axis=1)
  n = batch.label.shape[0]
  return kto_loss(seq[:n], batch.ref_completion_logp, seq[n:], batch.ref_kl_logp, batch.label,
                  beta=beta, desirable_weight=desirable_weight,
                  undesirable_weight=undesirable_weight)


def check(*, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
  if beta <= 0:
    raise ValueError(f"loss.beta: must be > 0, got {beta}")
  if desirable_weight < 0 or undesirable_weight < 0:
    raise ValueError("loss.desirable_weight, loss.undesirable_weight: must be >= 0")


def read(spec: str, cfg) -> list[dict]:
  """Records {prompt: messages, completion, label} of `kto_jsonl:PATH` or `preference_jsonl:PATH`."""
  kind, _, path = spec.partition(":")
  if kind == "preference_jsonl":
    ds = sources.open_source(spec, split="train", data_dir=cfg.data.data_dir or None)
    out = []
    for i in range(len(ds)):
      r = ds[i]
      out += [{"prompt": r["prompt"], "completion": r["chosen"], "label": True},
              {"prompt": r["prompt"], "completion": r["rejected"], "label": False}]
    return out
  if kind != "kto_jsonl":
    raise DataError(f"data source {spec!r}: KTO reads kto_jsonl:PATH or preference_jsonl:PATH")
  out = []
  for lineno, obj in records.read_jsonl(path):
    where = f"{path}:{lineno}"
    if "prompt" not in obj:
      raise DataError(f"{where}: field 'prompt' is missing; expected a string or a messages list")
    prompt = obj["prompt"]
    prompt = chat.as_messages(prompt, where=where) if isinstance(prompt, str) else \
        chat.validate_messages(prompt, where=where)
    if not isinstance(obj.get("completion"), str):
      raise DataError(f"{where}: field 'completion' is missing or not a string")
    if not isinstance(obj.get("label"), bool):
      raise DataError(f"{where}: field 'label' expected true (desirable) or false, got "
                      f"{obj.get('label')!r}")
    out.append({"prompt": prompt, "completion": obj["completion"], "label": obj["label"]})
  if not out:
    raise DataError(f"{path}: no KTO examples")
  return out


def build(recs: list[dict], tok, seq_len: int) -> dict:
  """Each prompt with its own reply, and with the next example's reply for the reference point."""
  prompts = [r["prompt"] for r in recs]
  replies = [r["completion"] for r in recs]
  shifted = replies[1:] + replies[:1]
  return {"completion": dialogue.encode_replies(prompts, replies, tok, seq_len),
          "kl": dialogue.encode_replies(prompts, shifted, tok, seq_len),
          "label": np.asarray([r["label"] for r in recs], np.float32)}


register(Objective(
    name="kto", loss=kto, runner="preference", batch=KTOBatch, check=check, read=read,
    build=build, needs=frozenset({"reference"}), compared=True,
    description="single replies labelled desirable or undesirable; a prospect-theory value"))
