"""Stage 4: RL from feedback with PPO or GRPO (cfg.stage in 'rl', 'ppo', 'grpo'; the loss name picks
the algorithm), plus `evaluate_policy`, the held-out evaluation every aligned policy gets.

    gptjax train --config experiments/rl.py:ppo_tiny --workdir runs/ppo \
        --config.train.init_from=runs/sft --config.rl.reward_workdir=runs/reward

The runner builds the policy (with a value head, or beside a critic initialised from the RM), the
frozen reference (the initial policy: `train.init_from`, else the fresh init), the reward (the RM
or a Python function on text) and a `RolloutSource`, then hands them to the one training loop.
Training runs `rl.iterations` iterations of `epochs × rollout_batch / train.batch_size` steps.
At the end it evaluates the policy on held-out prompts and writes `<workdir>/eval.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptjax import checkpoint as ckpt_lib
from gptjax import config as config_lib
from gptjax import lora
from gptjax import metrics as metrics_lib
from gptjax import sampling
from gptjax import sharding as shd
from gptjax import trainer
from gptjax.data import chat, tokenizers
from gptjax.model import GPT
from gptjax.rl import kl as kl_lib
from gptjax.rl import rollout as rollout_lib
from gptjax.stages import common

ALGORITHMS = ("ppo", "grpo")


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Models, reference and reward
# --------------------------------------------------------------------------------------------

def _workdir_model_cfg(workdir: str, *, scalar_head: bool):
  prev = config_lib.from_json(os.path.join(workdir, "config.json"))
  return dataclasses.replace(config_lib.model_config(prev), scalar_head=scalar_head)


def build_model(cfg):
  """The trained model: GPT (+ value head) or ActorCritic, from `rl.value_model`."""
  mcfg = config_lib.model_config(cfg)
  vm = cfg.rl.value_model
  if vm == "critic":
    rm_dir = cfg.rl.reward_workdir
    critic_cfg = (_workdir_model_cfg(rm_dir, scalar_head=True) if rm_dir
                  else dataclasses.replace(mcfg, scalar_head=True))
    model = rollout_lib.ActorCritic(dataclasses.replace(mcfg, scalar_head=False), critic_cfg)
  else:
    model = GPT(dataclasses.replace(mcfg, scalar_head=(vm == "head")))
  return lora.wrap(model, lora.spec_from_config(cfg))


def make_init_from(cfg, model):
  """fresh params -> initial params: the policy from `train.init_from` (SFT), the critic (if any)
  from the reward model's workdir. None when there is nothing to load."""
  sft, rm = cfg.train.init_from, cfg.rl.reward_workdir
  critic = isinstance(model, rollout_lib.ActorCritic)
  head = not critic and model.cfg.scalar_head
  if not sft and not (critic and rm) and not head:
    return None

  def init_from(fresh):
    if critic:
      return {"policy": ckpt_lib.init_from_workdir(sft, fresh["policy"]) if sft
              else fresh["policy"],
              "critic": ckpt_lib.init_from_workdir(rm, fresh["critic"]) if rm
              else fresh["critic"]}
    params = ckpt_lib.init_from_workdir(sft, fresh) if sft else fresh
    if not head:                 # GRPO: no critic, nothing to zero
      return params
    # A fresh value head starts at zero: a random projection of the trunk would put O(1) noise
    # into every early advantage (the scores are much smaller), drowning the policy signal until
    # the critic catches up.
    return {**params, "scalar_head": jax.tree.map(jnp.zeros_like, params["scalar_head"])}
  return init_from


def initial_params(cfg, model, mesh, init_params, init_from):
  """Recomputes the run's initial parameters exactly as the trainer builds them (same key, same
  init_from), so the reference is the starting policy whether or not the run is resuming."""
  rng = jax.random.fold_in(jax.random.key(cfg.seed), 0)
  boxed = jax.eval_shape(init_params, rng)
  sh = shd.logical_to_sharding(boxed, mesh, shd.rules_from_config(cfg.mesh.rules))
  params = jax.jit(lambda r: nn.meta.unbox(init_params(r)), out_shardings=sh)(rng)
  return init_from(params) if init_from is not None else params


def make_scorer(cfg):
  spec = cfg.rl.reward
  if spec == "rm":
    if not cfg.rl.reward_workdir:
      raise config_lib.ConfigError("rl.reward='rm' needs rl.reward_workdir (the reward stage)")
    # The reward stage's scorer reads the score at the last real token and adds its
    # normalisation bias, exactly as the RM was evaluated.
    from gptjax.stages import reward as reward_stage
    return rollout_lib.TokenScorer(reward_stage.load_reward_model(cfg.rl.reward_workdir))
  return rollout_lib.TextScorer(rollout_lib.make_reward_fn(spec))


def rollout_config(cfg) -> rollout_lib.RolloutConfig:
  r = cfg.rl
  return rollout_lib.RolloutConfig(
      algorithm=cfg.loss.name, prompts_per_iteration=r.prompts_per_iteration,
      group_size=r.group_size, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
      epochs=r.epochs, minibatch_size=cfg.train.batch_size, kl_estimator=r.kl_estimator,
      gamma=r.gamma, lam=r.lam, whiten_advantages=r.whiten_advantages,
      whiten_rewards=r.whiten_rewards, missing_eos_penalty=r.missing_eos_penalty,
      normalize_scores=r.normalize_scores, scale_by_std=r.scale_by_std, group_eps=r.group_eps,
      filter_zero_spread=r.filter_zero_spread, old_logp=r.old_logp, seed=cfg.seed)


def bind_policy_loss(cfg):
  """The registered loss with its config fields, plus the fields the loss must share with the
  rollouts (temperature; GRPO's β and length normaliser), taken from `rl` so they cannot differ."""
  kw = config_lib.loss_kwargs(cfg)
  for shared in ("temperature", "kl_coef", "max_len"):
    if shared in kw:
      raise config_lib.ConfigError(f"loss.{shared}: set it under rl (rl.temperature, "
                                   "rl.kl_coef, rl.max_new_tokens); the loss reads it from there")
  shared = {"temperature": cfg.rl.temperature}
  if cfg.loss.name == "grpo":
    shared.update(kl_coef=cfg.rl.kl_coef, max_len=cfg.rl.max_new_tokens)
  # common.bind_loss checks the loss.* fields by name and runs the loss's registered check.
  return functools.partial(common.bind_loss(cfg), **shared)


def check_no_dropout(cfg) -> None:
  """The policy losses (PPO, GRPO, DPO) run the network deterministically: a dropout mask would
  make the ratio to the old and reference log-probs differ from 1 with no change of parameters.
  So a dropout rate here would be silently unused; say so instead."""
  if cfg.model.dropout_rate:
    raise config_lib.ConfigError(
        f"model.dropout_rate: {cfg.model.dropout_rate} given, but the {cfg.loss.name} loss runs "
        "without dropout (its log-prob ratios must be 1 at unchanged parameters); set it to 0")


def validate(cfg) -> None:
  if cfg.loss.name not in ALGORITHMS:
    raise config_lib.ConfigError(f"loss.name: RL stages train 'ppo' or 'grpo', got "
                                 f"{cfg.loss.name!r}")
  if cfg.stage in ALGORITHMS and cfg.stage != cfg.loss.name:
    raise config_lib.ConfigError(f"stage {cfg.stage!r} does not match loss.name "
                                 f"{cfg.loss.name!r}")
  check_no_dropout(cfg)
  vm = cfg.rl.value_model
  if vm not in ("head", "critic", "none"):
    raise config_lib.ConfigError(f"rl.value_model: expected head, critic or none, got {vm!r}")
  if cfg.loss.name == "ppo" and vm == "none":
    raise config_lib.ConfigError("rl.value_model: PPO needs a value model (head or critic)")
  if cfg.loss.name == "grpo" and cfg.rl.kl_adaptive:
    raise config_lib.ConfigError("rl.kl_adaptive: GRPO's β is a fixed loss coefficient")
  if cfg.rl.prompt_len + cfg.rl.max_new_tokens > cfg.model.max_len:
    raise config_lib.ConfigError(
        f"rl.prompt_len + rl.max_new_tokens = {cfg.rl.prompt_len + cfg.rl.max_new_tokens} "
        f"exceeds model.max_len={cfg.model.max_len}")


def inherit_model_config(cfg) -> None:
  """With `train.init_from`, the policy IS that run's network: take its architecture (the value
  head and how the network is run stay this config's), so an RL preset never disagrees with the
  SFT it starts from. Lengths that no longer fit its max_len are shortened, with a message."""
  if not cfg.train.init_from:
    return
  common.adopt_architecture(cfg, cfg.train.init_from)
  with cfg.unlocked():
    max_len = int(cfg.model.max_len)
    if "rl" in cfg and cfg.rl.prompt_len + cfg.rl.max_new_tokens > max_len:
      new = max(max_len - cfg.rl.max_new_tokens, 8)
      print(f"rl.prompt_len: {cfg.rl.prompt_len} + rl.max_new_tokens {cfg.rl.max_new_tokens} "
            f"exceeds the policy's max_len {max_len}; using prompt_len={new}", flush=True)
      cfg.rl.prompt_len = new
      cfg.rl.max_new_tokens = min(cfg.rl.max_new_tokens, max_len - new)
    if cfg.data.seq_len > max_len:
      print(f"data.seq_len: {cfg.data.seq_len} exceeds the policy's max_len {max_len}; using "
            f"{max_len}", flush=True)
      cfg.data.seq_len = max_len


def _tokenizer(cfg, workdir, messages):
  """The policy's tokenizer: the workdir's (resume), `data.tokenizer`, or for 'char' with an
  init_from run, that run's (so ids match the SFT model); else a char vocabulary for tests."""
  if (cfg.data.tokenizer == "char" and cfg.train.init_from and
      not os.path.exists(os.path.join(workdir, tokenizers.TOKENIZER_FILE))):
    tok = tokenizers.load_tokenizer(cfg.train.init_from)
    if jax.process_index() == 0:
      tok.save(workdir)
    return tok
  # Tests: a vocabulary of the prompts' characters only, so a random policy's rewards are dense.
  text = "".join(m[-1]["content"] for m in messages)
  return common.resolve_tokenizer(cfg, workdir, build_char_from=text)


def run(cfg, workdir: str, *, progress: bool = True) -> trainer.TrainResult:
  inherit_model_config(cfg)
  validate(cfg)
  os.makedirs(workdir, exist_ok=True)
  train_msgs = prompt_messages(cfg, "train")
  tok = _tokenizer(cfg, workdir, train_msgs)
  common.fill_vocab_size(cfg, tok)
  with cfg.unlocked():
    # Recorded so `load_policy` (and load_for_inference) rebuild the same network.
    cfg.model.scalar_head = cfg.rl.value_model == "head"
  env = common.make_env(cfg)
  model = build_model(cfg)
  init_params = common.init_params_fn(model)
  init_from = make_init_from(cfg, model)
  ref_full = initial_params(cfg, model, env.mesh, init_params, init_from)
  # With LoRA the reference is the base with the adapters off, read from the same buffers the
  # trainer keeps frozen (ref_full is handed to it as base_params): one copy of the base.
  ref_model, ref_params = lora.reference(*rollout_lib.policy_view(model, ref_full))

  prompts, lengths, texts = encode_prompts(train_msgs, tok, cfg.rl.prompt_len)
  rcfg = rollout_config(cfg)
  controller = kl_lib.make_controller(beta=cfg.rl.kl_coef, adaptive=cfg.rl.kl_adaptive,
                                      target=cfg.rl.kl_target, horizon=cfg.rl.kl_horizon)
  if cfg.loss.name == "grpo":
    # β lives in the GRPO loss; the controller only reports it (rl/beta, rl/rlhf_reward).
    controller = kl_lib.make_controller(beta=cfg.rl.kl_coef)
  gold = rollout_lib.make_reward_fn("gold") if cfg.rl.log_gold else None
  source = rollout_lib.RolloutSource(
      model=model, ref_params=ref_params, ref_model=ref_model, prompts=prompts, prompt_lengths=lengths,
      prompt_texts=texts, tokenizer=tok, scorer=make_scorer(cfg), cfg=rcfg,
      controller=controller, eos_ids=chat.reply_stop_ids(tok), mesh=env.mesh, gold_fn=gold,
      log_path=os.path.join(workdir, "rl_iterations.jsonl"))
  steps = cfg.rl.iterations * rcfg.steps_per_iteration

  def sample(state):
    pol, pp = rollout_lib.policy_view(model, state.params)
    msgs = train_msgs[:4]
    outs = common.sample_prompts(pol, pp, tok, [], seed=cfg.seed,
                                 max_new_tokens=cfg.rl.max_new_tokens,
                                 temperature=cfg.rl.temperature, eos_ids=chat.reply_stop_ids(tok),
                                 prompt_ids=[chat.render_prompt(m, tok) for m in msgs])
    return "\n---\n".join(f"{m[-1]['content']} => {o}" for m, o in zip(msgs, outs))

  res = trainer.train(
      cfg, workdir=workdir, model=model, loss_fn=bind_policy_loss(cfg), source=source,
      mesh=env.mesh, init_params=init_params, init_from=init_from, sample=sample,
      tokens_per_step=cfg.train.batch_size * (cfg.rl.prompt_len + cfg.rl.max_new_tokens - 1),
      steps=steps, progress=progress,
      base_params=ref_full if lora.spec_from_config(cfg) is not None else None)
  res.timings["rollout_s"] = source.timings["rollout_s"]
  if cfg.rl.eval_prompts and not res.interrupted:
    # Every process runs the evaluation (its jitted programs span all of them); only process 0
    # writes the files.
    pol, pp = rollout_lib.policy_view(model, res.state.params)
    evaluate_policy((pol, pp, tok), prompts=prompt_messages(cfg, cfg.rl.eval_split),
                    reference=(lora.base_model(ref_model), ref_params), max_new_tokens=cfg.rl.max_new_tokens,
                    temperature=cfg.rl.eval_temperature, prompt_len=cfg.rl.prompt_len,
                    seed=cfg.seed, out_dir=workdir, label=cfg.loss.name, scorer=source.scorer)
  return res


# --------------------------------------------------------------------------------------------
# Evaluation on held-out prompts
# --------------------------------------------------------------------------------------------

def load_policy(workdir: str, step: int | None = None):
  """(GPT, params, tokenizer) of any stage's policy: a plain GPT run, or an RL run whose params
  are {'policy', 'critic'} (only the policy is read)."""
  cfg = config_lib.from_json(os.path.join(workdir, "config.json"))
  mcfg = config_lib.model_config(cfg)
  model = GPT(mcfg)
  abstract = jax.eval_shape(lambda: nn.meta.unbox(
      model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
  critic = cfg.get("rl", {}).get("value_model") == "critic"
  target = {"policy": abstract} if critic else abstract
  params = ckpt_lib.restore_params(workdir, target, step)
  return model, (params["policy"] if critic else params), tokenizers.load_tokenizer(workdir)


def distinct_n(texts, n: int = 2) -> float:
  """Distinct n-grams over all n-grams of whitespace words, pooled over the samples."""
  grams, total = set(), 0
  for t in texts:
    w = t.split()
    for i in range(len(w) - n + 1):
      grams.add(tuple(w[i:i + n]))
      total += 1
  return len(grams) / total if total else 0.0


def _as_policy(p):
  if isinstance(p, str):
    return load_policy(p)
  return p


def evaluate_policy(policy, *, prompts, reference=None, max_new_tokens: int = 32,
                    temperature: float = 0.7, prompt_len: int = 32, seed: int = 1234,
                    best_of: int = 1, scorer=None, batch_size: int = 64,
                    out_dir: str | None = None, label: str = "", num_samples: int = 16,
                    progress: str = "") -> dict:
  """Samples one reply per held-out prompt and measures it against the gold labeler.

  policy, reference: a workdir or (model, params[, tokenizer]); the reference (SFT) gives the
  KL estimate E[Σ_t log π − log π_ref] over the policy's own samples at `temperature`.
  best_of > 1 draws that many replies per prompt and keeps the one `scorer` (e.g. the RM's
  RewardScorer via rollout.TokenScorer) likes best; its KL to the sampler is the analytic log n − (n−1)/n.
  With a scorer, the kept replies' mean score is reported too (`proxy_mean`: the RM's view beside
  the gold's, which is how over-optimisation shows).
  With several processes and networks whole on each, every process samples its share of the
  prompt batches (a scorer follows if it is a TextScorer or has `with_params`, as TokenScorer does).
  Returns {gold_mean, gold_se, kl_to_ref, distinct_2, eos_fraction, n, [proxy_mean, proxy_se,]
  ...} and, with out_dir,
  writes <out_dir>/eval.json (the metrics and `num_samples` samples) and eval_samples.jsonl (all).
  """
  from gptjax import labeler
  model, params, tok = _as_policy(policy)[:3]
  ref = _as_policy(reference) if reference is not None else None
  if best_of > 1 and scorer is None:
    raise ValueError("evaluate_policy: best_of > 1 needs a scorer to pick the best reply")
  ids, lengths, texts = encode_prompts([chat.as_messages(p) if isinstance(p, str) else p
                                        for p in prompts], tok, prompt_len)
  eos = chat.reply_stop_ids(tok)
  key = jax.random.key(seed)
  starts = list(range(0, len(ids), batch_size))

  def one_batch(networks, b):
    """Completion ids, mask and KL of the kept reply of each prompt in batch b, padded to
    `batch_size` rows so every batch has one shape; `n` says how many rows are real."""
    params, ref_params, scorer_params = networks
    scorer_b = scorer if scorer_params is None else scorer.with_params(scorer_params)
    start = starts[b]
    rows = np.repeat(np.arange(start, min(start + batch_size, len(ids))), best_of)
    out = sampling.generate(model, params, jnp.asarray(ids[rows]), jnp.asarray(lengths[rows]),
                            rng=jax.random.fold_in(key, start), max_new_tokens=max_new_tokens,
                            temperature=temperature, eos_ids=eos, pad_id=tok.pad_id)
    comp, mask = shd.to_host(out.completion), shd.to_host(out.completion_mask)
    pick = np.arange(len(rows))
    kl = np.zeros(len(rows), np.float32)
    s = np.zeros(len(rows), np.float32)
    if scorer_b is not None:
      outs = [tok.decode([t for t, m in zip(r, mr) if m > 0 and t not in eos])
              for r, mr in zip(comp, mask)]
      s = np.asarray(scorer_b(tokens=out.tokens, total_lengths=out.total_lengths,
                              prompt_texts=[texts[i] for i in rows], completion_texts=outs),
                     np.float32)
    if best_of > 1:
      pick = np.arange(0, len(rows), best_of) + np.argmax(s.reshape(-1, best_of), axis=1)
      kl = np.zeros(len(pick), np.float32)          # analytic for best-of-n: set below
    elif ref_params is not None:
      lp = sampling.completion_logprobs(model, params, out, temperature=temperature)
      lr = sampling.completion_logprobs(ref[0], ref_params, out, temperature=temperature)
      kl = shd.to_host(jnp.sum(lp - lr, axis=1)).astype(np.float32)
    pad = batch_size - len(pick)
    if bar is not None:
      bar.update(1)
    return {"comp": np.pad(comp[pick], ((0, pad), (0, 0))),
            "mask": np.pad(mask[pick], ((0, pad), (0, 0))),
            "kl": np.pad(kl, (0, pad)), "proxy": np.pad(s[pick], (0, pad)),
            "n": np.int32(len(pick))}

  # A scorer can follow a split over processes if it computes in Python (TextScorer) or can be
  # handed this process's copy of its network (TokenScorer.with_params); any other runs every
  # batch jointly. A batch's key depends on its index only, so a split equals one process.
  text_scorer = scorer is None or isinstance(scorer, rollout_lib.TextScorer)
  movable = text_scorer or hasattr(scorer, "with_params")
  scorer_params = scorer.params if movable and not text_scorer else None
  bar = metrics_lib.batch_bar(progress, len(starts))
  batches = shd.map_batches(
      one_batch, len(starts), (params, ref[1] if ref is not None else None, scorer_params),
      splittable=movable)
  if bar is not None:
    bar.close()
  replies, kls, has_eos, proxy = [], [], [], []
  for r in batches:
    comp, mask = r["comp"][:r["n"]], r["mask"][:r["n"]]
    replies += [tok.decode([t for t, m in zip(row, mrow) if m > 0 and t not in eos])
                for row, mrow in zip(comp, mask)]
    has_eos += list(np.any(np.isin(comp, eos) & (mask > 0), axis=1))
    kls += list(r["kl"][:r["n"]])
    proxy += list(r["proxy"][:r["n"]])
  if best_of > 1:
    # Best-of-n's KL to its sampler is the analytic log n − (n−1)/n per prompt (see above).
    kls = [np.log(best_of) - (best_of - 1) / best_of] * len(replies)
  elif ref is None:
    kls = []                             # no reference: no KL to report
  gold = labeler.gold_score(replies)
  res = {
      "label": label, "n": len(replies),
      "gold_mean": float(gold.mean()),
      "gold_se": float(gold.std(ddof=1) / np.sqrt(len(gold))) if len(gold) > 1 else 0.0,
      "kl_to_ref": float(np.mean(kls)) if kls else None,
      "distinct_2": distinct_n(replies, 2),
      "eos_fraction": float(np.mean(has_eos)),
      "mean_length": float(np.mean([len(r) for r in replies])),
      "best_of": best_of, "temperature": temperature, "max_new_tokens": max_new_tokens,
  }
  if scorer is not None:
    proxy = np.asarray(proxy, np.float64)
    res["proxy_mean"] = float(proxy.mean())
    res["proxy_se"] = float(proxy.std(ddof=1) / np.sqrt(len(proxy))) if len(proxy) > 1 else 0.0
  samples = [{"prompt": p, "reply": r, "gold": float(g), "ended": bool(e)}
             for p, r, g, e in zip(texts, replies, gold, has_eos)]
  if scorer is not None:
    for s, x in zip(samples, proxy):
      s["proxy"] = float(x)
  if out_dir and jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
      json.dump({**res, "samples": samples[:num_samples]}, f, indent=2)
    with open(os.path.join(out_dir, "eval_samples.jsonl"), "w") as f:
      for s in samples:
        f.write(json.dumps(s) + "\n")
  return {**res, "samples": samples[:num_samples]}
