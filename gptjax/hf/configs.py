"""config.json of a Hugging Face model <-> gptjax's ModelConfig, for the families we support.

    fields, info = read_config(directory)      # ModelConfig keyword arguments, and what else we need
    config_json = write_config(model_cfg, ...)  # the inverse, for export

Every field of config.json is in one of three lists: fields that set the math (honoured), fields
with one accepted value (anything else is refused, e.g. attention softcapping), and fields that do
not change the forward pass (ids, dropout probabilities of pretraining, bookkeeping). A field in none
of them is refused too, so a model that depends on something we do not know about never loads as
a slightly different network. Messages name the file and the field:

    config.json: field 'rope_scaling.rope_type' = 'yarn' is not supported (supported: default, llama3, linear)
"""

from __future__ import annotations

import dataclasses
import json
import os

from gptjax.config import ConfigError

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma3_text")
ROPE_TYPES = ("default", "linear", "llama3")
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                    "relu": "relu"}

# Fields that never change the logits of a forward pass: identity, bookkeeping, token ids (the
# tokenizer reads those), the cache, and dropout probabilities (a fine-tuning run sets its own
# `model.dropout_rate`; importing pretraining's would silently change a run's regularisation).
INERT = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "use_cache", "initializer_range", "output_attentions", "output_hidden_states", "return_dict",
    "is_encoder_decoder", "chunk_size_feed_forward", "id2label", "label2id", "problem_type",
    "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout", "resid_pdrop",
    "embd_pdrop", "attn_pdrop", "summary_type", "summary_use_proj", "summary_activation",
    "summary_proj_to_labels", "summary_first_dropout", "n_ctx", "task_specific_params",
    "cache_implementation", "tokenizer_class", "num_labels", "finetuning_task",
    "tie_encoder_decoder", "torchscript", "use_return_dict", "gradient_checkpointing",
    "reorder_and_upcast_attn",    # only where softmax is computed; gptjax always computes it in fp32
}
# Field -> the values we accept (the ones that leave the math as we implement it).
FIXED = {
    "pretraining_tp": (1, None),
    "attn_logit_softcapping": (None,),
    "use_bidirectional_attention": (False, None),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "add_cross_attention": (False,),
    "quantization_config": (None,),
    "partial_rotary_factor": (1.0, 1, None),
}
USED = {
    "gpt2": {"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
             "activation_function", "layer_norm_epsilon", "tie_word_embeddings"},
    "llama": {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
              "rms_norm_eps", "tie_word_embeddings", "rope_theta", "rope_scaling",
              "rope_parameters", "attention_bias", "mlp_bias", "head_dim"},
}
USED["mistral"] = USED["llama"] - {"attention_bias", "mlp_bias"} | {"sliding_window"}
_QWEN_WINDOW = {"sliding_window", "layer_types", "use_sliding_window", "max_window_layers"}
USED["qwen2"] = USED["llama"] - {"attention_bias", "mlp_bias", "head_dim"} | _QWEN_WINDOW
USED["qwen3"] = USED["llama"] - {"mlp_bias"} | _QWEN_WINDOW
USED["gemma3_text"] = USED["llama"] - {"hidden_act", "mlp_bias"} | {
    "hidden_activation", "query_pre_attn_scalar", "sliding_window", "layer_types",
    "rope_local_base_freq", "final_logit_softcapping", "sliding_window_pattern",
    "_sliding_window_pattern"}


@dataclasses.dataclass(frozen=True)
class HFInfo:
  """What an import needs beyond the ModelConfig."""
  model_type: str
  head: str                         # "lm" (…ForCausalLM) or "score" (…ForSequenceClassification)
  weights_prefix: str               # "model." (Llama family), "transformer." or "" (GPT-2)
  bos_token_id: int | None
  eos_token_ids: tuple[int, ...]
  pad_token_id: int | None


class HFError(ConfigError):
  """A Hugging Face directory gptjax cannot load: one line naming the file and the field."""


def _fail(file: str, field: str, value, supported=None, why: str = "") -> HFError:
  msg = f"{file}: field '{field}' = {value!r} is not supported"
  if supported is not None:
    msg += f" (supported: {', '.join(str(s) for s in supported)})"
  if why:
    msg += f" ({why})"
  return HFError(msg)


def load_json(path: str, what: str) -> dict:
  name = os.path.basename(path)
  if not os.path.exists(path):
    raise HFError(f"{path}: no such file; expected the {what} of a Hugging Face model directory")
  try:
    with open(path) as f:
      out = json.load(f)
  except json.JSONDecodeError as e:
    raise HFError(f"{name}: line {e.lineno}: not valid JSON ({e.msg})") from None
  if not isinstance(out, dict):
    raise HFError(f"{name}: expected a JSON object, got {type(out).__name__}")
  return out


def _rope(c: dict, file: str, max_len: int) -> dict:
  """rope_theta / rope_scaling (the older form) or rope_parameters (transformers 5) -> fields.
  Gemma 3 nests one dict per layer kind; its local layers must be unscaled."""
  out = {}
  params = c.get("rope_parameters")
  if c.get("model_type") == "gemma3_text":
    nested = params or {}
    full = dict(nested.get("full_attention") or {})
    local = dict(nested.get("sliding_attention") or {})
    if "rope_theta" in c:
      full.setdefault("rope_theta", c["rope_theta"])
    full.setdefault("rope_theta", 1_000_000.0)
    if "rope_local_base_freq" in c:
      local.setdefault("rope_theta", c["rope_local_base_freq"])
    local.setdefault("rope_theta", 10_000.0)
    if c.get("rope_scaling"):
      full.update(c["rope_scaling"])
    local_type = local.get("rope_type", local.get("type", "default"))
    if local_type != "default":
      raise _fail(file, "rope_parameters.sliding_attention.rope_type", local_type, ("default",))
    out["rope_local_theta"] = float(local["rope_theta"])
    scaling, where = full, "rope_parameters.full_attention" if params else "rope_scaling"
  else:
    if params:
      scaling, where = dict(params), "rope_parameters"
    else:
      scaling, where = dict(c.get("rope_scaling") or {}), "rope_scaling"
      scaling.setdefault("rope_theta", c.get("rope_theta", 10_000.0))
  out["rope_theta"] = float(scaling.pop("rope_theta", c.get("rope_theta", 10_000.0)))
  kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
  scaling.pop("type", None)
  if kind not in ROPE_TYPES:
    raise _fail(file, f"{where}.rope_type", kind, ROPE_TYPES)
  out["rope_type"] = kind
  known = {"default": set(), "linear": {"factor"},
           "llama3": {"factor", "low_freq_factor", "high_freq_factor",
                      "original_max_position_embeddings"}}[kind]
  for k, v in scaling.items():
    if k in FIXED:
      if v not in FIXED[k]:
        raise _fail(file, f"{where}.{k}", v, FIXED[k])
    elif k not in known:
      raise _fail(file, f"{where}.{k}", v, why=f"rope type {kind!r} takes {sorted(known) or 'none'}")
  if kind in ("linear", "llama3"):
    if "factor" not in scaling:
      raise HFError(f"{file}: field '{where}.factor' is missing; rope type {kind!r} needs it")
    out["rope_factor"] = float(scaling["factor"])
  if kind == "llama3":
    for k, field in (("low_freq_factor", "rope_low_freq_factor"),
                     ("high_freq_factor", "rope_high_freq_factor")):
      if k not in scaling:
        raise HFError(f"{file}: field '{where}.{k}' is missing; rope type 'llama3' needs it")
      out[field] = float(scaling[k])
    out["rope_original_max_len"] = int(scaling.get("original_max_position_embeddings", max_len))
  return out


def _layer_types(c: dict, file: str, num_layers: int, window) -> str:
  kinds = c.get("layer_types")
  if kinds is None:
    if c["model_type"] == "gemma3_text":
      every = int(c.get("sliding_window_pattern", c.get("_sliding_window_pattern", 6)))
      kinds = ["sliding_attention" if (i + 1) % every else "full_attention"
               for i in range(num_layers)]
    elif c["model_type"] in ("qwen2", "qwen3"):
      first = int(c.get("max_window_layers", num_layers))
      kinds = ["sliding_attention" if window and i >= first else "full_attention"
               for i in range(num_layers)]
    else:
      kinds = ["sliding_attention" if window else "full_attention"] * num_layers
  if not isinstance(kinds, list) or len(kinds) != num_layers:
    raise HFError(f"{file}: field 'layer_types' must list one kind per layer "
                  f"({num_layers}), got {kinds!r}")
  letters = []
  for i, k in enumerate(kinds):
    if k not in ("sliding_attention", "full_attention"):
      raise _fail(file, f"layer_types[{i}]", k, ("full_attention", "sliding_attention"))
    # Without a window a "sliding" layer attends to everything, as in transformers.
    letters.append("l" if k == "sliding_attention" and window else "g")
  return "".join(letters)


def read_config(directory: str) -> tuple[dict, HFInfo]:
  """ModelConfig keyword arguments and HFInfo from `directory/config.json`."""
  file = "config.json"
  c = load_json(os.path.join(directory, file), "config.json")
  kind = c.get("model_type")
  if kind not in FAMILIES:
    why = ("a multimodal Gemma 3; import its text model (model_type 'gemma3_text')"
           if kind == "gemma3" else "")
    raise _fail(file, "model_type", kind, FAMILIES, why)
  arch = (c.get("architectures") or [""])[0]
  head = "score" if arch.endswith("ForSequenceClassification") else "lm"
  if arch and not arch.endswith(("ForCausalLM", "LMHeadModel", "ForSequenceClassification",
                                 "Model")):
    raise _fail(file, "architectures[0]", arch,
                ("…ForCausalLM", "…LMHeadModel", "…ForSequenceClassification"))
  if head == "score":
    labels = c.get("num_labels", len(c.get("id2label") or {0: 0}))
    if labels != 1:
      raise _fail(file, "id2label", c.get("id2label"), why="a reward model has one label")
  for k, v in c.items():
    if k in FIXED and v not in FIXED[k]:
      raise _fail(file, k, v, FIXED[k])
    if k not in INERT and k not in FIXED and k not in USED[kind]:
      raise _fail(file, k, v, why=f"gptjax does not know how it changes a {kind} model")

  def need(field):
    if field not in c:
      raise HFError(f"{file}: field '{field}' is missing; a {kind} model needs it")
    return c[field]

  tie = bool(c.get("tie_word_embeddings", kind in ("gpt2", "gemma3_text")))
  if kind == "gpt2":
    act = c.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
      raise _fail(file, "activation_function", act, sorted(GPT2_ACTIVATIONS))
    d = int(need("n_embd"))
    fields = dict(variant="gpt2", vocab_size=int(need("vocab_size")), num_layers=int(need("n_layer")),
                  num_heads=int(need("n_head")), d_model=d, mlp_dim=int(c.get("n_inner") or 4 * d),
                  max_len=int(c.get("n_positions", 1024)), activation=GPT2_ACTIVATIONS[act],
                  norm_eps=float(c.get("layer_norm_epsilon", 1e-5)), tie_embeddings=tie)
    prefix = "transformer."
  else:
    heads = int(need("num_attention_heads"))
    d = int(need("hidden_size"))
    layers = int(need("num_hidden_layers"))
    max_len = int(c.get("max_position_embeddings", 2048))
    head_dim = c.get("head_dim")
    if kind == "qwen2" or head_dim is None:
      head_dim = d // heads
    act_field = "hidden_activation" if kind == "gemma3_text" else "hidden_act"
    act = c.get(act_field, "gelu_pytorch_tanh" if kind == "gemma3_text" else "silu")
    wanted = ("gelu_pytorch_tanh",) if kind == "gemma3_text" else ("silu",)
    if act not in wanted:
      raise _fail(file, act_field, act, wanted)
    window = c.get("sliding_window")
    if kind in ("qwen2", "qwen3") and not c.get("use_sliding_window", False):
      window = None
    layer_types = _layer_types(c, file, layers, window)
    fields = dict(
        variant="llama", vocab_size=int(need("vocab_size")), num_layers=layers, num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads), d_model=d,
        mlp_dim=int(need("intermediate_size")), max_len=max_len,
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), tie_embeddings=tie,
        explicit_head_dim=int(head_dim) if head_dim * heads != d else None,
        sliding_window=int(window) if "l" in layer_types else None,
        layer_types=layer_types if "l" in layer_types else "",
        **_rope(c, file, max_len))
    attention_bias = bool(c.get("attention_bias", False))
    if kind == "qwen2":
      fields.update(qkv_bias=True, out_bias=False, mlp_bias=False)
    else:
      fields.update(qkv_bias=attention_bias, out_bias=attention_bias,
                    mlp_bias=bool(c.get("mlp_bias", False)))
    if kind in ("qwen3", "gemma3_text"):
      fields["qk_norm"] = True
    if kind == "gemma3_text":
      fields.update(norm="gemma_rmsnorm", activation="geglu", post_norms=True, embed_scale=True,
                    attn_scale=float(c.get("query_pre_attn_scalar", 256)) ** -0.5,
                    final_logit_softcap=c.get("final_logit_softcapping"))
    prefix = "model."
  if head == "score":
    # HF's `score` has no bias; ours keeps one at zero, so RM code (normalisation adds a bias)
    # works unchanged and export drops it exactly.
    fields["scalar_head"] = True
  fields["hf_family"] = kind
  eos = c.get("eos_token_id")
  eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
  info = HFInfo(model_type=kind, head=head, weights_prefix=prefix,
                bos_token_id=c.get("bos_token_id"), eos_token_ids=eos,
                pad_token_id=c.get("pad_token_id"))
  return fields, info


# ------------------------------------------------------------------------------------------------
# Export: ModelConfig -> config.json
# ------------------------------------------------------------------------------------------------

def export_family(cfg) -> str:
  """The HF family a resolved ModelConfig exports as: the one it was imported from, else the
  closest one that represents it exactly."""
  if cfg.hf_family:
    return cfg.hf_family
  if cfg.positional == "learned":
    return "gpt2"
  if cfg.norm == "gemma_rmsnorm":
    return "gemma3_text"
  if cfg.qk_norm:
    return "qwen3"
  if cfg.qkv_bias and not cfg.out_bias:
    return "qwen2"
  if cfg.sliding_window:
    return "mistral"
  return "llama"


def _refuse_export(family: str, field: str, value, want) -> HFError:
  return HFError(f"model.{field} = {value!r} cannot be exported as a Hugging Face {family} model "
                 f"(it needs {want})")


def _check_export(cfg, family: str) -> None:
  """Every ModelConfig field that the family cannot express is refused, never dropped."""
  qkv = cfg.use_bias if cfg.qkv_bias is None else cfg.qkv_bias
  out = cfg.use_bias if cfg.out_bias is None else cfg.out_bias
  mlp = cfg.use_bias if cfg.mlp_bias is None else cfg.mlp_bias
  gemma = family == "gemma3_text"
  if family == "gpt2":
    want = dict(norm="layernorm", positional="learned", qk_norm=False, post_norms=False,
                embed_scale=False, sliding_window=None, final_logit_softcap=None,
                explicit_head_dim=None, attn_scale=None)
    if not (qkv and out and mlp):
      raise _refuse_export(family, "use_bias", False, "biases on every projection")
    if cfg.activation not in GPT2_ACTIVATIONS.values():
      raise _refuse_export(family, "activation", cfg.activation, sorted(set(GPT2_ACTIVATIONS.values())))
  else:
    want = dict(norm="gemma_rmsnorm" if gemma else "rmsnorm", positional="rope",
                activation="geglu" if gemma else "swiglu", post_norms=gemma, embed_scale=gemma,
                qk_norm=family in ("qwen3", "gemma3_text"))
    if not gemma:
      want.update(final_logit_softcap=None, attn_scale=None, rope_local_theta=None)
    if family == "qwen2" and not (qkv and not out and not mlp):
      raise _refuse_export(family, "qkv_bias", qkv, "q/k/v biases and no others")
    if family == "mistral" and (qkv or out or mlp):
      raise _refuse_export(family, "use_bias", True, "no biases")
    if family in ("llama", "qwen3", "gemma3_text") and qkv != out:
      raise _refuse_export(family, "qkv_bias", qkv, "the same bias setting as out_bias")
    if family in ("qwen3", "gemma3_text") and mlp:
      raise _refuse_export(family, "mlp_bias", mlp, "no MLP bias")
    if family == "llama" and cfg.sliding_window:
      raise _refuse_export(family, "sliding_window", cfg.sliding_window, "None")
    if family == "mistral" and "g" in cfg.layer_types and cfg.sliding_window:
      raise _refuse_export(family, "layer_types", cfg.layer_types, "every layer local")
  for field, value in want.items():
    if getattr(cfg, field) != value:
      raise _refuse_export(family, field, getattr(cfg, field), repr(value))


def write_config(cfg, *, dtype: str, bos_token_id=None, eos_token_ids=(), pad_token_id=None
                 ) -> dict:
  """config.json for a resolved ModelConfig; refused (HFError) when the family cannot hold it."""
  family = export_family(cfg)
  _check_export(cfg, family)
  arch = {"gpt2": "GPT2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2",
          "qwen3": "Qwen3", "gemma3_text": "Gemma3"}[family]
  if family == "gemma3_text" and cfg.scalar_head:
    arch = "Gemma3Text"
  arch += "ForSequenceClassification" if cfg.scalar_head else (
      "LMHeadModel" if family == "gpt2" else "ForCausalLM")
  eos = list(eos_token_ids)
  c = {"architectures": [arch], "model_type": family, "vocab_size": cfg.vocab_size,
       "tie_word_embeddings": bool(cfg.tie_embeddings), "torch_dtype": dtype,
       "bos_token_id": bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
       "pad_token_id": pad_token_id}
  if cfg.scalar_head:
    c.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  if family == "gpt2":
    act = {v: k for k, v in GPT2_ACTIVATIONS.items() if k != "gelu_pytorch_tanh"}[cfg.activation]
    c.update(n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads,
             n_inner=cfg.mlp_dim, n_positions=cfg.max_len, activation_function=act,
             layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return c
  c.update(hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
           num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
           intermediate_size=cfg.mlp_dim, max_position_embeddings=cfg.max_len,
           rms_norm_eps=cfg.norm_eps, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
           attention_dropout=0.0)
  scaling = None
  if cfg.rope_type == "linear":
    scaling = {"rope_type": "linear", "factor": cfg.rope_factor}
  elif cfg.rope_type == "llama3":
    scaling = {"rope_type": "llama3", "factor": cfg.rope_factor,
               "low_freq_factor": cfg.rope_low_freq_factor,
               "high_freq_factor": cfg.rope_high_freq_factor,
               "original_max_position_embeddings": cfg.rope_original_max_len}
  c["rope_scaling"] = scaling
  qkv = cfg.use_bias if cfg.qkv_bias is None else cfg.qkv_bias
  mlp = cfg.use_bias if cfg.mlp_bias is None else cfg.mlp_bias
  kinds = ["sliding_attention" if k == "l" else "full_attention" for k in cfg.layer_types]
  if family == "llama":
    c.update(hidden_act="silu", attention_bias=qkv, mlp_bias=mlp)
  elif family == "mistral":
    c.update(hidden_act="silu", sliding_window=cfg.sliding_window)
  elif family in ("qwen2", "qwen3"):
    c.update(hidden_act="silu", use_sliding_window=bool(cfg.sliding_window),
             sliding_window=cfg.sliding_window, layer_types=kinds)
    if family == "qwen2":
      c.pop("head_dim")
    else:
      c["attention_bias"] = qkv
  else:
    c.pop("rope_theta")
    c.update(hidden_activation="gelu_pytorch_tanh", attention_bias=qkv,
             query_pre_attn_scalar=_pre_attn_scalar(cfg), sliding_window=cfg.sliding_window,
             layer_types=kinds, final_logit_softcapping=cfg.final_logit_softcap,
             attn_logit_softcapping=None,
             rope_theta=cfg.rope_theta, rope_local_base_freq=cfg.rope_local_theta or cfg.rope_theta)
  return c


def _pre_attn_scalar(cfg):
  scale = cfg.attn_scale or cfg.head_dim ** -0.5
  value = scale ** -2
  return int(round(value)) if abs(value - round(value)) < 1e-6 * value else value
