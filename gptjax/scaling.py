"""IsoFLOP sweeps: the plan, the driver over pretraining runs, the fits and the report.

    gptjax scaling --config experiments/scaling.py:tiny --workdir runs/scaling
    python -m gptjax.scaling runs/scaling          # rebuild the report from the finished runs

At each compute budget C (training FLOPs) every model size is trained for D = C / F tokens, F
being `model.flops_per_token` (6·N + 12·L·T·D, the formula MFU uses). N here is that formula's N
(`model.matmul_params`: non-embedding weights plus the LM head). Each run is the ordinary
pretraining stage in its own workdir `<root>/runs/<name>`; a run that finished leaves
`result.json` there and is skipped next time, and a killed run resumes from its checkpoint, so a
killed sweep finishes with the same numbers as an unbroken one.

The analysis is Hoffmann et al. (2022)'s approach 2: at each budget, fit a parabola to the loss
against log N (and against log D); its vertex is the compute-optimal size (and token count); then
fit N_opt ∝ C^a and D_opt ∝ C^b across budgets. It reads only the runs' result.json files.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

import ml_collections
import numpy as np

from gptjax import config as config_lib

RESULT_FILE = "result.json"
# Tokens per parameter of the two famous points the talk compares (GPT-3 175B on 300B tokens;
# LLaMA 65B on 1.4T tokens). The side-by-side picks the runs closest to these ratios.
GPT3_TOKENS_PER_PARAM = 300e9 / 175e9
LLAMA_TOKENS_PER_PARAM = 1.4e12 / 65e9


# ----------------------------------------------------------------------------------------------
# The plan: which runs, how long each.

@dataclasses.dataclass(frozen=True)
class RunPlan:
  budget: float          # FLOPs this run may spend
  layers: int
  d_model: int
  num_heads: int
  seed: int
  params: int            # N of the FLOPs formula
  flops_per_token: float
  tokens_per_step: int
  steps: int

  @property
  def tokens(self) -> int:
    return self.steps * self.tokens_per_step

  @property
  def compute(self) -> float:
    """The FLOPs the run really spends: its budget, up to rounding to whole steps."""
    return self.tokens * self.flops_per_token

  @property
  def name(self) -> str:
    return f"C{_fmt_c(self.budget)}_{self.layers}x{self.d_model}_s{self.seed}"


def parse_size(text: str, *, head_dim: int) -> tuple[int, int, int]:
  """'2x48' -> (layers 2, width 48, heads 48 // head_dim)."""
  try:
    layers, width = (int(v) for v in str(text).lower().split("x"))
  except ValueError:
    raise config_lib.ConfigError(f"scaling.sizes: {text!r} is not LAYERSxWIDTH, e.g. '2x64'") \
        from None
  if layers < 1 or width < 1 or width % head_dim:
    raise config_lib.ConfigError(f"scaling.sizes: {text!r}: layers and width must be positive and "
                                 f"the width a multiple of scaling.head_dim={head_dim}")
  return layers, width, width // head_dim


def model_config_for(cfg, layers: int, width: int, heads: int):
  return dataclasses.replace(config_lib.model_config(cfg), num_layers=layers, d_model=width,
                             num_heads=heads)


def check(cfg) -> None:
  """The `scaling` fields on their own, before any data is read."""
  s = cfg.scaling
  if not s.budgets or not s.sizes or not s.seeds:
    raise config_lib.ConfigError("scaling: budgets, sizes and seeds must each be non-empty")
  for budget in s.budgets:
    if not isinstance(budget, (int, float)) or not budget > 0:
      raise config_lib.ConfigError(f"scaling.budgets: {budget!r} is not a positive FLOP count")
  for size in s.sizes:
    parse_size(size, head_dim=s.head_dim)
  if not 0 <= s.warmup_fraction <= 1:
    raise config_lib.ConfigError(f"scaling.warmup_fraction: expected 0..1, got {s.warmup_fraction}")


def plan(cfg) -> list[RunPlan]:
  """Every run of the sweep. `cfg.model.vocab_size` must already be set (it enters the LM head)."""
  from gptjax import model as model_lib
  s = cfg.scaling
  check(cfg)
  if cfg.model.vocab_size <= 0:
    raise ValueError("scaling.plan: model.vocab_size is not set yet")
  seq, batch = cfg.data.seq_len, cfg.train.batch_size
  runs = []
  # Seed by seed: a sweep cut short still holds whole IsoFLOP curves of its first seeds.
  for seed in s.seeds:
    for budget in s.budgets:
      for size in s.sizes:
        layers, width, heads = parse_size(size, head_dim=s.head_dim)
        mcfg = model_config_for(cfg, layers, width, heads)
        fpt = model_lib.flops_per_token(mcfg, seq)
        # Whole steps: the tokens are budget / F rounded to the nearest step's worth.
        steps = int(round(float(budget) / (fpt * seq * batch)))
        if steps < 1:
          raise config_lib.ConfigError(
              f"scaling.budgets: {budget:.3g} FLOPs buys less than one step of {size} "
              f"({fpt * seq * batch:.3g} FLOPs a step); raise the budget or drop the size")
        runs.append(RunPlan(budget=float(budget), layers=layers, d_model=width, num_heads=heads,
                            seed=int(seed), params=model_lib.matmul_params(mcfg),
                            flops_per_token=fpt, tokens_per_step=seq * batch, steps=steps))
  return runs


def run_config(cfg, run: RunPlan, tokenizer_dir: str) -> ml_collections.ConfigDict:
  """The pretraining config of one run: the sweep's config without `scaling`, resized."""
  d = cfg.to_dict()
  s = d.pop("scaling")
  c = ml_collections.ConfigDict(d)
  c.stage = "pretrain"
  c.seed = run.seed
  c.data.tokenizer = tokenizer_dir
  c.model.update(num_layers=run.layers, d_model=run.d_model, num_heads=run.num_heads)
  warmup = max(1, min(int(s["max_warmup"]), int(s["warmup_fraction"] * run.steps)))
  c.optim.update(warmup_steps=warmup, decay_steps=run.steps)
  # One evaluation, at the end; a checkpoint only at the end (the trainer also saves on SIGTERM).
  c.train.update(steps=run.steps, eval_every=run.steps, checkpoint_every=0, sample_every=0,
                 log_every=max(1, run.steps // 10), init_from="")
  c.lock()
  return c


# ----------------------------------------------------------------------------------------------
# The driver.

def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)          # atomic: a kill never leaves half a result


def _final_metrics(workdir: str, steps: int) -> dict:
  from gptjax import metrics as metrics_lib
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  evals = [r for r in rows if r["step"] == steps and "eval/loss" in r]
  trains = [r for r in rows if "train/loss" in r]
  if not evals:
    raise RuntimeError(f"{workdir}: no evaluation at step {steps} in metrics.jsonl")
  return {"val_loss": evals[-1]["eval/loss"],
          "train_loss": trains[-1]["train/loss"] if trains else float("nan")}


def run_sweep(cfg, root: str, *, progress: bool = False) -> int:
  """Runs (or resumes) every run of the plan, then writes the report. Returns an exit status."""
  import jax
  from gptjax.data import corpus
  from gptjax.stages import common, run_stage
  os.makedirs(root, exist_ok=True)
  if not jax.config.jax_compilation_cache_dir:
    # Seeds (and, for init and eval, budgets) compile identical programs; on a small CPU model
    # compilation is most of a run's time. A cache hit is the executable XLA would have built.
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  cfg = copy.deepcopy(cfg)
  with cfg.unlocked():
    cfg.stage = "pretrain"
  char_text = (None if os.path.exists(os.path.join(root, "tokenizer.json"))
               else corpus.char_vocab_text(cfg))
  tok = common.resolve_tokenizer(cfg, root, build_char_from=char_text)
  common.fill_vocab_size(cfg, tok)
  train_tokens = len(corpus.documents(cfg, "train", tok,
                                     cache_dir=os.path.join(root, "token_cache")).tokens)
  runs = plan(cfg)
  with open(os.path.join(root, "config.json"), "w") as f:
    f.write(config_lib.to_json(cfg))
  print(f"scaling: {len(runs)} runs ({len(cfg.scaling.budgets)} budgets x "
        f"{len(cfg.scaling.sizes)} sizes x {len(cfg.scaling.seeds)} seeds) over "
        f"{train_tokens:,} training tokens", flush=True)
  t_sweep = time.perf_counter()
  for i, run in enumerate(runs):
    wd = os.path.join(root, "runs", run.name)
    result_path = os.path.join(wd, RESULT_FILE)
    rcfg = run_config(cfg, run, root)
    record = {**dataclasses.asdict(run), "name": run.name, "tokens": run.tokens,
              "compute": run.compute, "epochs": run.tokens / train_tokens,
              "train_corpus_tokens": train_tokens, "lr": rcfg.optim.lr,
              "warmup_steps": rcfg.optim.warmup_steps}
    if os.path.exists(result_path):
      with open(result_path) as f:
        done = json.load(f)
      changed = [k for k in record if done.get(k) != record[k]]
      if changed:
        raise config_lib.ConfigError(
            f"{result_path}: this run finished with other settings ({', '.join(changed)}); "
            "use another --workdir or delete that run")
      continue
    t0 = time.perf_counter()
    res = run_stage(rcfg, wd, progress=progress)
    if res.interrupted or res.stop_requested:
      print(f"scaling: stopped during {run.name}; run the same command again to resume",
            flush=True)
      return 128 + 15
    record.update(_final_metrics(wd, run.steps), wall_s=time.perf_counter() - t0)
    if not np.isfinite(record["val_loss"]):
      raise FloatingPointError(f"{wd}: the validation loss is {record['val_loss']}")
    _write_json(result_path, record)
    print(f"[{i + 1}/{len(runs)}] {run.name}: N={run.params:,} D={run.tokens:,} "
          f"({record['epochs']:.2f} epochs) val {record['val_loss']:.4f} "
          f"in {record['wall_s']:.0f}s", flush=True)
  print(f"scaling: sweep done in {time.perf_counter() - t_sweep:.0f}s", flush=True)
  write_report(root)
  return 0


def load_results(root: str) -> list[dict]:
  runs_dir = os.path.join(root, "runs")
  out = []
  for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
    path = os.path.join(runs_dir, name, RESULT_FILE)
    if os.path.exists(path):
      with open(path) as f:
        out.append(json.load(f))
  return out


# ----------------------------------------------------------------------------------------------
# The fits (pure functions of numbers, so the tests can feed them synthetic losses).

@dataclasses.dataclass
class Vertex:
  x_opt: float           # the minimiser, in the original (not log) units
  y_opt: float           # the fitted loss there
  coeffs: tuple          # loss = c2·u² + c1·u + c0, u = log(x)
  bracketed: bool        # a true minimum (c2 > 0) inside the sampled range


def fit_parabola(x, y) -> Vertex:
  """Least-squares parabola of y against log(x); its vertex. Needs three or more distinct x."""
  u, y = np.log(np.asarray(x, np.float64)), np.asarray(y, np.float64)
  if len(np.unique(u)) < 3:
    raise ValueError(f"fit_parabola: needs 3 or more distinct x, got {len(np.unique(u))}")
  c2, c1, c0 = np.polyfit(u, y, 2)
  if c2 <= 0:
    # No minimum: report the best sampled point, flagged as not bracketed.
    k = int(np.argmin(y))
    return Vertex(float(np.exp(u[k])), float(y[k]), (c2, c1, c0), False)
  u_opt = -c1 / (2 * c2)
  inside = bool(u.min() <= u_opt <= u.max())
  return Vertex(float(np.exp(u_opt)), float(c0 - c1 * c1 / (4 * c2)), (c2, c1, c0), inside)


@dataclasses.dataclass
class PowerLaw:
  exponent: float
  coefficient: float     # X = coefficient · C^exponent

  def __call__(self, c):
    return self.coefficient * np.asarray(c, np.float64) ** self.exponent


def fit_power_law(c, x) -> PowerLaw:
  """Least squares of log x against log c."""
  lc, lx = np.log(np.asarray(c, np.float64)), np.log(np.asarray(x, np.float64))
  if len(np.unique(lc)) < 2:
    raise ValueError("fit_power_law: needs 2 or more distinct budgets")
  a, k = np.polyfit(lc, lx, 1)
  return PowerLaw(float(a), float(np.exp(k)))


@dataclasses.dataclass
class Optimum:
  """One budget's compute-optimal point: the parabola's vertex in log N, and the tokens there."""
  n: Vertex
  d_opt: float
  d_of_n: tuple          # log D = slope·log N + intercept along this budget's runs

  def tokens(self, params):
    slope, intercept = self.d_of_n
    return np.exp(slope * np.log(np.asarray(params, np.float64)) + intercept)


def isoflop_optima(budgets, params, tokens, losses) -> dict:
  """Per budget, the vertex of the parabola in log N, and D_opt, the tokens at that N.

  Inputs are flat, one entry per (budget, size). Along one budget D = C / F(N) is a fixed,
  smooth function of N, so one parabola gives both optima: D_opt is read off the straight line
  log D against log N through the budget's runs (exact when F is 6N; with the attention term
  its slope is a little above -1). Fitting a second parabola in log D instead, as approach 2
  does, gives a D_opt that disagrees with N_opt wherever the vertex is extrapolated.
  """
  budgets, params = np.asarray(budgets, np.float64), np.asarray(params, np.float64)
  tokens, losses = np.asarray(tokens, np.float64), np.asarray(losses, np.float64)
  out = {}
  for b in sorted(set(budgets.tolist())):
    m = budgets == b
    v = fit_parabola(params[m], losses[m])
    slope, intercept = np.polyfit(np.log(params[m]), np.log(tokens[m]), 1)
    opt = Optimum(v, 0.0, (float(slope), float(intercept)))
    opt.d_opt = float(opt.tokens(v.x_opt))
    out[b] = opt
  return out


def scaling_exponents(optima: dict) -> tuple[PowerLaw, PowerLaw]:
  """N_opt ∝ C^a and D_opt ∝ C^b from the per-budget optima."""
  cs = sorted(optima)
  return (fit_power_law(cs, [optima[c].n.x_opt for c in cs]),
          fit_power_law(cs, [optima[c].d_opt for c in cs]))


# ----------------------------------------------------------------------------------------------
# Analysis of a sweep's results, and its report.

def _group(results):
  """{(budget, layers, d_model): [rows over seeds]} in budget then size order."""
  groups = {}
  for r in sorted(results, key=lambda r: (r["budget"], r["params"], r["seed"])):
    groups.setdefault((r["budget"], r["layers"], r["d_model"]), []).append(r)
  return groups


def analyse(results: list[dict]) -> dict:
  """Means over seeds, the fits on the means, the same fits per seed (for their spread), and the
  GPT-3-like and LLaMA-like picks at every budget."""
  groups = _group(results)
  points = []
  for (budget, layers, width), rows in groups.items():
    losses = [r["val_loss"] for r in rows]
    points.append({"budget": budget, "layers": layers, "d_model": width,
                   "params": rows[0]["params"], "tokens": rows[0]["tokens"],
                   "compute": rows[0]["compute"], "epochs": rows[0]["epochs"],
                   "steps": rows[0]["steps"], "seeds": [r["seed"] for r in rows],
                   "losses": losses, "mean": float(np.mean(losses)),
                   "walls": [r.get("wall_s") for r in rows],
                   "lo": float(np.min(losses)), "hi": float(np.max(losses))})
  out = {"points": points, "budgets": sorted({p["budget"] for p in points})}
  enough = [b for b in out["budgets"] if sum(p["budget"] == b for p in points) >= 3]
  if not enough:
    return out

  def fits(loss_of):
    pts = [p for p in points if p["budget"] in enough]
    opt = isoflop_optima([p["budget"] for p in pts], [p["params"] for p in pts],
                         [p["tokens"] for p in pts], [loss_of(p) for p in pts])
    laws = scaling_exponents(opt) if len(opt) >= 2 else None
    return opt, laws

  out["optima"], out["laws"] = fits(lambda p: p["mean"])
  seeds = sorted({s for p in points for s in p["seeds"]})
  out["per_seed"] = {}
  for s in seeds:
    if all(s in p["seeds"] for p in points if p["budget"] in enough):
      out["per_seed"][s] = fits(lambda p: p["losses"][p["seeds"].index(s)])
  out["pairs"] = []
  for b in out["budgets"]:
    pts = [p for p in points if p["budget"] == b]
    ratio = lambda p: p["tokens"] / p["params"]
    gpt3 = min(pts, key=lambda p: abs(np.log(ratio(p) / GPT3_TOKENS_PER_PARAM)))
    llama = min(pts, key=lambda p: abs(np.log(ratio(p) / LLAMA_TOKENS_PER_PARAM)))
    if gpt3 is not llama:
      diffs = [lg - ll for lg, ll, in zip(gpt3["losses"], llama["losses"])]
      out["pairs"].append({"budget": b, "gpt3": gpt3, "llama": llama, "diffs": diffs})
  return out


def _fmt_c(c: float) -> str:
  """1.5e11 -> '1.5e11'."""
  return f"{c:.3g}".replace("e+", "e").replace("e0", "e")


def _plots(an: dict, out_dir: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  files = []
  points, budgets = an["points"], an["budgets"]
  colors = plt.cm.viridis(np.linspace(0.1, 0.85, len(budgets)))
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, key, label, which in ((axes[0], "params", "parameters N (log)", 0),
                                (axes[1], "tokens", "training tokens D (log)", 1)):
    for color, b in zip(colors, budgets):
      pts = [p for p in points if p["budget"] == b]
      xs = np.array([p[key] for p in pts], np.float64)
      for p in pts:
        repeated = p["epochs"] > 1
        ax.scatter([p[key]] * len(p["losses"]), p["losses"], s=12, color=color, alpha=0.45,
                   marker="s" if repeated else "o")
      ax.plot(xs, [p["mean"] for p in pts], color=color, lw=0.8, alpha=0.6)
      if "optima" in an and b in an["optima"]:
        opt = an["optima"][b]
        ns = np.array([p["params"] for p in pts], np.float64)
        # Out to the vertex when it lies beyond the sizes tried, so the extrapolation shows.
        grid = np.linspace(min(np.log(ns.min()), np.log(opt.n.x_opt)),
                           max(np.log(ns.max()), np.log(opt.n.x_opt)), 100)
        xmap = (lambda n: n) if which == 0 else opt.tokens
        ax.plot(xmap(np.exp(grid)), np.polyval(opt.n.coeffs, grid), color=color, ls="--",
                lw=1.2, label=f"C = {_fmt_c(b)} FLOPs")
        ax.scatter([xmap(opt.n.x_opt)], [opt.n.y_opt], marker="*", s=140, color=color,
                   edgecolor="black", zorder=5)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(label)
    ax.set_ylabel("validation loss (nats/char)")
    ax.grid(alpha=0.3, which="both")
  if axes[0].get_legend_handles_labels()[0]:
    axes[0].legend(fontsize=8)
  axes[0].set_title("IsoFLOP curves: loss against model size")
  axes[1].set_title("the same runs against tokens")
  fig.text(0.01, 0.01, "dots: seeds; squares: runs that repeat data (> 1 epoch); dashed: "
           "parabola in log x; star: its minimum", fontsize=7)
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  fig.savefig(os.path.join(out_dir, "isoflop.png"), dpi=110)
  plt.close(fig)
  files.append("isoflop.png")

  if an.get("laws"):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    cs = np.array(sorted(an["optima"]))
    for ax, which, law, label in ((axes[0], 0, an["laws"][0], "N_opt"),
                                  (axes[1], 1, an["laws"][1], "D_opt")):
      value = lambda o: o.n.x_opt if which == 0 else o.d_opt
      ax.scatter(cs, [value(an["optima"][c]) for c in cs], color="black", zorder=3,
                 label="vertex of the seed-mean curve")
      for s, (opt, _) in an["per_seed"].items():
        ax.scatter(cs, [value(opt[c]) for c in cs], marker="x", s=25, alpha=0.7,
                   label=f"seed {s}")
      grid = np.geomspace(cs.min(), cs.max(), 50)
      ax.plot(grid, law(grid), color="C3", label=f"{label} ∝ C^{law.exponent:.2f}")
      mid = np.sqrt(cs.min() * cs.max())
      ax.plot(grid, law(mid) * (grid / mid) ** 0.5, color="gray", ls=":",
              label="slope 0.5 (Chinchilla)")
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set_xlabel("compute C (FLOPs)")
      ax.set_ylabel(label)
      ax.grid(alpha=0.3, which="both")
      ax.legend(fontsize=7)
    axes[0].set_title("compute-optimal parameters")
    axes[1].set_title("compute-optimal tokens")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "optimal.png"), dpi=110)
    plt.close(fig)
    files.append("optimal.png")

  if an.get("pairs"):
    pairs = an["pairs"]
    fig, ax = plt.subplots(figsize=(1.9 * len(pairs) + 2.5, 3.6))
    w = 0.38
    for i, pr in enumerate(pairs):
      for off, key, color, name in ((-w / 2, "gpt3", "#c44e52", "GPT-3-like (large, few tokens)"),
                                    (w / 2, "llama", "#4c72b0",
                                     "LLaMA-like (smaller, many tokens)")):
        p = pr[key]
        ax.bar(i + off, p["mean"], w, color=color, label=name if i == 0 else None)
        ax.scatter([i + off] * len(p["losses"]), p["losses"], color="black", s=8, zorder=3)
        ax.text(i + off, p["mean"], f"{p['params'] / 1e3:.0f}k\n{p['tokens'] / 1e6:.2f}M tok",
                ha="center", va="bottom", fontsize=6)
    lo = min(min(pr[k]["lo"] for k in ("gpt3", "llama")) for pr in pairs)
    hi = max(max(pr[k]["hi"] for k in ("gpt3", "llama")) for pr in pairs)
    ax.set_ylim(lo - 0.15 * (hi - lo) - 0.02, hi + 0.35 * (hi - lo) + 0.02)
    ax.set_xticks(range(len(pairs)), [f"C = {_fmt_c(pr['budget'])}" for pr in pairs])
    ax.set_ylabel("validation loss (mean; dots: seeds)")
    ax.set_title("Equal compute: parameters or tokens?")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "gpt3_vs_llama.png"), dpi=110)
    plt.close(fig)
    files.append("gpt3_vs_llama.png")
  return files


def _range(values, fmt="{:.2f}") -> str:
  return fmt.format(min(values)) + "–" + fmt.format(max(values))


def report_markdown(an: dict, *, root: str, env: dict | None = None, cfg: dict | None = None) -> str:
  lines = ["# gptjax IsoFLOP report card", ""]
  lines.append(f"Run directory: `{root}`." + (
      " Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()) if env else ""))
  lines.append("")
  pts = an["points"]
  if not pts:
    return "\n".join(lines + ["No finished runs yet."]) + "\n"
  corpus = None
  if cfg:
    corpus = cfg.get("data", {}).get("source")
  lines += [
      f"Each point is a pretraining run on the {corpus or 'training'} corpus that spends a fixed "
      "budget C of training FLOPs, counted as C = D·(6N + 12·L·T·d) (the formula MFU uses; N: "
      "non-embedding weights plus the LM head). A model of N parameters therefore sees "
      "D = C / (6N + 12·L·T·d) tokens. The loss is the held-out validation loss (plays never "
      "trained on) at the end of the run; every run decays its learning rate over its own length. "
      "`epochs` is D over the training corpus's size: batches are random windows drawn with "
      "replacement, so above 1 the model has seen repeated text.", ""]

  walls = [w for p in pts for w in p["walls"] if w is not None]
  if walls:
    lines += [f"{sum(len(p['losses']) for p in pts)} runs; their training took "
              f"{sum(walls) / 60:.1f} minutes in all (compilation and evaluation included).", ""]
  lines += ["## IsoFLOP curves", "", "![isoflop](isoflop.png)", ""]
  lines += ["| C (FLOPs) | layers × width | N | D (tokens) | D/N | epochs | steps | "
            "val loss (mean) | seeds (min–max) |", "|---|---|---|---|---|---|---|---|---|"]
  for p in pts:
    lines.append(f"| {_fmt_c(p['budget'])} | {p['layers']}×{p['d_model']} | {p['params']:,} | "
                 f"{p['tokens']:,} | {p['tokens'] / p['params']:.1f} | {p['epochs']:.2f} | "
                 f"{p['steps']} | {p['mean']:.4f} | {p['lo']:.4f}–{p['hi']:.4f} |")
  lines.append("")

  if "optima" in an:
    lines += ["## Compute-optimal size per budget", "",
              "The vertex of a parabola in log N fitted to the seed-mean losses (Hoffmann et al. "
              "2022, approach 2), and D_opt, the tokens a model of that size gets at this budget; "
              "beside them, the same fit on each seed alone. \"no\" under *bracketed* means the "
              "fitted minimum falls outside the sizes tried (or the curve has no minimum), so "
              "that budget's optimum is an extrapolation.", "",
              "| C (FLOPs) | N_opt | N_opt per seed | D_opt | D_opt per seed | D_opt/N_opt | "
              "fitted min loss | bracketed |", "|---|---|---|---|---|---|---|---|"]
    for c, o in an["optima"].items():
      ns = [opt[c].n.x_opt for opt, _ in an["per_seed"].values()]
      ds = [opt[c].d_opt for opt, _ in an["per_seed"].values()]
      lines.append(f"| {_fmt_c(c)} | {o.n.x_opt:,.0f} | {_range(ns, '{:,.0f}') if ns else '-'} | "
                   f"{o.d_opt:,.0f} | {_range(ds, '{:,.0f}') if ds else '-'} | {o.d_opt / o.n.x_opt:.1f} | "
                   f"{o.n.y_opt:.4f} | {'yes' if o.n.bracketed else 'no'} |")
    lines.append("")
  if an.get("laws"):
    ln, ld = an["laws"]
    a_seeds = [laws[0].exponent for _, laws in an["per_seed"].values() if laws]
    b_seeds = [laws[1].exponent for _, laws in an["per_seed"].values() if laws]
    unb = [c for c, o in an["optima"].items() if not o.n.bracketed]
    caveat = ([f"**Not a measurement of the exponents:** at {len(unb)} of {len(an['optima'])} "
               "budgets the loss has no minimum inside the sizes tried, so those N_opt are "
               "extrapolated vertices or, where the curve has no minimum at all, the best size "
               "tried. The fits below only say which way the optimum moves.", ""]
              if unb else [])
    lines += ["## Compute-optimal scaling", ""] + caveat + ["![optimal](optimal.png)", "",
              "| fit | exponent (seed means) | per seed | Chinchilla (approach 2) | Kaplan 2020 |",
              "|---|---|---|---|---|",
              f"| N_opt ∝ C^a | a = {ln.exponent:.2f} | {_range(a_seeds) if a_seeds else '-'} "
              "| 0.49 | 0.73 |",
              f"| D_opt ∝ C^b | b = {ld.exponent:.2f} | {_range(b_seeds) if b_seeds else '-'} "
              "| 0.51 | 0.27 |", ""]
  if an.get("pairs"):
    lines += ["## GPT-3-like against LLaMA-like at equal compute", "",
              f"At each budget, the run whose tokens-per-parameter is closest to GPT-3's "
              f"({GPT3_TOKENS_PER_PARAM:.1f}: 175B parameters, 300B tokens) against the one "
              f"closest to LLaMA-65B's ({LLAMA_TOKENS_PER_PARAM:.1f}: 65B, 1.4T tokens). "
              "The difference is GPT-3-like minus LLaMA-like: positive means the smaller model "
              "trained on more tokens wins.", "", "![gpt3 vs llama](gpt3_vs_llama.png)", "",
              "| C (FLOPs) | GPT-3-like: N, D, D/N, epochs, loss | LLaMA-like: N, D, D/N, "
              "epochs, loss | difference (mean; per seed) |", "|---|---|---|---|"]
    for pr in an["pairs"]:
      g, l = pr["gpt3"], pr["llama"]
      cell = lambda p: (f"{p['params']:,}, {p['tokens']:,}, {p['tokens'] / p['params']:.1f}, "
                        f"{p['epochs']:.2f}, {p['mean']:.4f}")
      lines.append(f"| {_fmt_c(pr['budget'])} | {cell(g)} | {cell(l)} | "
                   f"{np.mean(pr['diffs']):+.4f}; " +
                   ", ".join(f"{d:+.4f}" for d in pr["diffs"]) + " |")
    lines.append("")
  lines += ["## The regime", ""] + regime_notes(an) + [""]
  return "\n".join(lines)


def regime_notes(an: dict) -> list[str]:
  """Plain statements, computed from the numbers, about data repetition and where the fit holds."""
  notes = []
  pts = an["points"]
  rep = [p for p in pts if p["epochs"] > 1]
  max_ep = max(p["epochs"] for p in pts)
  notes.append(f"- The largest number of epochs of any run is {max_ep:.2f}. "
               + (f"{len(rep)} of {len(pts)} (budget, size) points repeat data: "
                  + ", ".join(f"{p['layers']}×{p['d_model']} at C = {_fmt_c(p['budget'])} "
                              f"({p['epochs']:.2f} epochs)" for p in rep) + "."
                  if rep else "No run repeats data."))
  if rep and "optima" in an:
    for p in rep:
      if p["budget"] in an["optima"]:
        v = an["optima"][p["budget"]].n
        resid = p["mean"] - float(np.polyval(v.coeffs, np.log(p["params"])))
        notes.append(f"  - {p['layers']}×{p['d_model']} at C = {_fmt_c(p['budget'])}: "
                     f"{resid:+.4f} nats from its budget's parabola.")
    notes.append("  Muennighoff et al. (2023) found up to about 4 epochs of repeated data worth "
                 "almost as much as fresh data, with returns fading to nothing by about 40; "
                 "repetition here stays in the first range, so it should barely bend these "
                 "curves, and a residual above is the place to look if it does.")
  if "optima" in an:
    unb = [c for c, o in an["optima"].items() if not o.n.bracketed]
    if unb:
      notes.append("- The fitted minimum is not bracketed by the sizes tried at C = "
                   + ", ".join(_fmt_c(c) for c in unb) + "; the exponents lean on "
                   "extrapolated vertices there.")
    else:
      notes.append("- Every budget's fitted minimum lies inside the sizes tried.")
  if an.get("pairs"):
    wins = [pr for pr in an["pairs"] if min(pr["diffs"]) > 0]
    losses = [pr for pr in an["pairs"] if max(pr["diffs"]) < 0]
    notes.append(f"- LLaMA-like beats GPT-3-like on every seed at {len(wins)} of "
                 f"{len(an['pairs'])} budgets"
                 + (f" and loses on every seed at {len(losses)}" if losses else "") + ".")
  return notes


def write_report(root: str, out_dir: str | None = None) -> str:
  """Analyses the finished runs under `root`; writes report.md and the plots to out_dir (root)."""
  out_dir = out_dir or root
  os.makedirs(out_dir, exist_ok=True)
  results = load_results(root)
  cfg = None
  if os.path.exists(os.path.join(root, "config.json")):
    with open(os.path.join(root, "config.json")) as f:
      cfg = json.load(f)
    # Only the runs of the sweep as last configured: runs of other sizes or budgets left in the
    # directory by an earlier configuration would otherwise join the fits unannounced.
    s = cfg["scaling"]
    sizes = {parse_size(x, head_dim=s["head_dim"])[:2] for x in s["sizes"]}
    results = [r for r in results if r["budget"] in [float(b) for b in s["budgets"]]
               and (r["layers"], r["d_model"]) in sizes and r["seed"] in s["seeds"]]
  an = analyse(results)
  env = None
  if results:
    from gptjax import pipeline
    env = pipeline.environment()
  if an["points"]:
    _plots(an, out_dir)
  text = report_markdown(an, root=root, env=env, cfg=cfg)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(text)
  summary = {"points": an["points"]}
  if "optima" in an:
    summary["optima"] = {_fmt_c(c): {"N_opt": o.n.x_opt, "D_opt": o.d_opt, "loss": o.n.y_opt,
                                     "bracketed": o.n.bracketed}
                         for c, o in an["optima"].items()}
  if an.get("laws"):
    summary["a"], summary["b"] = an["laws"][0].exponent, an["laws"][1].exponent
    summary["a_per_seed"] = {str(s): l[0].exponent for s, (_, l) in an["per_seed"].items() if l}
    summary["b_per_seed"] = {str(s): l[1].exponent for s, (_, l) in an["per_seed"].items() if l}
  _write_json(os.path.join(out_dir, "summary.json"), summary)
  return os.path.join(out_dir, "report.md")


# ----------------------------------------------------------------------------------------------
# Command line.

def main(argv) -> int:
  overrides, rest = config_lib.split_argv(argv)
  p = argparse.ArgumentParser(prog="gptjax scaling")
  p.add_argument("--config", required=True, help="path.py:preset, e.g. experiments/scaling.py:tiny")
  p.add_argument("--workdir", required=True)
  p.add_argument("--progress", action="store_true", help="a progress bar for every run")
  args = p.parse_args(rest)
  try:
    cfg = config_lib.load(args.config, overrides)
    if "scaling" not in cfg:
      raise config_lib.ConfigError(f"{args.config}: has no `scaling` section; is it a sweep "
                                   "config such as experiments/scaling.py:tiny?")
    check(cfg)
    return run_sweep(cfg, args.workdir, progress=args.progress)
  except config_lib.ConfigError as e:
    print(f"gptjax scaling: config error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  if len(sys.argv) not in (2, 3):
    print("usage: python -m gptjax.scaling RUN_DIR [OUT_DIR]   (rebuilds the report; OUT_DIR "
          "defaults to RUN_DIR)", file=sys.stderr)
    sys.exit(2)
  print(write_report(*sys.argv[1:]))
