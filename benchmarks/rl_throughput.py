"""RL throughput: one GRPO step and one PPO iteration, split into rollout and update time, with
the rollouts from the continuous-batching engine and from the static sampler side by side.

    python benchmarks/rl_throughput.py [--repeats 5] [--warmup 2] [--json out.json]
        [--mean_len 16] [--decoders static,engine]
    python benchmarks/rl_throughput.py --mean_len 0 --decoders static    # the recorded setup
    python benchmarks/rl_throughput.py --repeats 1 --warmup 1 --prompts 2 --group 2 \
        --new_tokens 8 --d_model 32 --num_layers 1                         # a smoke run

Setup (the defaults, to compare with TRL / Tunix figures for the same shapes): a 4-layer,
128-wide GPT-2 style model with a 2048-token vocabulary; 8 prompts × 8 samples = 64 completions
of at most 64 new tokens from 16-token prompts; β = 0.04 against a frozen reference.

Stopping. A random-init model's next-token distribution is close to uniform, so making the first
V / mean_len token ids stop ids (EOS) gives completion lengths that are geometric with mean about
`--mean_len`, capped at `--new_tokens`: a spread like real rollouts', where a few long rows set
the static batch's length. `--mean_len 0` has no stop id (every row decodes all its tokens; the
setup of the figures recorded before the engine, where it has nothing to save). The printed
lengths are the measured ones. Both decoders see the same prompts and seeds; their tokens differ
(the engine draws per request), so their lengths are two draws from one distribution.

GRPO: one update on the 64 completions. PPO: a value head on the policy trunk, 4 epochs on one
minibatch of 64. The reward is a function of the token ids (cheap, so the figures
are the framework's). Both go through the library's real path: `RolloutSource.make_rollouts`
(sampler with KV cache, policy / reference / value forwards, advantages) and the shared
`make_train_step`. Medians over repeats after warm-up iterations (which include compilation; the
engine compiles one decode program per slot count and cache length it meets, so its warm-up
needs more iterations: the line says how many compilations still fell in the timed ones).
The minor page faults per iteration show how much memory the step touches for the first time;
`gptjax.perf.retain_host_memory()` is on unless GPTJAX_RETAIN_HOST_MEMORY=0.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import objectives
from gptjax import perf
from gptjax import step as step_lib
from gptjax.losses import policy
from gptjax.model import GPT, ModelConfig
from gptjax.rl import kl as kl_lib
from gptjax.rl import rollout

PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS = 8, 8, 16, 64
MODEL = ModelConfig(vocab_size=2048, num_layers=4, num_heads=4, d_model=128, max_len=128)


@dataclasses.dataclass(frozen=True)
class Setup:
  prompts: int = PROMPTS
  group: int = GROUP
  prompt_len: int = PROMPT_LEN
  new_tokens: int = NEW_TOKENS
  mean_len: int = 16                   # 0: no stop id
  model: ModelConfig = MODEL

  def eos_ids(self) -> tuple:
    if not self.mean_len:
      return ()
    # Ids 1.. (0 is pad); a uniform draw stops with probability k / V.
    k = max(1, round(self.model.vocab_size / self.mean_len))
    return tuple(range(1, k + 1))


class _Tok:
  pad_id = 0

  def decode(self, ids):
    return ""


def token_scorer(*, tokens, total_lengths, prompt_texts=None, completion_texts=None,
                 prompt_len: int = PROMPT_LEN):
  """Fraction of completion tokens with an even id: a verifiable reward from ids alone (prompts
  are all prompt_len long, so the completion starts there)."""
  t = np.asarray(tokens)[:, prompt_len:]
  real = np.arange(t.shape[1])[None, :] < (np.asarray(total_lengths) - prompt_len)[:, None]
  return ((t % 2 == 0) & real).sum(1) / np.maximum(real.sum(1), 1)


@dataclasses.dataclass
class _State:
  params: object


def build(algorithm: str, decoder: str = "static", setup: Setup = Setup()):
  s = setup
  model = GPT(dataclasses.replace(s.model, scalar_head=algorithm == "ppo"))
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  eos = s.eos_ids()
  # Prompt ids avoid the stop ids and pad.
  prompts = rng.integers(len(eos) + 1, s.model.vocab_size, size=(s.prompts * s.group,
                                                                 s.prompt_len), dtype=np.int32)
  group = s.group if algorithm == "grpo" else 1
  n_prompts = s.prompts if algorithm == "grpo" else s.prompts * s.group
  cfg = rollout.RolloutConfig(
      objective=objectives.get(algorithm), prompts_per_iteration=n_prompts, group_size=group,
      max_new_tokens=s.new_tokens, temperature=1.0, epochs=1 if algorithm == "grpo" else 4,
      minibatch_size=s.prompts * s.group, kl_estimator="k3" if algorithm == "grpo" else "k1",
      filter_zero_spread=False, rollout_engine=decoder == "engine")
  source = rollout.RolloutSource(
      # A copy: the train step donates the state's buffers, the frozen reference must keep its own.
      model=model, ref_params=jax.tree.map(jnp.copy, params), prompts=prompts,
      prompt_lengths=np.full((len(prompts),), s.prompt_len, np.int32),
      prompt_texts=[""] * len(prompts), tokenizer=_Tok(),
      scorer=functools.partial(token_scorer, prompt_len=s.prompt_len), cfg=cfg,
      controller=kl_lib.make_controller(beta=0.04), eos_ids=eos)
  if algorithm == "grpo":
    loss = lambda p, b, **kw: policy.grpo(p, b, temperature=1.0, kl_coef=0.04,
                                          clip_eps_high=0.28, max_len=s.new_tokens, **kw)
  else:
    loss = lambda p, b, **kw: policy.ppo(p, b, temperature=1.0, **kw)
  opt_cfg = type("O", (), dict(lr=1e-5, warmup_steps=0, decay_steps=1000, min_lr_ratio=1.0,
                               b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0))
  optimizer = step_lib.make_optimizer(opt_cfg)
  train_step = step_lib.make_train_step(loss, optimizer, model=model)
  state = step_lib.init_state(params, optimizer, 0)
  return source, train_step, state


# XLA compilations (count, seconds), from jax's own event: an iteration that compiles (the
# engine meets a new slot count or cache length) is then told apart from the steady state.
_COMPILES = [0, 0.0]


def _on_event(event: str, seconds: float, **_):
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILES[0] += 1
    _COMPILES[1] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_event)


def _minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def iteration(source, train_step, state):
  """One iteration: (state, rollout seconds, update seconds, minor page faults, rl/* metrics)."""
  f0 = _minor_faults()
  t0 = time.perf_counter()
  batch = source.next(state)               # generates the rollouts (blocks until ready)
  t1 = time.perf_counter()
  state, m = train_step(state, batch, None)
  for _ in range(source.cfg.steps_per_iteration - 1):
    state, m = train_step(state, source.next(state), None)
  jax.block_until_ready(state.params)
  t2 = time.perf_counter()
  metrics = source.pop_metrics()
  return state, t1 - t0, t2 - t1, _minor_faults() - f0, metrics


def measure(algorithm: str, *, warmup: int, repeats: int, decoder: str = "static",
            setup: Setup = Setup()) -> dict:
  source, train_step, state = build(algorithm, decoder, setup)
  t_start = time.perf_counter()
  for _ in range(warmup):
    state, *_ = iteration(source, train_step, state)
  warm_s = time.perf_counter() - t_start
  roll, upd, faults, lengths, row_steps = [], [], [], [], []
  compiles = list(_COMPILES)
  for _ in range(repeats):
    state, r, u, f, m = iteration(source, train_step, state)
    roll.append(r)
    upd.append(u)
    faults.append(f)
    lengths.append(m["rl/completion_length"])
    row_steps.append(m["rl/decode_row_steps"])
    assert m["rl/rollout_engine"] == float(decoder == "engine"), m
  total = [r + u for r, u in zip(roll, upd)]
  return {"algorithm": algorithm, "decoder": decoder, "total_s": float(np.median(total)),
          "rollout_s": float(np.median(roll)), "update_s": float(np.median(upd)),
          "updates_per_iteration": source.cfg.steps_per_iteration, "warmup_s": warm_s,
          "minor_faults": int(np.median(faults)), "completions": setup.prompts * setup.group,
          "new_tokens": setup.new_tokens, "mean_len": setup.mean_len, "repeats": repeats,
          "completion_length": float(np.mean(lengths)),
          "decode_row_steps": float(np.median(row_steps)),
          "timed_compiles": _COMPILES[0] - compiles[0],
          "timed_compile_s": _COMPILES[1] - compiles[1]}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--json", default="")
  p.add_argument("--decoders", default="static,engine",
                 help="comma-separated: static (sampling.generate), engine (rl.rollout_engine)")
  p.add_argument("--algorithms", default="grpo,ppo")
  p.add_argument("--mean_len", type=int, default=16,
                 help="mean completion length of the stop-id draw; 0 = never stop")
  p.add_argument("--prompts", type=int, default=PROMPTS)
  p.add_argument("--group", type=int, default=GROUP)
  p.add_argument("--prompt_len", type=int, default=PROMPT_LEN)
  p.add_argument("--new_tokens", type=int, default=NEW_TOKENS)
  p.add_argument("--d_model", type=int, default=MODEL.d_model)
  p.add_argument("--num_layers", type=int, default=MODEL.num_layers)
  args = p.parse_args()
  decoders = [d for d in args.decoders.split(",") if d]
  algorithms = [a for a in args.algorithms.split(",") if a]
  for d in decoders:
    if d not in ("static", "engine"):
      p.error(f"--decoders: expected static and/or engine, got {d!r}")
  for a in algorithms:
    if a not in ("grpo", "ppo"):
      p.error(f"--algorithms: expected grpo and/or ppo, got {a!r}")
  setup = Setup(prompts=args.prompts, group=args.group, prompt_len=args.prompt_len,
                new_tokens=args.new_tokens, mean_len=args.mean_len,
                model=dataclasses.replace(MODEL, d_model=args.d_model,
                                          num_layers=args.num_layers,
                                          max_len=max(MODEL.max_len,
                                                      args.prompt_len + args.new_tokens)))
  retained = perf.retain_host_memory()     # before the first computation starts the backend
  print(f"host memory retained: {retained} ({perf.RETAIN_ENV}=0 turns it off)")
  stops = (f"{len(setup.eos_ids())} stop ids, geometric lengths of mean ~{setup.mean_len}"
           if setup.mean_len else "no stop id (every row decodes all its tokens)")
  print(f"devices: {jax.devices()}  model: {setup.model.num_layers}x{setup.model.d_model}, "
        f"vocab {setup.model.vocab_size}; {setup.prompts}x{setup.group} completions of at most "
        f"{setup.new_tokens} tokens from {setup.prompt_len}-token prompts; {stops}; beta=0.04")
  results = []
  for algo in algorithms:
    target = {"grpo": 1.0, "ppo": 2.5}[algo]
    name = "GRPO step" if algo == "grpo" else "PPO iteration (4 epochs)"
    for decoder in decoders:
      r = measure(algo, warmup=args.warmup, repeats=args.repeats, decoder=decoder, setup=setup)
      r["target_s"] = target
      results.append(r)
      print(f"{name:26s} {decoder:6s} {r['total_s']:.3f} s  (rollout {r['rollout_s']:.3f} s, "
            f"update {r['update_s']:.3f} s for {r['updates_per_iteration']} step(s); mean "
            f"length {r['completion_length']:.1f}, {r['decode_row_steps']:.0f} decode row-steps; "
            f"target ≤ {target} s; warm-up {r['warmup_s']:.1f} s; {r['minor_faults']} minor "
            f"page faults; {r['timed_compiles']} compilations in the timed iterations, "
            f"{r['timed_compile_s']:.1f} s)", flush=True)
    mine = {r["decoder"]: r for r in results if r["algorithm"] == algo}
    if len(mine) == 2:
      st, en = mine["static"], mine["engine"]
      print(f"{'':26s} engine/static: rollout {en['rollout_s'] / st['rollout_s']:.2f}x the "
            f"time, iteration {en['total_s'] / st['total_s']:.2f}x", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
