"""A Hugging Face tokenizer (tokenizer.json) and its chat template, behind gptjax's tokenizer interface.

    tok = HFTokenizer(model_dir)       tok.encode(text), tok.decode(ids), tok.pad_id, tok.eos_id
    ids, mask = tok.render_chat(messages, add_generation_prompt=False)

`encode` treats special-token text literally, as every gptjax tokenizer does (a user who types
"<|im_end|>" does not end a turn); the chat template's own output is encoded with special tokens
recognised, as `transformers.apply_chat_template` does.

The template (from tokenizer_config.json, or chat_template.jinja beside it) is rendered with a
sandboxed jinja2 environment configured as transformers configures its own (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a non-ASCII `tojson`). The SFT loss
mask covers the assistant's tokens: where the template marks them with `{% generation %}`, exactly
those; otherwise the characters each assistant turn adds when the conversation is rendered one
message further (the text after the generation prompt, through the end-of-turn marker).

Pad: the tokenizer's pad token when it has one that is not EOS; else a reserved token whose name
says pad; else the first id past the tokenizer's vocabulary when the model has spare rows; else
the last ordinary token. Pad positions never enter a loss or attention (segment 0), so which id
it is only matters for never being EOS. The choice is printed.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime

from gptjax.hf.configs import HFError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
_GEN_OPEN, _GEN_CLOSE = "\ue000gptjax-gen[", "]gptjax-gen\ue001"   # private-use sentinels


def _token_text(entry):
  if isinstance(entry, dict):
    return entry.get("content")
  return entry


class HFTokenizer:
  kind = "hf"

  def __init__(self, directory: str, *, model_vocab_size: int | None = None,
               pad_id: int | None = None, quiet: bool = False):
    from tokenizers import Tokenizer
    self.directory = directory
    path = os.path.join(directory, "tokenizer.json")
    try:
      self._tok = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
      raise HFError(f"tokenizer.json: cannot be read by the tokenizers library ({e})") from None
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    self.config = {}
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        self.config = json.load(f)
    gen_path = os.path.join(directory, "generation_config.json")
    gen = {}
    if os.path.exists(gen_path):
      with open(gen_path) as f:
        gen = json.load(f)
    self.chat_template = self._template()
    self.special_ids = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()
                        if t.special}
    vocab = self._tok.get_vocab_size(with_added_tokens=True)
    self.vocab_size = vocab

    def lookup(field):
      text = _token_text(self.config.get(field))
      return None if text is None else self._tok.token_to_id(text)

    self.bos_id = lookup("bos_token")
    self.eos_id = lookup("eos_token")
    if self.eos_id is None:
      eos = gen.get("eos_token_id")
      self.eos_id = eos[0] if isinstance(eos, list) else eos
    if self.eos_id is None:
      raise HFError("tokenizer_config.json: field 'eos_token' is missing and "
                    "generation_config.json names no eos_token_id; a model must be able to stop")
    stops = gen.get("eos_token_id", [])
    stops = stops if isinstance(stops, list) else [stops]
    self.stop_ids = tuple(dict.fromkeys([self.eos_id] + [int(s) for s in stops]))
    self.pad_id, self.pad_note = (pad_id, None) if pad_id is not None else self._pick_pad(
        model_vocab_size)
    if self.pad_note and not quiet:
      print(f"tokenizer: {self.pad_note}", flush=True)

  # -- the gptjax tokenizer interface --------------------------------------------------------

  def encode(self, text: str) -> list[int]:
    self._tok.encode_special_tokens = True
    try:
      return self._tok.encode(text, add_special_tokens=False).ids
    finally:
      self._tok.encode_special_tokens = False

  def encode_with_specials(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids if int(i) != self.pad_id],
                            skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i)) or ""

  def token_bytes(self) -> list[bytes | None]:
    """The bytes each id spells, for constrained decoding; None for special tokens. Read from
    the tokenizer's decoder: byte-level BPE (GPT-2, Qwen) through the byte alphabet; pieces with
    `▁` for a space and `<0xNN>` byte fallback (LLaMA, Gemma) by its Replace / Metaspace /
    ByteFallback steps. Other decoders (WordPiece's `##`) are not supported."""
    import re
    from gptjax import constraints
    dec = json.loads(self._tok.to_str()).get("decoder") or {}
    steps = dec.get("decoders", []) if dec.get("type") == "Sequence" else [dec]
    kinds = {d.get("type") for d in steps}
    unknown = kinds - {"ByteLevel", "Replace", "Metaspace", "ByteFallback", "Fuse", "Strip", None}
    if unknown:
      raise ValueError(f"{self.directory}: constrained decoding cannot tell what bytes the tokens "
                       f"of a {'/'.join(sorted(unknown))} decoder spell")
    alphabet = constraints.byte_level_alphabet() if "ByteLevel" in kinds else None
    added = self._tok.get_added_tokens_decoder()
    out: list[bytes | None] = []
    for i in range(self.vocab_size):
      piece = self._tok.id_to_token(i)
      if piece is None or (i in added and added[i].special):
        out.append(None)
      elif i in added:
        out.append(added[i].content.encode())       # matched and decoded literally
      elif alphabet is not None:
        out.append(bytes(alphabet[ch] for ch in piece) if all(ch in alphabet for ch in piece)
                   else None)
      elif "ByteFallback" in kinds and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
        out.append(bytes([int(piece[3:5], 16)]))
      else:
        for d in steps:
          if d.get("type") == "Replace":
            pattern = d.get("pattern", {}).get("String")
            if pattern is not None:
              piece = piece.replace(pattern, d.get("content", ""))
          elif d.get("type") == "Metaspace":
            piece = piece.replace(d.get("replacement", "\u2581"), " ")
        out.append(piece.encode())
    return out

  def save(self, directory: str) -> str:
    """Copies the HF files into `directory/hf_tokenizer/` and writes gptjax's tokenizer.json
    pointing there (with the pad id, so a reload never picks another)."""
    target = os.path.join(directory, "hf_tokenizer")
    self.save_hf(target)
    path = os.path.join(directory, "tokenizer.json")
    with open(path, "w") as f:
      json.dump({"kind": "hf", "dir": "hf_tokenizer", "pad_id": self.pad_id}, f)
    return path

  def save_hf(self, directory: str) -> None:
    """The HF tokenizer files as they came, for transformers (export)."""
    os.makedirs(directory, exist_ok=True)
    for name in TOKENIZER_FILES:
      src = os.path.join(self.directory, name)
      if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(
          os.path.join(directory, name)):
        shutil.copyfile(src, os.path.join(directory, name))

  # -- pad ------------------------------------------------------------------------------------

  def _pick_pad(self, model_vocab_size):
    eos = set(self.stop_ids)
    pad = _token_text(self.config.get("pad_token"))
    pad_id = None if pad is None else self._tok.token_to_id(pad)
    if pad_id is not None and pad_id not in eos:
      return pad_id, None
    why = "its pad token is EOS" if pad_id is not None else "it has no pad token"
    for text, i in sorted(self.special_ids.items(), key=lambda kv: kv[1]):
      if "pad" in text.lower() and i not in eos:
        return i, f"{why}; using the reserved token {text!r} (id {i}) as pad, never EOS"
    if model_vocab_size and model_vocab_size > self.vocab_size:
      i = self.vocab_size
      return i, (f"{why}; using id {i}, an embedding row past the tokenizer's vocabulary, "
                 "as pad (never EOS)")
    specials = set(self.special_ids.values()) | eos
    i = next(j for j in range(self.vocab_size - 1, -1, -1) if j not in specials)
    return i, (f"{why}; using the ordinary token {self.id_to_piece(i)!r} (id {i}) as pad "
               "(never EOS; pad positions are masked out of attention and every loss)")

  # -- chat template --------------------------------------------------------------------------

  def _template(self):
    template = self.config.get("chat_template")
    jinja_file = os.path.join(self.directory, "chat_template.jinja")
    if template is None and os.path.exists(jinja_file):
      with open(jinja_file) as f:
        template = f.read()
    if isinstance(template, list):     # named templates: the default one serves chat
      named = {t.get("name"): t.get("template") for t in template}
      if "default" not in named:
        raise HFError("tokenizer_config.json: field 'chat_template' lists templates "
                      f"{sorted(named)} but none named 'default'")
      template = named["default"]
    return template

  def _environment(self):
    import jinja2
    from jinja2 import ext, nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(ext.Extension):
      """`{% generation %}…{% endgeneration %}` wraps its output in sentinels; render_chat
      turns them into character spans."""
      tags = {"generation"}

      def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_wrap"), [], [], body).set_lineno(lineno)

      def _wrap(self, caller):
        return _GEN_OPEN + caller() + _GEN_CLOSE

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, \
        sort_keys=False: json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                    separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env

  def render_text(self, messages, *, add_generation_prompt: bool = False,
                  keep_sentinels: bool = False) -> str:
    if not self.chat_template:
      raise HFError(f"{self.directory}: tokenizer_config.json has no 'chat_template'; a chat "
                    "stage needs one (use a base model's text stages, or add a template)")
    if not hasattr(self, "_compiled"):
      self._compiled = self._environment().from_string(self.chat_template)
    names = {k: _token_text(self.config.get(k)) for k in
             ("bos_token", "eos_token", "pad_token", "unk_token")}
    text = self._compiled.render(messages=[dict(m) for m in messages],
                                 add_generation_prompt=add_generation_prompt,
                                 **{k: v for k, v in names.items() if v is not None})
    if not keep_sentinels:
      text = text.replace(_GEN_OPEN, "").replace(_GEN_CLOSE, "")
    return text

  def render_chat(self, messages, *, add_generation_prompt: bool = False):
    """(ids, loss_mask) for a conversation; see the module docstring for the mask."""
    marked = self.render_text(messages, add_generation_prompt=add_generation_prompt,
                              keep_sentinels=True)
    spans, text, pos = [], [], 0
    for i, piece in enumerate(marked.split(_GEN_OPEN)):
      if i == 0:
        text.append(piece)
        pos += len(piece)
        continue
      inside, _, after = piece.partition(_GEN_CLOSE)
      spans.append((pos, pos + len(inside)))
      text += [inside, after]
      pos += len(inside) + len(after)
    text = "".join(text)
    if not spans:
      spans = self._incremental_spans(messages, text)
    enc = self._tok.encode(text, add_special_tokens=False)
    mask = [int(any(s <= a < e for s, e in spans)) if b > a else 0 for a, b in enc.offsets]
    return enc.ids, mask

  def _incremental_spans(self, messages, text):
    spans = []
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      before = self.render_text(messages[:i], add_generation_prompt=True) if i else ""
      through = self.render_text(messages[:i + 1])
      if not (text.startswith(through) and through.startswith(before)):
        raise HFError(f"{self.directory}: the chat template renders earlier turns differently "
                      f"once message {i} is added, so the assistant tokens cannot be found by "
                      "rendering one message at a time; mark them with {% generation %}")
      spans.append((len(before), len(through)))
    return spans
