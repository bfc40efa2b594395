"""Stage 4: RL from feedback with any online objective (PPO, GRPO, RLOO, REINFORCE++, GSPO, or one
you register; `loss.name` picks it, and its `Objective` says what to build: a critic, groups of
samples, where the KL goes). The held-out evaluation every aligned policy gets is `evaluation.evaluate_policy`.

    gptjax train --config experiments/rl.py:ppo_tiny --workdir runs/ppo \
        --config.train.init_from=runs/sft --config.rl.reward_workdir=runs/reward

The runner builds the policy (with a value head, or beside a critic initialised from the RM), the
frozen reference (the initial policy: `train.init_from`, else the fresh init), the reward (the RM
or a Python function on text) and a `RolloutSource`, then hands them to the one training loop.
Training runs `rl.iterations` iterations of `epochs × rollout_batch / train.batch_size` steps.
At the end it evaluates the policy on held-out prompts and writes `<workdir>/eval.json`.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from gptjax import config as config_lib
from gptjax import lora
from gptjax import sampling
from gptjax import trainer
from gptjax import evaluation
from gptjax import objectives
from gptjax import reward_model
from gptjax.data import chat, dialogue
from gptjax.model import GPT
from gptjax.rl import kl as kl_lib
from gptjax.rl import rollout as rollout_lib
from gptjax.stages import common

# --------------------------------------------------------------------------------------------
# Models, reference and reward
# --------------------------------------------------------------------------------------------

# The trained model (GPT with or without a value head, or an actor-critic), built in the library
# so that a LoRA workdir's loader builds the same one.
build_model = rollout_lib.build_model


def make_scorer(cfg):
  return reward_model.make_scorer(cfg.rl.reward, cfg.rl.reward_workdir)


def rollout_config(cfg) -> rollout_lib.RolloutConfig:
  r = cfg.rl
  return rollout_lib.RolloutConfig(
      objective=objectives.for_stage(cfg), prompts_per_iteration=r.prompts_per_iteration,
      group_size=r.group_size, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
      epochs=r.epochs, minibatch_size=cfg.train.batch_size, kl_estimator=r.kl_estimator,
      gamma=r.gamma, lam=r.lam, whiten_advantages=r.whiten_advantages,
      whiten_rewards=r.whiten_rewards, whiten_unbiased=r.get("whiten_unbiased", False),
      missing_eos_penalty=r.missing_eos_penalty, normalize_scores=r.normalize_scores,
      scale_by_std=r.scale_by_std, scale_rewards=r.get("scale_rewards", "group"),
      group_eps=r.group_eps, filter_zero_spread=r.filter_zero_spread, old_logp=r.old_logp,
      seed=cfg.seed, rollout_engine=r.get("rollout_engine", False),
      engine_slots=r.get("engine_slots", 0))


# The loss hyperparameters an objective may share with the rollouts, and the rl field each is
# read from, so the sampler and the loss can never disagree.
SHARED_FIELDS = {"temperature": "temperature", "kl_coef": "kl_coef", "max_len": "max_new_tokens"}


def bind_policy_loss(cfg):
  """The registered loss with its config fields, plus the fields the objective shares with the
  rollouts (`Objective.shared`: the temperature; GRPO's β and length normaliser), from `rl`."""
  objective = objectives.for_stage(cfg)
  kw = config_lib.loss_kwargs(cfg)
  for name in objective.shared:
    if name in kw:
      raise config_lib.ConfigError(
          f"loss.{name}: set it as rl.{SHARED_FIELDS[name]}; the {objective.name} loss reads it "
          "from there")
  shared = {name: cfg.rl[SHARED_FIELDS[name]] for name in objective.shared}
  # common.bind_loss checks the loss.* fields by name and runs the loss's registered check.
  return functools.partial(common.bind_loss(cfg), **shared)


def validate(cfg) -> None:
  objective = objectives.for_stage(cfg)
  if not objective.online:
    raise config_lib.ConfigError(
        f"loss.name: the RL stage trains an online objective "
        f"({', '.join(o.name for o in objectives.registered() if o.online)}), got "
        f"{cfg.loss.name!r}")
  if cfg.stage in objectives.names() and cfg.stage != cfg.loss.name:
    raise config_lib.ConfigError(f"stage {cfg.stage!r} does not match loss.name "
                                 f"{cfg.loss.name!r}")
  common.check_no_dropout(cfg)
  vm = cfg.rl.value_model
  if vm not in ("head", "critic", "none"):
    raise config_lib.ConfigError(f"rl.value_model: expected head, critic or none, got {vm!r}")
  if "critic" in objective.needs and vm == "none":
    raise config_lib.ConfigError(f"rl.value_model: {objective.name} needs a value model (head "
                                 "or critic)")
  if objective.kl == "loss" and cfg.rl.kl_adaptive:
    raise config_lib.ConfigError(f"rl.kl_adaptive: {objective.name}'s β is a fixed loss "
                                 "coefficient")
  if cfg.rl.prompt_len + cfg.rl.max_new_tokens > cfg.model.max_len:
    raise config_lib.ConfigError(
        f"rl.prompt_len + rl.max_new_tokens = {cfg.rl.prompt_len + cfg.rl.max_new_tokens} "
        f"exceeds model.max_len={cfg.model.max_len}")


def run(cfg, workdir: str, *, progress: bool = True) -> trainer.TrainResult:
  os.makedirs(workdir, exist_ok=True)
  tok = common.start_from_previous(cfg, workdir)
  validate(cfg)
  train_msgs = dialogue.prompt_messages(cfg, "train")
  if tok is None:
    # Tests: a vocabulary of the prompts' characters only, so a random policy's rewards are dense.
    tok = common.resolve_tokenizer(cfg, workdir, build_char_from="".join(
        m[-1]["content"] for m in train_msgs))
  common.fill_vocab_size(cfg, tok)
  with cfg.unlocked():
    # Recorded so `checkpoint.load_for_inference` rebuilds the same network.
    cfg.model.scalar_head = cfg.rl.value_model == "head"
  env = common.make_env(cfg)
  model = build_model(cfg)
  init_params = common.init_params_fn(model)
  init_from = rollout_lib.make_init_from(cfg, model)
  ref_full = common.initial_params(cfg, model, env.mesh, init_params, init_from)
  # With LoRA the reference is the base with the adapters off, read from the same buffers the
  # trainer keeps frozen (ref_full is handed to it as base_params): one copy of the base.
  ref_model, ref_params = lora.reference(*rollout_lib.policy_view(model, ref_full))

  prompts, lengths, texts = dialogue.encode_prompts(train_msgs, tok, cfg.rl.prompt_len)
  rcfg = rollout_config(cfg)
  if rcfg.objective.kl == "reward":
    controller = kl_lib.make_controller(beta=cfg.rl.kl_coef, adaptive=cfg.rl.kl_adaptive,
                                        target=cfg.rl.kl_target, horizon=cfg.rl.kl_horizon)
  else:
    # β lives in the loss (or nowhere); the controller only reports it (rl/beta, rl/rlhf_reward).
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
    replies, _ = sampling.sample_replies(
        pol, pp, [chat.render_prompt(m, tok) for m in msgs], seed=cfg.seed,
        max_new_tokens=cfg.rl.max_new_tokens, temperature=cfg.rl.temperature,
        pad_id=tok.pad_id, eos_ids=chat.reply_stop_ids(tok))
    return "\n---\n".join(f"{m[-1]['content']} => {tok.decode(o)}" for m, o in zip(msgs, replies))

  res = trainer.train(cfg, trainer.Job(
      model=model, loss_fn=bind_policy_loss(cfg), source=source, mesh=env.mesh,
      init_params=init_params, init_from=init_from, sample=sample,
      tokens_per_step=cfg.train.batch_size * (cfg.rl.prompt_len + cfg.rl.max_new_tokens - 1),
      steps=steps, base_params=ref_full if lora.spec_from_config(cfg) is not None else None),
      workdir=workdir, progress=progress)
  res.timings["rollout_s"] = source.timings["rollout_s"]
  if cfg.rl.eval_prompts and not res.interrupted:
    # Every process runs the evaluation (its jitted programs span all of them); only process 0
    # writes the files.
    pol, pp = rollout_lib.policy_view(model, res.state.params)
    evaluation.evaluate_policy(
        (pol, pp, tok), prompts=dialogue.prompt_messages(cfg, cfg.rl.eval_split),
        reference=(lora.base_model(ref_model), ref_params), max_new_tokens=cfg.rl.max_new_tokens,
        temperature=cfg.rl.eval_temperature, prompt_len=cfg.rl.prompt_len, seed=cfg.seed,
        out_dir=workdir, label=cfg.loss.name, scorer=source.scorer)
  return res


def memory_parts(cfg, workdir: str | None = None):
  """What `run` would build, as shapes, for the memory plan (gptjax/memory.py): the policy's
  state and step, one minibatch of rollouts, the iteration's rollout buffer and the sampler's KV
  cache (from eval_shape of the sampler and the scoring forward `make_rollouts` runs), the
  reference policy and the reward model."""
  from gptjax import batches as batches_lib
  from gptjax import memory
  from gptjax import model as model_lib
  from gptjax import sharding as shd
  tok = common.plan_tokenizer(cfg, workdir, char_text=lambda: "".join(
      m[-1]["content"] for m in dialogue.prompt_messages(cfg, "train")))
  validate(cfg)
  with cfg.unlocked():
    cfg.model.scalar_head = cfg.rl.value_model == "head"
  env = common.make_env(cfg)
  model = build_model(cfg)
  init_params = common.init_params_fn(model)
  full = memory.abstract_params(cfg, model, init_params, env.mesh)
  spec = lora.spec_from_config(cfg)
  rcfg = rollout_config(cfg)
  rcfg.validate()
  rows, plen, m = rcfg.rollout_batch, cfg.rl.prompt_len, cfg.rl.max_new_tokens
  # The rows `iteration_prompts` picks, as `encode_prompts` pads them: [rows, prompt_len].
  prompts = memory.with_rows(jax.ShapeDtypeStruct((1, plen), jnp.int32), rows, env.mesh)
  lengths = memory.with_rows(jax.ShapeDtypeStruct((1,), jnp.int32), rows, env.mesh)
  eos = chat.reply_stop_ids(tok)

  def iteration(params, prompts, lengths):
    # make_rollouts' device work: sample, lay out, score with the policy and the reference.
    pol, pp = rollout_lib.policy_view(model, params)
    ref_model, ref_params = lora.reference(pol, pp)
    out = sampling.generate(pol, pp, prompts, lengths, rng=0, max_new_tokens=m,
                            temperature=rcfg.temperature, eos_ids=eos, pad_id=tok.pad_id)
    layout = rollout_lib.rollout_layout(out)
    old_logp, ref_logp, values = rollout_lib.score_tokens(
        model, params, ref_model, ref_params, layout, temperature=rcfg.temperature,
        with_values="critic" in rcfg.needs, with_policy=rcfg.recompute_old_logp)
    # Every advantage estimator returns per-token float32 arrays of this shape (host code with
    # metrics, so it is not traced here).
    return batches_lib.RolloutBatch(
        inputs=layout["inputs"], targets=layout["targets"], positions=layout["positions"],
        segment_ids=layout["segment_ids"], completion_mask=layout["completion_mask"],
        old_logp=old_logp, ref_logp=ref_logp, advantages=jnp.zeros_like(old_logp),
        returns=jnp.zeros_like(old_logp), values=values)

  buffer = memory.with_rows(jax.eval_shape(iteration, full, prompts, lengths), rows, env.mesh)
  batch = memory.with_rows(buffer, rcfg.minibatch_size, env.mesh)
  policy_cfg = rollout_lib.policy_view(model, full)[0].cfg
  if rcfg.rollout_engine:
    # The engine's cache at its longest (it grows to that): its slots plus a scratch row,
    # P + M + chunk slots each, on the process's devices as one array (counted whole).
    slots = min(rcfg.engine_slots or rows, rows)
    chunk = max(1, min(16, m - 1))
    cache = memory.replicated(jax.eval_shape(
        lambda: model_lib.init_cache(policy_cfg, slots + 1, plen + m + chunk)), env.mesh)
  else:
    # The static sampler's cache at its last decode phase: every row, P + M slots, batch-sharded
    # like the prompts.
    cache = jax.eval_shape(lambda: model_lib.init_cache(policy_cfg, rows, plen + m))
    cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=shd.batch_sharding(env.mesh)), cache)
  held = {}
  if spec is None:
    # `run` keeps the initial parameters (ref_full) as the reference; with LoRA they are the
    # trainer's frozen base, counted there once.
    held["reference policy"] = full
  if cfg.rl.reward == "rm":
    if not cfg.rl.reward_workdir:
      raise config_lib.ConfigError("rl.reward='rm' needs rl.reward_workdir (the reward stage)")
    rm_cfg = rollout_lib.workdir_model_config(cfg.rl.reward_workdir, scalar_head=True)
    rm_init = common.init_params_fn(GPT(rm_cfg))
    # load_for_inference places the reward model whole on each device.
    held["reward model"] = memory.replicated(
        memory.abstract_params(cfg, GPT(rm_cfg), rm_init, env.mesh), env.mesh)
  job = trainer.Job(model=model, loss_fn=bind_policy_loss(cfg), source=None, mesh=env.mesh,
                    init_params=init_params, steps=cfg.rl.iterations * rcfg.steps_per_iteration,
                    base_params=full if spec is not None else None)
  extra = {"frozen models": ("rl.reward (a Python reward needs no reward model)",)}
  if rcfg.rollout_engine:
    extra["KV cache"] = ("rl.engine_slots",)
  return memory.Parts(job=job, batch=batch, held=held, rollout_buffer=buffer, kv_cache=cache,
                      seq_fields=("rl.prompt_len", "rl.max_new_tokens"), extra_fields=extra)
