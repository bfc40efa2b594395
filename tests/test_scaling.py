"""The IsoFLOP sweep: its FLOPs accounting against XLA, its bookkeeping, the fits on synthetic
losses with known exponents, and the micro sweep end to end (with a resume)."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO
from gptjax import batches, scaling
from gptjax import config as config_lib
from gptjax import step as step_lib
from gptjax.losses import lm
from gptjax.model import GPT, flops_per_token, matmul_params

SCALING = os.path.join(REPO, "experiments", "scaling.py")
CHAR_VOCAB = 65       # the character vocabulary of the embedded corpus's training plays


def _cfg(preset, vocab=CHAR_VOCAB):
  cfg = config_lib.load(f"{SCALING}:{preset}")
  with cfg.unlocked():
    cfg.model.vocab_size = vocab
  return cfg


def test_flops_formula_matches_xla_cost_analysis_for_the_swept_shapes():
  # The model unrolls its layers by default (scan_unroll=0), so XLA's cost analysis counts every
  # layer and the step's total compares directly with the formula. XLA also counts the
  # elementwise work the formula leaves out on purpose (norms, GELU, softmax, the cross-entropy,
  # the SGD update): O(D + T·H) per token per layer against the formula's O(D² + T·D), so its
  # share shrinks as 1/width. It measured 11-13% at the narrowest swept width (16), 7-8% at 32
  # and 3-4% at 80. The analysis runs on the lowered step (2 s a
  # shape, against 15 s to compile each); the narrowest shape, where the omitted share is
  # largest, is also compiled, to check that XLA's optimised program counts the same.
  cfg = _cfg("tiny")
  b, t = cfg.train.batch_size, cfg.data.seq_len
  excess = []
  for size in cfg.scaling.sizes:
    layers, width, heads = scaling.parse_size(size, head_dim=cfg.scaling.head_dim)
    mcfg = scaling.model_config_for(cfg, layers, width, heads)
    model = GPT(mcfg)
    optimizer = optax.sgd(1e-3)
    # Shapes only: lowering and compiling never run the step, so nothing is initialised.
    state = jax.eval_shape(lambda: step_lib.init_state(nn.meta.unbox(model.init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]), optimizer, 0))
    zeros = jnp.zeros((b, t), jnp.int32)
    batch = batches.LMBatch(inputs=zeros, targets=zeros,
                            positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
                            segment_ids=jnp.ones((b, t), jnp.int32), loss_mask=jnp.ones((b, t)))
    train_step = step_lib.make_train_step(lm.lm, optimizer, model=model, donate=False)
    lowered = train_step.lower(state, batch, None)
    ours = flops_per_token(mcfg, t)
    stages = [lowered] + ([lowered.compile()] if size == cfg.scaling.sizes[0] else [])
    for stage in stages:
      analysis = stage.cost_analysis()
      if isinstance(analysis, list):
        analysis = analysis[0]
      xla = float(analysis["flops"]) / (b * t)
      excess.append((width, (xla - ours) / ours))
  for width, e in excess:
    # The formula is a lower bound (it counts only the matmuls), and a close one: within 10%
    # from 32 wide up, as the model's own test allows. At 16 wide the omitted O(D) work is twice
    # the share it is at 32 (it measured 11-13%); the README and RESULTS.md say that the
    # 16-wide runs of the sweep spend that much more real compute than their budget.
    assert 0 <= e < (0.15 if width < 32 else 0.10), (width, e, excess)
  by_width = sorted(excess)
  assert by_width[0][1] > by_width[-1][1], by_width   # the omitted share shrinks with width


def test_plan_spends_each_budget_on_budget_over_flops_per_token_tokens():
  cfg = _cfg("tiny")
  runs = scaling.plan(cfg)
  s = cfg.scaling
  assert len(runs) == len(s.budgets) * len(s.sizes) * len(s.seeds)
  assert len(s.budgets) >= 3 and len(s.sizes) >= 4 and len(s.seeds) >= 2
  names = {r.name for r in runs}
  assert len(names) == len(runs)                       # one workdir per run
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  for r in runs:
    mcfg = scaling.model_config_for(cfg, r.layers, r.d_model, r.num_heads)
    assert r.flops_per_token == flops_per_token(mcfg, cfg.data.seq_len)
    assert r.params == matmul_params(mcfg)
    assert r.tokens_per_step == tokens_per_step and r.tokens == r.steps * tokens_per_step
    # Rounded to whole steps: within half a step of budget / FLOPs-per-token.
    assert abs(r.tokens - r.budget / r.flops_per_token) <= tokens_per_step / 2
    assert r.compute == r.tokens * r.flops_per_token
  # A budget that is a whole number of steps is spent exactly.
  r0 = runs[0]
  with cfg.unlocked():
    cfg.scaling.budgets = (r0.flops_per_token * tokens_per_step * 37,)
  exact = [r for r in scaling.plan(cfg) if r.d_model == r0.d_model and r.layers == r0.layers][0]
  assert exact.tokens == exact.budget / exact.flops_per_token == 37 * tokens_per_step

  rc = scaling.run_config(_cfg("tiny"), r0, "/tmp/tok")
  assert "scaling" not in rc and rc.stage == "pretrain" and rc.seed == r0.seed
  assert rc.train.steps == r0.steps and rc.train.eval_every == r0.steps
  assert rc.optim.decay_steps == r0.steps and 1 <= rc.optim.warmup_steps <= r0.steps
  assert (rc.model.num_layers, rc.model.d_model) == (r0.layers, r0.d_model)


@pytest.mark.parametrize("alpha,beta", [(0.34, 0.28), (0.5, 0.25), (0.3, 0.3)])
def test_fits_recover_known_exponents_from_synthetic_losses(alpha, beta):
  # L(N, D) = E + A/N^α + B/D^β with C = 6ND has N_opt ∝ C^(β/(α+β)) and D_opt ∝ C^(α/(α+β))
  # (Hoffmann et al. 2022, eq. 4). The grid of sizes is fixed and shared by every budget, so the
  # optimum sits at a different place in it at each budget, as in a real sweep.
  e, a_coef, b_coef = 1.7, 400.0, 410.0
  budgets = np.geomspace(1e17, 1e21, 5)
  want_a, want_b = beta / (alpha + beta), alpha / (alpha + beta)
  # Where the optimum of each budget is, to lay one shared grid over all of them.
  g = (alpha * a_coef / (beta * b_coef)) ** (1 / (alpha + beta))
  n_opt = g * (budgets / 6) ** want_a
  grid = np.geomspace(n_opt.min() / 4, n_opt.max() * 4, 24)
  flat_c, flat_n, flat_d, flat_l = [], [], [], []
  for c in budgets:
    n = grid[(grid > 0)]
    n = n[np.argsort(np.abs(np.log(n) - np.log(g * (c / 6) ** want_a)))][:7]   # 7 nearest sizes
    d = c / (6 * n)
    flat_c += [c] * len(n)
    flat_n += list(n)
    flat_d += list(d)
    flat_l += list(e + a_coef / n ** alpha + b_coef / d ** beta)
  optima = scaling.isoflop_optima(flat_c, flat_n, flat_d, flat_l)
  assert all(o.n.bracketed for o in optima.values())
  law_n, law_d = scaling.scaling_exponents(optima)
  assert abs(law_n.exponent - want_a) < 0.02, (law_n.exponent, want_a)
  assert abs(law_d.exponent - want_b) < 0.02, (law_d.exponent, want_b)
  # And the vertices themselves are near the true optima (a parabola in log N is only a local
  # approximation of the curve, hence 15%).
  for c, o in optima.items():
    true_n = g * (c / 6) ** want_a
    assert abs(np.log(o.n.x_opt / true_n)) < 0.15, (c, o.n.x_opt, true_n)


def test_parabola_vertex_and_the_unbracketed_case():
  n = np.array([1e3, 1e4, 1e5, 1e6])
  u = np.log(n)
  v = scaling.fit_parabola(n, 0.5 * (u - np.log(3e4)) ** 2 + 2.0)
  assert v.bracketed and v.x_opt == pytest.approx(3e4, rel=1e-6) and v.y_opt == pytest.approx(2.0)
  # Loss still falling at the largest size: the vertex lies beyond the grid, and says so.
  v = scaling.fit_parabola(n, 0.1 * (u - np.log(1e8)) ** 2)
  assert not v.bracketed and v.x_opt > 1e6
  with pytest.raises(ValueError, match="3 or more"):
    scaling.fit_parabola([1, 2], [1, 2])


def test_bad_sweep_config_is_one_line_and_exit_2(tmp_path, capsys, cached_corpus):
  from gptjax.main import main
  rc = main(["scaling", "--config", f"{SCALING}:micro", "--workdir", str(tmp_path),
             "--config.scaling.sizes=('2x33',)"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1 and "scaling.sizes" in err and "2x33" in err
  rc = main(["scaling", "--config", os.path.join(REPO, "experiments", "shakespeare_char.py:micro"),
             "--workdir", str(tmp_path)])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and "no `scaling` section" in err


def test_micro_sweep_end_to_end_then_resumes(tmp_path, capsys, cached_corpus):
  from gptjax.main import main
  root = str(tmp_path / "sweep")
  assert main(["scaling", "--config", f"{SCALING}:micro", "--workdir", root]) == 0
  cfg = _cfg("micro")
  results = scaling.load_results(root)
  assert len(results) == len(cfg.scaling.budgets) * len(cfg.scaling.sizes) * len(cfg.scaling.seeds)
  for r in results:
    assert r["tokens"] == r["steps"] * r["tokens_per_step"]
    assert r["epochs"] == pytest.approx(r["tokens"] / r["train_corpus_tokens"])
    assert np.isfinite(r["val_loss"]) and 0 < r["val_loss"] < np.log(CHAR_VOCAB) + 0.5
    rows = [json.loads(l) for l in open(os.path.join(root, "runs", r["name"], "metrics.jsonl"))]
    assert max(x["step"] for x in rows) == r["steps"]
  # At either budget the smallest model (most tokens) beats the largest one: these budgets are
  # far below where extra parameters pay.
  for b in cfg.scaling.budgets:
    at = sorted((r for r in results if r["budget"] == b), key=lambda r: r["params"])
    assert at[0]["val_loss"] < at[-1]["val_loss"], at
  summary = json.load(open(os.path.join(root, "summary.json")))
  assert set(summary["optima"]) == {scaling._fmt_c(b) for b in cfg.scaling.budgets}
  assert np.isfinite(summary["a"]) and np.isfinite(summary["b"])
  text = open(os.path.join(root, "report.md")).read()
  for section in ("## IsoFLOP curves", "## Compute-optimal size per budget",
                  "## Compute-optimal scaling", "## The regime", "epochs"):
    assert section in text
  for png in ("isoflop.png", "optimal.png"):
    assert os.path.getsize(os.path.join(root, png)) > 10_000

  # A sweep killed after one run's final checkpoint but before its result: the rerun skips every
  # finished run and finishes that one from its checkpoint, with the same numbers.
  victim = results[-1]
  path = os.path.join(root, "runs", victim["name"], scaling.RESULT_FILE)
  os.remove(path)
  others = {r["name"]: os.path.getmtime(os.path.join(root, "runs", r["name"], scaling.RESULT_FILE))
            for r in results[:-1]}
  capsys.readouterr()
  assert main(["scaling", "--config", f"{SCALING}:micro", "--workdir", root]) == 0
  out = capsys.readouterr().out
  assert f"resumed from step {victim['steps']}" in out and out.count("resumed from") == 1
  redone = json.load(open(path))
  assert redone["val_loss"] == victim["val_loss"]
  for name, mtime in others.items():
    assert os.path.getmtime(os.path.join(root, "runs", name, scaling.RESULT_FILE)) == mtime

  # A finished run whose settings no longer match is an error, not a silent mix.
  assert main(["scaling", "--config", f"{SCALING}:micro", "--workdir", root,
               "--config.optim.lr=0.01"]) == 2
  assert "finished with other settings" in capsys.readouterr().err
