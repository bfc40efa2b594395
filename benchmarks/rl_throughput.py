"""RL throughput: one GRPO step and one PPO iteration, split into rollout and update time.

    python benchmarks/rl_throughput.py [--repeats 5] [--warmup 2] [--json out.json]

Setup (fixed, to compare with TRL / Tunix figures for the same shapes): a 4-layer, 128-wide GPT-2
style model with a 2048-token vocabulary; 8 prompts × 8 samples = 64 completions of exactly 64 new
tokens (no stop token, so every row decodes all 64) from 16-token prompts; β = 0.04 against a
frozen reference. GRPO: one update on the 64 completions. PPO: a value head on the policy trunk,
4 epochs on one minibatch of 64. The reward is a function of the token ids (cheap, so the figures
are the framework's). Both go through the library's real path: `RolloutSource.make_rollouts`
(sampler with KV cache, policy / reference / value forwards, advantages) and the shared
`make_train_step`. Medians over repeats after warm-up iterations (which include compilation).
The minor page faults per iteration show how much memory the step touches for the first time;
`gptjax.perf.retain_host_memory()` is on unless GPTJAX_RETAIN_HOST_MEMORY=0.
"""

from __future__ import annotations

import argparse
import dataclasses
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


class _Tok:
  pad_id = 0

  def decode(self, ids):
    return ""


def token_scorer(*, tokens, total_lengths, prompt_texts=None, completion_texts=None):
  """Fraction of tokens with an even id: a verifiable reward computed from ids alone."""
  t = np.asarray(tokens)[:, PROMPT_LEN:]
  return (t % 2 == 0).mean(axis=1).astype(np.float32)


@dataclasses.dataclass
class _State:
  params: object


def build(algorithm: str):
  model = GPT(dataclasses.replace(MODEL, scalar_head=algorithm == "ppo"))
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  prompts = rng.integers(10, MODEL.vocab_size, size=(PROMPTS * GROUP, PROMPT_LEN), dtype=np.int32)
  group = GROUP if algorithm == "grpo" else 1
  n_prompts = PROMPTS if algorithm == "grpo" else PROMPTS * GROUP
  cfg = rollout.RolloutConfig(
      objective=objectives.get(algorithm), prompts_per_iteration=n_prompts, group_size=group,
      max_new_tokens=NEW_TOKENS, temperature=1.0, epochs=1 if algorithm == "grpo" else 4,
      minibatch_size=PROMPTS * GROUP, kl_estimator="k3" if algorithm == "grpo" else "k1",
      filter_zero_spread=False)
  source = rollout.RolloutSource(
      # A copy: the train step donates the state's buffers, the frozen reference must keep its own.
      model=model, ref_params=jax.tree.map(jnp.copy, params), prompts=prompts,
      prompt_lengths=np.full((len(prompts),), PROMPT_LEN, np.int32),
      prompt_texts=[""] * len(prompts), tokenizer=_Tok(), scorer=token_scorer, cfg=cfg,
      controller=kl_lib.make_controller(beta=0.04), eos_ids=())
  if algorithm == "grpo":
    loss = lambda p, b, **kw: policy.grpo(p, b, temperature=1.0, kl_coef=0.04,
                                          clip_eps_high=0.28, max_len=NEW_TOKENS, **kw)
  else:
    loss = lambda p, b, **kw: policy.ppo(p, b, temperature=1.0, **kw)
  opt_cfg = type("O", (), dict(lr=1e-5, warmup_steps=0, decay_steps=1000, min_lr_ratio=1.0,
                               b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0))
  optimizer = step_lib.make_optimizer(opt_cfg)
  train_step = step_lib.make_train_step(loss, optimizer, model=model)
  state = step_lib.init_state(params, optimizer, 0)
  return source, train_step, state


def _minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def iteration(source, train_step, state):
  """One iteration: (state, rollout seconds, update seconds, minor page faults)."""
  f0 = _minor_faults()
  t0 = time.perf_counter()
  batch = source.next(state)               # generates the rollouts (blocks until ready)
  t1 = time.perf_counter()
  state, m = train_step(state, batch, None)
  for _ in range(source.cfg.steps_per_iteration - 1):
    state, m = train_step(state, source.next(state), None)
  jax.block_until_ready(state.params)
  t2 = time.perf_counter()
  source.pop_metrics()
  return state, t1 - t0, t2 - t1, _minor_faults() - f0


def measure(algorithm: str, *, warmup: int, repeats: int) -> dict:
  source, train_step, state = build(algorithm)
  t_start = time.perf_counter()
  for _ in range(warmup):
    state, *_ = iteration(source, train_step, state)
  warm_s = time.perf_counter() - t_start
  roll, upd, faults = [], [], []
  for _ in range(repeats):
    state, r, u, f = iteration(source, train_step, state)
    roll.append(r)
    upd.append(u)
    faults.append(f)
  total = [r + u for r, u in zip(roll, upd)]
  return {"algorithm": algorithm, "total_s": float(np.median(total)),
          "rollout_s": float(np.median(roll)), "update_s": float(np.median(upd)),
          "updates_per_iteration": source.cfg.steps_per_iteration, "warmup_s": warm_s,
          "minor_faults": int(np.median(faults)), "completions": PROMPTS * GROUP,
          "new_tokens": NEW_TOKENS, "repeats": repeats}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--json", default="")
  args = p.parse_args()
  retained = perf.retain_host_memory()     # before the first computation starts the backend
  print(f"host memory retained: {retained} ({perf.RETAIN_ENV}=0 turns it off)")
  print(f"devices: {jax.devices()}  model: 4x128, vocab 2048; {PROMPTS}x{GROUP} completions of "
        f"{NEW_TOKENS} tokens from {PROMPT_LEN}-token prompts; beta=0.04")
  results = []
  for algo, target in (("grpo", 1.0), ("ppo", 2.5)):
    r = measure(algo, warmup=args.warmup, repeats=args.repeats)
    r["target_s"] = target
    results.append(r)
    name = "GRPO step" if algo == "grpo" else "PPO iteration (4 epochs)"
    print(f"{name:26s} {r['total_s']:.3f} s  (rollout {r['rollout_s']:.3f} s, update "
          f"{r['update_s']:.3f} s for {r['updates_per_iteration']} step(s); target "
          f"≤ {target} s; warm-up {r['warmup_s']:.1f} s; {r['minor_faults']} minor page faults)",
          flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
