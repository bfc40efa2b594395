"""RL rollouts as a trainer batch source: sample from the current policy, score, compute reference
log-probs, values and advantages, then hand out shuffled minibatches for K epochs.

    source = RolloutSource(model=..., ref_params=..., prompts=..., scorer=..., cfg=RolloutConfig(...))
    trainer.train(cfg, trainer.Job(source=source, loss_fn=<the objective's loss>, ...), ...)

One iteration = one rollout batch (prompts_per_iteration × group_size completions) followed by
`epochs × rollout_batch / minibatch_size` train steps. Everything here is forward-only and runs
outside the jitted update: the sampler, the reward (an RM forward or a Python function on text),
the policy / reference / value forwards (`token_logprobs` at the sampling temperature, the same path
as the loss, so the first minibatch has ratio 1 and identical parameters have KL 0), and the
objective's advantage estimator (`Objective.advantages`: GAE with the KL in the reward for PPO,
group-normalised scores for GRPO, `gae_with_kl_reward` and `group_normalised` here; others in
their objective's file). Nothing here asks which objective it is: it reads the objective's fields
(does it need a critic's values, may π_old come from the sampler).

Rollouts come from the continuous-batching engine (`rl.rollout_engine=True`: a finished row
stops costing, so an iteration's decode cost follows the tokens generated) or from the static
sampler (the default, for now); both return fixed [rows, max_new_tokens] completions with masks, and neither's tokens
depend on anything but the iteration's key and prompts.

Exact resume. The source's JSON state is (iteration, minibatch, KL controller, score normaliser).
Each iteration's prompts and sampling key are functions of (seed, iteration) alone, and
`checkpoint_safe()` is False while an iteration's rollouts are held, so checkpoints land on
iteration boundaries and a resumed run regenerates exactly the rollouts it would have made.

What does not live here: the losses (`losses/policy.py`), advantage math (`advantages.py`), KL
estimators and β controllers (`kl.py`), stage wiring and evaluation (`stages/rl.py`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import json
import os
import time
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptjax import batches as batches_lib
from gptjax import checkpoint
from gptjax import config as config_lib
from gptjax import engine as engine_lib
from gptjax import lora
from gptjax import metrics as metrics_lib
from gptjax import sampling
from gptjax import sharding as shd
from gptjax.losses.common import token_logprobs
from gptjax.model import GPT, ModelConfig, ModelOutput
from gptjax.rl import advantages as adv_lib
from gptjax.rl import kl as kl_lib


# --------------------------------------------------------------------------------------------
# Models: the policy with a value head, or a policy and a separate critic.
# --------------------------------------------------------------------------------------------

class ActorCritic(nn.Module):
  """A policy GPT and a critic GPT (scalar head, e.g. initialised from the RM) side by side.

  Params are {'policy': ..., 'critic': ...}. Returns the policy's ModelOutput with the critic's
  values in `values`, so the PPO loss reads either layout the same way.
  """
  policy_cfg: ModelConfig
  critic_cfg: ModelConfig

  @nn.compact
  def __call__(self, inputs, positions=None, segment_ids=None, *, deterministic: bool = True,
               compute_logits: bool = True) -> ModelOutput:
    out = GPT(self.policy_cfg, name="policy")(inputs, positions, segment_ids,
                                              deterministic=deterministic,
                                              compute_logits=compute_logits)
    critic = GPT(dataclasses.replace(self.critic_cfg, scalar_head=True), name="critic")(
        inputs, positions, segment_ids, deterministic=deterministic, compute_logits=False)
    return out.replace(values=critic.values)


def workdir_model_config(workdir: str, *, scalar_head: bool) -> ModelConfig:
  """The model config another stage's workdir recorded (e.g. the RM a critic starts from)."""
  prev = config_lib.from_json(os.path.join(workdir, "config.json"))
  return dataclasses.replace(config_lib.model_config(prev), scalar_head=scalar_head)


def build_model(cfg) -> nn.Module:
  """An online objective's trained model, from `rl.value_model`: the policy GPT with a value head
  (`head`) or without one (`none`), or an ActorCritic whose critic has the reward model's shape
  (`critic`); wrapped with the run's adapters when `model.lora` asks for them. The RL runner
  and a LoRA workdir's loader (`lora.load_merged`) both build it here, so they agree."""
  mcfg = config_lib.model_config(cfg)
  vm = cfg.rl.value_model
  if vm == "critic":
    rm_dir = cfg.rl.reward_workdir
    critic_cfg = (workdir_model_config(rm_dir, scalar_head=True) if rm_dir
                  else dataclasses.replace(mcfg, scalar_head=True))
    model = ActorCritic(dataclasses.replace(mcfg, scalar_head=False), critic_cfg)
  else:
    model = GPT(dataclasses.replace(mcfg, scalar_head=(vm == "head")))
  return lora.wrap(model, lora.spec_from_config(cfg))


def make_init_from(cfg, model):
  """fresh params -> initial params: the policy from `train.init_from` (SFT), the critic (if any)
  from the reward model's workdir. None when there is nothing to load. The RL runner starts from
  it, and a LoRA workdir's loader (`lora.load_merged`) rebuilds its frozen base by it."""
  sft, rm = cfg.train.init_from, cfg.rl.reward_workdir
  critic = isinstance(model, ActorCritic)
  head = not critic and model.cfg.scalar_head
  if not sft and not (critic and rm) and not head:
    return None

  def init_from(fresh):
    if critic:
      return {"policy": checkpoint.init_from_workdir(sft, fresh["policy"]) if sft
              else fresh["policy"],
              "critic": checkpoint.init_from_workdir(rm, fresh["critic"]) if rm
              else fresh["critic"]}
    params = checkpoint.init_from_workdir(sft, fresh) if sft else fresh
    if not head:                 # GRPO: no critic, nothing to zero
      return params
    # A fresh value head starts at zero: a random projection of the trunk would put O(1) noise
    # into every early advantage (the scores are much smaller), drowning the policy signal until
    # the critic catches up.
    return {**params, "scalar_head": jax.tree.map(jnp.zeros_like, params["scalar_head"])}
  return init_from


def policy_view(model, params):
  """(GPT module, its params) of the policy alone: what the sampler and the reference run."""
  if isinstance(model, ActorCritic):
    # A LoRA actor-critic's policy carries the same adapters (gptjax/lora.py).
    return lora.like(model, GPT(model.policy_cfg)), params["policy"]
  return model, params


# --------------------------------------------------------------------------------------------
# Rewards: a Python function of text, or a reward model.
# --------------------------------------------------------------------------------------------

def _contains(word: str):
  def fn(prompts, completions):
    del prompts
    return np.asarray([float(word.lower() in c.lower()) for c in completions], np.float32)
  return fn


def _char_fraction(char: str):
  def fn(prompts, completions):
    del prompts
    return np.asarray([c.count(char) / max(len(c), 1) for c in completions], np.float32)
  return fn


def _gold(prompts, completions):
  del prompts
  from gptjax import labeler
  return np.asarray(labeler.gold_score(list(completions)), np.float32)


def make_reward_fn(spec: str) -> Callable:
  """A `reward_fn(prompt_texts, completion_texts) -> np.ndarray [B]` from a config string:
    gold                  the VADER labeler (the experiment's ground truth; over-optimisation
                          runs train on the RM and only log this)
    contains:WORD         1 if the completion contains WORD (case-insensitive), else 0
    char_fraction:C       fraction of the completion's characters equal to C
    python:MODULE:FN      any importable function with that signature
    verifier:PATH[@BONUS] a checkable task's verifier (gptjax/tasks/arithmetic.py): 1 when the
                          completion's final `#### N` equals the reference answer that PATH (a
                          prompts JSONL) gives for the prompt, plus BONUS for a well-formed
                          final line
  """
  kind, _, arg = spec.partition(":")
  if kind == "gold":
    return _gold
  if kind == "contains" and arg:
    return _contains(arg)
  if kind == "char_fraction" and len(arg) == 1:
    return _char_fraction(arg)
  if kind == "verifier" and arg:
    from gptjax.tasks import arithmetic
    path, _, bonus = arg.partition("@")
    return arithmetic.verifier_reward(path, format_bonus=float(bonus or 0.0))
  if kind == "python" and ":" in arg:
    module, _, name = arg.rpartition(":")
    return getattr(importlib.import_module(module), name)
  raise ValueError(f"rl.reward: unknown reward {spec!r}; expected 'rm', 'gold', 'contains:WORD', "
                   "'char_fraction:C', 'python:MODULE:FN' or 'verifier:PATH[@BONUS]'")


class TokenScorer:
  """Adapts an object with `score_tokens(tokens [B,T], mask [B,T]) -> [B]` (the reward stage's
  `RewardScorer`, normalisation included) to the scorer interface."""

  def __init__(self, rm):
    self.rm = rm

  @property
  def params(self):
    """The reward model's parameters, so callers can tell whether it is whole on each process."""
    return self.rm.params

  def with_params(self, params) -> "TokenScorer":
    """The same scorer computing with `params`, e.g. this process's copy of replicated ones."""
    rm = copy.copy(self.rm)
    rm.params = params
    return TokenScorer(rm)

  def __call__(self, *, tokens, total_lengths, prompt_texts=None, completion_texts=None):
    mask = (jnp.arange(tokens.shape[1])[None, :] < total_lengths[:, None]).astype(jnp.int32)
    return shd.to_host(self.rm.score_tokens(tokens, mask)).astype(np.float32)


class TextScorer:
  """Adapts `reward_fn(prompt_texts, completion_texts)` to the scorer interface."""

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, *, tokens=None, total_lengths=None, prompt_texts, completion_texts):
    scores = np.asarray(self.fn(list(prompt_texts), list(completion_texts)), np.float32)
    if scores.shape != (len(completion_texts),):
      raise ValueError(f"reward function returned shape {scores.shape}; expected "
                       f"({len(completion_texts)},)")
    return scores


# --------------------------------------------------------------------------------------------
# Forward-only pieces of an iteration.
# --------------------------------------------------------------------------------------------

def rollout_layout(out: sampling.SampleOutput):
  """Trainer layout of sampled sequences: inputs/targets [B, P+M−1] and the completion mask.

  `out.tokens` is each row's real prompt, its completion, then pad, so target j is a sampled
  token exactly when prompt_length − 1 ≤ j < total_length − 1. The sampler's mask already stops
  at the first end-of-turn, so nothing after it is trained or rewarded.
  """
  tokens = out.tokens
  b, t = tokens.shape
  j = jnp.arange(t - 1)[None, :]
  real = jnp.arange(t)[None, :] < out.total_lengths[:, None]
  completion = (j >= out.prompt_lengths[:, None] - 1) & (j < out.total_lengths[:, None] - 1)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              positions=jnp.broadcast_to(jnp.arange(t - 1, dtype=jnp.int32), (b, t - 1)),
              segment_ids=real[:, :-1].astype(jnp.int32),
              completion_mask=completion.astype(jnp.float32))


def sampler_logprobs(out: sampling.SampleOutput):
  """The sampler's own log-probs (`token_logprobs` of the raw logits at the sampling temperature)
  moved into the trainer layout [B, P+M−1]: completion token i is target prompt_length − 1 + i."""
  b, m = out.completion.shape
  t = out.tokens.shape[1] - 1
  idx = out.prompt_lengths[:, None] - 1 + jnp.arange(m)[None, :]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, m))
  return jnp.zeros((b, t), jnp.float32).at[rows, idx].add(out.logprobs * out.completion_mask)


@functools.partial(jax.jit, static_argnames=("model", "ref_model", "temperature", "with_values",
                                             "with_policy"))
def score_tokens(model, params, ref_model, ref_params, layout, *, temperature: float,
                 with_values: bool, with_policy: bool = True):
  """old log π, log π_ref and old values of every target (zero off the completion mask).
  With with_policy=False only the reference runs (old log π and values come back as zeros)."""
  mask = layout["completion_mask"]

  def logp(m, p):
    o = m.apply({"params": p}, layout["inputs"], positions=layout["positions"],
                segment_ids=layout["segment_ids"], deterministic=True)
    return token_logprobs(o.logits, layout["targets"], temperature=temperature) * mask, o.values

  ref_logp, _ = logp(ref_model, ref_params)
  old_logp, values = logp(model, params) if with_policy else (jnp.zeros_like(ref_logp), None)
  if not with_values or values is None:
    values = jnp.zeros_like(old_logp)
  return old_logp, ref_logp, values * mask


@functools.partial(jax.jit, static_argnames=("estimator", "gamma", "lam", "whiten_rewards",
                                             "whiten_advantages", "unbiased"))
def ppo_advantages(old_logp, ref_logp, values, mask, scores, beta, *, estimator: str,
                   gamma: float, lam: float, whiten_rewards: bool, whiten_advantages: bool,
                   unbiased: bool = False):
  """InstructGPT rewards (−β·KL per token, + the score on the last completion token), GAE."""
  kl = kl_lib.kl_estimate(old_logp, ref_logp, estimator=estimator) * mask
  last = jnp.max(jnp.where(mask > 0, jnp.arange(mask.shape[1])[None, :], 0), axis=1)
  at_last = jax.nn.one_hot(last, mask.shape[1], dtype=jnp.float32) * (mask.sum(1) > 0)[:, None]
  rewards = -beta * kl + scores[:, None] * at_last
  if whiten_rewards:
    rewards = adv_lib.whiten(rewards, mask, shift_mean=False, unbiased=unbiased)
  adv, returns = adv_lib.gae(rewards, values, mask, gamma=gamma, lam=lam)
  if whiten_advantages:
    adv = adv_lib.whiten(adv, mask, unbiased=unbiased)
  return adv, returns, kl


@dataclasses.dataclass
class Scored:
  """One iteration's rollouts after scoring, the input of an objective's advantage estimator.
  Per-token arrays are [B, T] over the rollout's targets; `mask` is the completion mask."""
  old_logp: jax.Array
  ref_logp: jax.Array
  values: jax.Array
  mask: jax.Array
  scores: jax.Array              # [B] the (normalised, penalised) scores
  beta: float                    # the KL coefficient now (the controller's)
  cfg: "RolloutConfig"


@dataclasses.dataclass
class Advantages:
  """An estimator's output: advantages and value targets [B, T], the mask to train on (an
  estimator may drop rows, e.g. groups whose scores are all equal), the per-token KL [B, T] that
  rl/kl reports, and rl/* metrics of its own."""
  advantages: jax.Array
  returns: jax.Array
  mask: jax.Array
  kl: jax.Array
  metrics: dict


def gae_with_kl_reward(s: Scored) -> Advantages:
  """PPO's estimator: InstructGPT rewards (−β·KL per token, the score at the last token), GAE
  over the critic's values."""
  c = s.cfg
  adv, returns, kl = ppo_advantages(
      s.old_logp, s.ref_logp, s.values, s.mask, s.scores, jnp.float32(s.beta),
      estimator=c.kl_estimator, gamma=c.gamma, lam=c.lam, whiten_rewards=c.whiten_rewards,
      whiten_advantages=c.whiten_advantages, unbiased=c.whiten_unbiased)
  return Advantages(adv, returns, s.mask, kl, {
      "rl/explained_variance": float(adv_lib.explained_variance(s.values, returns, s.mask)),
      "rl/value_mean": float(jnp.sum(s.values) / jnp.maximum(s.mask.sum(), 1.0))})


def group_normalised(s: Scored) -> Advantages:
  """GRPO's estimator: each score against its group (`rl.scale_rewards`: over the group's std,
  or the whole batch's, as TRL's scale_rewards='batch'), one advantage per sequence on all its
  tokens; groups whose scores are all equal can be dropped (`rl.filter_zero_spread`). The KL is
  the loss's business (kl='loss'), so it is only measured here."""
  c = s.cfg
  seq_adv, spread = adv_lib.group_advantages(
      s.scores, group_size=c.group_size, scale_by_std=c.scale_by_std, eps=c.group_eps,
      std_scope=c.scale_rewards)
  keep = spread if c.filter_zero_spread else jnp.ones_like(spread)
  mask = s.mask * keep[:, None].astype(jnp.float32)
  adv = seq_adv[:, None] * mask
  kl = kl_lib.kl_estimate(s.old_logp, s.ref_logp, estimator=c.kl_estimator) * s.mask
  return Advantages(adv, jnp.zeros_like(adv), mask, kl, {
      "rl/filtered_fraction": float(1.0 - jnp.mean(keep.astype(jnp.float32)))})


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  objective: object = None             # the gptjax.objectives.Objective being trained
  prompts_per_iteration: int = 8
  group_size: int = 1                  # G samples per prompt (GRPO); PPO usually 1
  max_new_tokens: int = 32
  temperature: float = 1.0
  epochs: int = 4                      # K passes over each rollout batch
  minibatch_size: int = 8
  kl_estimator: str = "k1"             # the per-token KL in PPO's reward and in rl/kl
  gamma: float = 1.0
  lam: float = 0.95
  whiten_advantages: bool = True
  whiten_rewards: bool = False
  # Whitening divides by the biased std (the 1/n variance); True uses 1/(n − 1), as TRL's
  # masked_whiten does. At a rollout batch of hundreds of tokens the two differ by < 1%.
  whiten_unbiased: bool = False
  missing_eos_penalty: float = 0.0     # subtracted from the score of a completion with no stop
  normalize_scores: bool = False       # RM scores: (s − μ) / σ with μ, σ from the first iteration
  scale_by_std: bool = True            # GRPO: divide by a std (Dr. GRPO: False)
  scale_rewards: str = "group"         # GRPO: that std is the group's, or the 'batch''s (TRL)
  group_eps: float = 1e-4
  filter_zero_spread: bool = True      # GRPO: drop groups whose scores are all equal
  # Where π_old comes from: 'recompute' (a plain forward, bitwise the loss's path), 'sampler' (the
  # sampler's log-probs: same function and temperature through the KV cache, equal to ~1e-6),
  # or 'auto': the sampler's when the objective allows it (`sampler_old_logp`, e.g. GRPO) and
  # takes one update per iteration (the ratio is then 1 by construction, so the extra forward
  # buys nothing), else recompute.
  old_logp: str = "auto"
  seed: int = 0
  # Rollouts from the continuous-batching engine (gptjax/engine.py): finished rows stop costing,
  # so an iteration's decode cost follows the tokens generated, not rows x longest. Its tokens
  # are its per-request draws (request i of an iteration: fold_in(key, i)), not the static
  # sampler's for the same seed. False (for now the default, see the README): `sampling.generate`.
  rollout_engine: bool = False
  engine_slots: int = 0                # the engine's slots; 0 = one per rollout row

  @property
  def needs(self) -> frozenset:
    return self.objective.needs

  @property
  def recompute_old_logp(self) -> bool:
    if self.old_logp == "auto":
      return not (self.objective.sampler_old_logp and self.steps_per_iteration == 1)
    return self.old_logp == "recompute"

  @property
  def rollout_batch(self) -> int:
    return self.prompts_per_iteration * self.group_size

  @property
  def steps_per_iteration(self) -> int:
    return self.epochs * (self.rollout_batch // self.minibatch_size)

  def validate(self):
    def bad(field, msg):
      raise ValueError(f"rl.{field}: {msg}")
    name = self.objective.name
    if not self.objective.online:
      bad("objective", f"{name!r} is not an online objective")
    if self.rollout_batch % self.minibatch_size:
      bad("minibatch_size", f"train.batch_size={self.minibatch_size} does not divide the rollout "
          f"batch of {self.rollout_batch} (prompts_per_iteration × group_size)")
    if "group" in self.needs and self.group_size < 2:
      bad("group_size", f"{name} needs at least 2 samples per prompt, got {self.group_size}")
    if self.epochs < 1:
      bad("epochs", f"must be >= 1, got {self.epochs}")
    if self.temperature <= 0:
      bad("temperature", f"must be > 0: {name} needs the sampler's log-probs (greedy has none)")
    if self.old_logp not in ("auto", "recompute", "sampler"):
      bad("old_logp", f"expected auto, recompute or sampler, got {self.old_logp!r}")
    if "critic" in self.needs and self.old_logp == "sampler":
      bad("old_logp", f"{name}'s values need the policy forward anyway; use recompute")
    if self.engine_slots < 0:
      bad("engine_slots", f"must be >= 0 (0 = one slot per rollout row), got {self.engine_slots}")
    if self.kl_estimator not in kl_lib.ESTIMATORS:
      bad("kl_estimator", f"expected one of {kl_lib.ESTIMATORS}, got {self.kl_estimator!r}")
    if self.scale_rewards not in adv_lib.STD_SCOPES:
      bad("scale_rewards", f"expected one of {adv_lib.STD_SCOPES}, got {self.scale_rewards!r}")


@jax.jit
def _take(buffer, idx):
  return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), buffer)


class RolloutSource:
  """The trainer batch source for every online objective (see the module docstring)."""

  def __init__(self, *, model, ref_params, ref_model=None, prompts: np.ndarray, prompt_lengths: np.ndarray,
               prompt_texts: Sequence[str], tokenizer, scorer, cfg: RolloutConfig, controller,
               eos_ids: Sequence[int], mesh=None, gold_fn: Callable | None = None,
               log_path: str | None = None):
    cfg.validate()
    self.model, self.cfg, self.tok = model, cfg, tokenizer
    # The reference is the policy network alone (a value head, if any, is computed and ignored).
    if ref_model is None:
      ref_model = GPT(model.policy_cfg) if isinstance(model, ActorCritic) else model
    self.ref_model = ref_model
    self.ref_params = ref_params
    self.prompts = np.asarray(prompts, np.int32)
    self.prompt_lengths = np.asarray(prompt_lengths, np.int32)
    self.prompt_texts = list(prompt_texts)
    self.scorer, self.controller = scorer, controller
    self.eos_ids = tuple(int(e) for e in eos_ids)
    self.mesh, self.gold_fn, self.log_path = mesh, gold_fn, log_path
    self.iteration, self.minibatch = 0, 0
    self.score_stats = None            # (mean, std) once measured
    self._buffer, self._order = None, None
    self._metrics = {}
    self.timings = {"rollout_s": 0.0, "iterations": 0}
    self._decode_row_steps = 0
    self._said_static = False

  # --- trainer interface ---

  def get_state(self) -> dict:
    return {"iteration": self.iteration, "minibatch": self.minibatch,
            "controller": self.controller.get_state(),
            "score_stats": None if self.score_stats is None else list(self.score_stats)}

  def set_state(self, s: dict) -> None:
    self.iteration, self.minibatch = int(s["iteration"]), int(s["minibatch"])
    self.controller.set_state(s["controller"])
    self.score_stats = None if s.get("score_stats") is None else tuple(s["score_stats"])
    self._buffer = None
    if self.minibatch:
      # A checkpoint taken mid-iteration (only the final one can be): its rollouts are gone, so
      # continue with the next iteration rather than replaying a different one.
      print(f"rollouts: checkpoint is mid-iteration {self.iteration} (minibatch "
            f"{self.minibatch}); continuing from iteration {self.iteration + 1}", flush=True)
      self.iteration, self.minibatch = self.iteration + 1, 0

  def checkpoint_safe(self) -> bool:
    return self._buffer is None

  def pop_metrics(self) -> dict:
    m, self._metrics = self._metrics, {}
    return m

  def next(self, state):
    if self._buffer is None:
      self._buffer, self._metrics = self.make_rollouts(state.params, self.iteration)
      rng = np.random.default_rng([self.cfg.seed, self.iteration, 1])
      n = self.cfg.rollout_batch
      self._order = [rng.permutation(n) for _ in range(self.cfg.epochs)]
    mb = self.cfg.minibatch_size
    per_epoch = self.cfg.rollout_batch // mb
    epoch, k = divmod(self.minibatch, per_epoch)
    idx = self._order[epoch][k * mb:(k + 1) * mb]
    batch = _take(self._buffer, jnp.asarray(idx, jnp.int32))
    if self.mesh is not None:
      batch = jax.device_put(batch, shd.batch_sharding(self.mesh))
    self.minibatch += 1
    if self.minibatch == self.cfg.steps_per_iteration:
      self._buffer, self._order = None, None
      self.iteration, self.minibatch = self.iteration + 1, 0
    return batch

  # --- one iteration's rollouts ---

  def iteration_prompts(self, iteration: int):
    """Row indices of this iteration's prompts: a function of (seed, iteration) only."""
    n = len(self.prompts)
    k = self.cfg.prompts_per_iteration
    rng = np.random.default_rng([self.cfg.seed, iteration, 0])
    idx = rng.choice(n, size=k, replace=n < k)
    return np.repeat(idx, self.cfg.group_size)

  def uses_engine(self, params) -> bool:
    """Whether this iteration's rollouts come from the engine: `rl.rollout_engine`, and policy
    parameters whole on each process (`engine.supports`). A run that asked for the engine and
    cannot have it says so once."""
    if not self.cfg.rollout_engine:
      return False
    if engine_lib.supports(params=policy_view(self.model, params)[1]):
      return True
    if not self._said_static and jax.process_index() == 0:
      print("rollouts: rl.rollout_engine is on, but the policy's parameters are split across "
            "processes and the engine decodes each process's rows alone; sampling with the "
            "static sampler (rl.rollout_engine=false asks for it outright)", flush=True)
    self._said_static = True
    return False

  def sample(self, params, iteration: int):
    """(prompt rows, SampleOutput [rollout_batch, ...]) of one iteration. Either decoder gives
    the same fixed shapes ([B, P+M] tokens, [B, M] completion, log-probs and mask), so the
    update step compiles once whichever runs."""
    idx = self.iteration_prompts(iteration)
    policy, policy_params = policy_view(self.model, params)
    key = jax.random.fold_in(jax.random.key(self.cfg.seed + 7919), iteration)
    if self.uses_engine(params):
      return idx, self._engine_sample(policy, policy_params, idx, key)
    prompts, lengths = jnp.asarray(self.prompts[idx]), jnp.asarray(self.prompt_lengths[idx])
    if self.mesh is not None:
      prompts, lengths = jax.device_put((prompts, lengths), shd.batch_sharding(self.mesh))
    out = sampling.generate(policy, policy_params, prompts, lengths, rng=key,
                            max_new_tokens=self.cfg.max_new_tokens,
                            temperature=self.cfg.temperature, eos_ids=self.eos_ids,
                            pad_id=self.tok.pad_id)
    # The static batch decodes every row until the longest stops (its first token comes from
    # the prefill, as the engine's do from admission).
    self._decode_row_steps = len(idx) * (int(shd.to_host(out.lengths).max()) - 1)
    return idx, out

  def _engine_sample(self, policy, params, idx, key) -> sampling.SampleOutput:
    """The engine's rollouts. On several processes each decodes the rows its devices hold,
    as requests numbered by their row in the whole batch, so the draws are one process's."""
    n, c = len(idx), self.cfg
    stats = engine_lib.EngineStats()

    def decode(rows: np.ndarray) -> sampling.SampleOutput:
      return engine_lib.generate(
          policy, params, self.prompts[idx[rows]],
          self.prompt_lengths[idx[rows]], rng=key, max_new_tokens=c.max_new_tokens,
          temperature=c.temperature, eos_ids=self.eos_ids, pad_id=self.tok.pad_id,
          slots=c.engine_slots or n, stats=stats, first_request=int(rows[0]))

    if self.mesh is None or jax.process_count() == 1:
      out = decode(np.arange(n))
      if self.mesh is not None:
        out = jax.device_put(out, shd.batch_sharding(self.mesh))
      self._decode_row_steps = stats.row_steps
      return out
    sharding = shd.batch_sharding(self.mesh)
    mine = sorted({r for ix in sharding.addressable_devices_indices_map((n,)).values()
                   for r in range(n)[ix[0]]})
    # Consecutive rows decode in one call (one run per process on a data-parallel mesh).
    runs = np.split(np.asarray(mine), np.flatnonzero(np.diff(mine) != 1) + 1)
    parts = [jax.device_get(decode(rows)) for rows in runs]
    self._decode_row_steps = stats.row_steps       # this process's share

    def assemble(*leaves):
      # The whole batch's array, of which this process fills (and hands over) its rows only.
      full = np.zeros((n,) + leaves[0].shape[1:], leaves[0].dtype)
      for rows, x in zip(runs, leaves):
        full[rows] = x
      return jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])
    return jax.tree.map(assemble, *parts)

  def completion_texts(self, out) -> list[str]:
    comp, mask = shd.to_host(out.completion), shd.to_host(out.completion_mask)
    stops = set(self.eos_ids)
    return [self.tok.decode([t for t, m in zip(row, mrow) if m > 0 and t not in stops])
            for row, mrow in zip(comp, mask)]

  def make_rollouts(self, params, iteration: int):
    """(RolloutBatch of the whole iteration, rl/* metrics)."""
    c = self.cfg
    t0 = time.perf_counter()
    idx, out = self.sample(params, iteration)
    layout = rollout_layout(out)
    texts = self.completion_texts(out)
    prompt_texts = [self.prompt_texts[i] for i in idx]
    raw = self.scorer(tokens=out.tokens, total_lengths=out.total_lengths,
                      prompt_texts=prompt_texts, completion_texts=texts)
    # Rollouts are generated sharded over the data axes, so on several processes each holds only
    # its own rows. Scoring and logging need every row, and a rollout batch is small (ids and
    # per-token floats), so every process gathers all of it and computes the same host values.
    comp = shd.to_host(out.completion)
    cmask = shd.to_host(out.completion_mask)
    has_eos = np.any(np.isin(comp, self.eos_ids) & (cmask > 0), axis=1)
    scores = raw - c.missing_eos_penalty * (~has_eos)
    if c.normalize_scores:
      if self.score_stats is None:
        # Measured once, on the first iteration's samples from the initial (SFT) policy, then
        # fixed, so the reward scale does not drift with the policy (InstructGPT normalises the
        # RM so SFT samples average 0).
        self.score_stats = (float(scores.mean()), float(scores.std() + 1e-6))
      scores = (scores - self.score_stats[0]) / self.score_stats[1]

    old_logp, ref_logp, values = score_tokens(
        self.model, params, self.ref_model, self.ref_params, layout,
        temperature=c.temperature, with_values="critic" in c.needs,
        with_policy=c.recompute_old_logp)
    if not c.recompute_old_logp:
      old_logp = sampler_logprobs(out)
    beta = self.controller.beta
    est = c.objective.advantages(Scored(
        old_logp=old_logp, ref_logp=ref_logp, values=values, mask=layout["completion_mask"],
        scores=jnp.asarray(scores, jnp.float32), beta=beta, cfg=c))
    adv, returns, mask, kl, metrics = est.advantages, est.returns, est.mask, est.kl, est.metrics
    batch = batches_lib.RolloutBatch(
        inputs=layout["inputs"], targets=layout["targets"], positions=layout["positions"],
        segment_ids=layout["segment_ids"], completion_mask=mask, old_logp=old_logp,
        ref_logp=ref_logp, advantages=adv, returns=returns, values=values)

    kl_seq = shd.to_host(jnp.sum(kl, axis=1))
    mean_kl = float(kl_seq.mean())
    lengths = shd.to_host(out.lengths)
    metrics.update({
        "rl/score": float(raw.mean()),
        "rl/score_std": float(raw.std()),
        "rl/kl": mean_kl,
        "rl/rlhf_reward": float(np.mean(scores - beta * kl_seq)),
        "rl/beta": float(beta),
        "rl/eos_fraction": float(has_eos.mean()),
        "rl/completion_length": float(lengths.mean()),
        "rl/iteration": float(iteration),
    })
    # The decode cost: row-steps computed (the engine's slots as they shrink; the static
    # sampler's rows × its longest), and which decoder it was.
    metrics["rl/decode_row_steps"] = float(self._decode_row_steps)
    metrics["rl/rollout_engine"] = float(self.uses_engine(params))
    if self.gold_fn is not None:
      gold = self.gold_fn(prompt_texts, texts)
      metrics["rl/gold_score"] = float(np.mean(gold))
      # Whether the proxy still ranks the policy's own replies as the gold does. The RM was
      # fitted on SFT replies; as the policy moves away from them the RM extrapolates, and this
      # agreement falls before the mean scores need part (the over-optimisation diagnostic).
      rho = metrics_lib.rank_correlation(raw, gold)
      if rho is not None:
        metrics["rl/proxy_gold_spearman"] = rho
    self.controller.update(mean_kl, len(kl_seq))
    jax.block_until_ready(batch)
    dt = time.perf_counter() - t0
    metrics["perf/rollout_s"] = dt
    self.timings["rollout_s"] += dt
    self.timings["iterations"] += 1
    if self.log_path and jax.process_index() == 0:
      with open(self.log_path, "a") as f:
        f.write(json.dumps({**metrics, "sample": texts[0][:200]}) + "\n")
    return batch, metrics
