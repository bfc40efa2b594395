"""`gptjax pipeline`: the whole recipe in one command, one workdir per stage.

    gptjax pipeline --config experiments/shakespeare_assistant.py:tiny --workdir runs/demo

Stages run in `cfg.pipeline.stages` order: tokenizer → pretrain → sft → rm_data → reward → ppo,
with grpo, dpo, ppo_beta0 (PPO without its KL penalty: the over-optimisation run) and every other
registered objective with a preset (ipo, rloo, reinforce_pp, gspo, kto, orpo, simpo) as optional
branches from SFT, then the comparison and the report card. Each
stage writes `<run>/<stage>/done.json` when it completes; running the command again skips completed
stages and resumes a partial one from its own checkpoints, so a killed pipeline finishes with the
same result as an uninterrupted one. `done.json` records the config fields the stage depends on; a
completed stage whose fields differ from the current config is an error (its results are kept),
except the comparison, which runs again, e.g. when GRPO or DPO are added to a finished run.

Other recipes (experiments/arithmetic_reasoning.py) use the same command with stages of their own:
`pipeline.stage_fns` maps a stage name to a library function `module:function(cfg, run_dir,
progress)`, which takes precedence over the built-in one of that name; any other name with a
sub-config of its own that names a `stage` trains that runner with it. In a stage's string fields
`{run}` stands for the run directory, so a config can point one stage at another's output
(`train.init_from="{run}/sft_cot"`, `data.source="chat_jsonl:{run}/task_data/sft_cot.jsonl"`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import jax

from gptjax import config as config_lib
from gptjax import stage_names
from gptjax.data.errors import DataError
from gptjax.stage_names import SEEDS_DIR

DONE_FILE = "done.json"
XLA_CACHE_DIR = "xla_cache"       # <run>/xla_cache: the run's compiled programs (see `run`)


def stage_dir(run_dir: str, name: str) -> str:
  return os.path.join(run_dir, name)


def is_done(run_dir: str, name: str) -> bool:
  return os.path.exists(os.path.join(stage_dir(run_dir, name), DONE_FILE))


def read_done(run_dir: str, name: str) -> dict:
  with open(os.path.join(stage_dir(run_dir, name), DONE_FILE)) as f:
    return json.load(f)


def _mark_done(run_dir: str, name: str, info: dict) -> None:
  if jax.process_index() != 0:
    return
  d = stage_dir(run_dir, name)
  os.makedirs(d, exist_ok=True)
  tmp = os.path.join(d, DONE_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(info, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(d, DONE_FILE))   # atomic: a kill never leaves a half marker


def _flat(tree, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def stage_fingerprint(cfg, name: str, run_dir: str) -> dict:
  """The config fields a stage's result depends on, flattened; recorded in its done.json.

  A stage's own sub-config (plus the seed): a change upstream is caught at the upstream stage.
  The comparison also depends on which RL stages it compares.
  """
  if name == "tokenizer":
    parts = {"tokenizer": cfg.tokenizer.to_dict()}
  elif name == "rm_data":
    parts = {"reward.rm_data": cfg.reward.rm_data.to_dict(), "reward.sft": cfg.reward.sft.to_dict()}
  elif name == "compare":
    pc = cfg.pipeline.to_dict()
    for field in ("stages", "seeds", "seeded_stages"):   # they do not change this comparison
      pc.pop(field, None)
    parts = {"pipeline": pc, "ppo.rl": cfg.ppo.rl.to_dict(),
             "compared": [n for n in stage_names.policy_stages()
                          if n in cfg.pipeline.stages and is_done(run_dir, n)]}
  elif name == "report":
    parts = {}                      # rewritten from the files on every run
  elif name in cfg:
    parts = {name: cfg[name].to_dict()}
  else:
    parts = {}
  parts["seed"] = cfg.seed
  flat = _flat(parts)
  # A completed stage under the default policy never met a non-finite step, so its result is the
  # same as without the field; leaving it out keeps runs finished before the field existed valid.
  for key in [k for k, v in flat.items() if k.endswith("train.nan_policy") and v == "halt"]:
    del flat[key]
  # A JSON round trip, so a fingerprint read back from done.json compares equal to a fresh one.
  return json.loads(json.dumps(flat, sort_keys=True, default=str))


def _config_changes(old: dict, new: dict) -> list[str]:
  keys = sorted(set(old) | set(new))
  missing = "(absent)"
  return [f"{k}: {old.get(k, missing)!r} then, {new.get(k, missing)!r} now"
          for k in keys if old.get(k, missing) != new.get(k, missing)]


def stage_config(cfg, name: str, run_dir: str, *, init_from: str = ""):
  """A copy of the stage's sub-config, linked to the run's tokenizer and previous stage."""
  c = copy.deepcopy(cfg[name])
  with c.unlocked():
    c.data.tokenizer = stage_dir(run_dir, "tokenizer")
    if init_from:
      c.train.init_from = stage_dir(run_dir, init_from)
  return with_run_dir(c, run_dir)


def with_run_dir(c, run_dir: str):
  """`{run}` in any string field of `c` (a ConfigDict, changed in place) becomes `run_dir`."""
  import ml_collections
  for k, v in list(c.items()):
    if isinstance(v, ml_collections.ConfigDict):
      with_run_dir(v, run_dir)
    elif isinstance(v, str) and "{run}" in v:
      with c.unlocked():
        c[k] = v.replace("{run}", run_dir)
  return c


def _set(c, dotted: str, value) -> None:
  node, parts = c, dotted.split(".")
  for p in parts[:-1]:
    node = node[p]
  if parts[-1] not in node:
    raise config_lib.ConfigError(f"pipeline: stage config has no field {dotted!r}")
  with node.unlocked():
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------- the stages --

def _tokenizer(cfg, run_dir, progress):
  from gptjax.data import sentencepiece_tokenizer, tokenizers
  from gptjax.data.sources import open_source
  out = stage_dir(run_dir, "tokenizer")
  t = cfg.tokenizer
  if t.kind == "char":
    from gptjax.data import shakespeare
    tok = tokenizers.CharTokenizer.from_text(shakespeare.corpus_text("train"))
    tok.save(out)
  else:
    src = open_source("shakespeare:text", split="train")
    texts = (src[i]["text"] for i in range(len(src)))
    tok = sentencepiece_tokenizer.train_sentencepiece(texts, vocab_size=t.vocab_size,
                                                      model_type=t.kind, out_dir=out)
  return {"vocab_size": tok.vocab_size}


def _train_stage(name, init_from=""):
  def fn(cfg, run_dir, progress):
    from gptjax.stages import run_stage
    c = stage_config(cfg, name, run_dir, init_from=init_from)
    _link(c, name, run_dir)
    c.lock()
    res = run_stage(c, stage_dir(run_dir, name), progress=progress)
    if res.interrupted:
      return None
    return {"steps": res.step, **res.timings,
            "final_metrics": {k: v for k, v in res.last_metrics.items()},
            "stop_requested": res.stop_requested}
  return fn


def _link(c, name, run_dir):
  """Points a stage at the outputs of the stages it reads (beyond init_from): an online policy
  stage at the RM, an offline one at the preference data (by its objective's runner)."""
  if name == "reward":
    # The reward stage finds the rm_data step's files through the same manifest, so it reuses
    # them instead of sampling again.
    _set(c, "rm_data.out_dir", stage_dir(run_dir, "rm_data"))
  if name not in stage_names.policy_stages():
    return
  from gptjax import objectives
  runner = objectives.for_stage(c).runner
  if runner == "rl":
    _set(c, "rl.reference_workdir", stage_dir(run_dir, "sft"))
    _set(c, "rl.reward_workdir", stage_dir(run_dir, "reward"))
  if runner == "preference":
    # The files of this run directory, not the paths recorded when they were written: a run
    # moved or copied elsewhere must read its own copy.
    rm_dir = stage_dir(run_dir, "rm_data")
    files = _read_json(os.path.join(rm_dir, "files.json"))
    _set(c, "data.train_source",
         "preference_jsonl:" + os.path.join(rm_dir, os.path.basename(files["train"])))
    _set(c, "data.eval_source",
         "preference_jsonl:" + os.path.join(rm_dir, os.path.basename(files["validation"])))


def _rm_data(cfg, run_dir, progress):
  from gptjax import rm_data
  c = stage_config(cfg, "reward", run_dir, init_from="sft")
  out = stage_dir(run_dir, "rm_data")
  _set(c, "rm_data.out_dir", out)
  c.lock()
  files = rm_data.generate(c, sft_workdir=stage_dir(run_dir, "sft"), out_dir=out,
                           progress=progress)
  with open(os.path.join(out, "files.json"), "w") as f:
    json.dump(files, f, indent=2)
  return {"files": files}


def _compare(cfg, run_dir, progress):
  from gptjax import compare
  return compare.run(cfg, run_dir, progress=progress)


def _report(cfg, run_dir, progress):
  from gptjax import report
  path = report.write(run_dir)
  return {"report": path}


def stage_fns() -> dict:
  """Stage name -> its function; every policy stage (stage_names.policy_stages) trains from SFT."""
  return {
      "tokenizer": _tokenizer,
      "pretrain": _train_stage("pretrain"),
      "sft": _train_stage("sft", init_from="pretrain"),
      "rm_data": _rm_data,
      "reward": _train_stage("reward", init_from="sft"),
      **{name: _train_stage(name, init_from="sft") for name in stage_names.policy_stages()},
      "compare": _compare,
      "report": _report,
  }


def _read_json(path):
  with open(path) as f:
    return json.load(f)


# ------------------------------------------------------------------- what the console says --

def _read_json_or_none(path):
  try:
    return _read_json(path)
  except (OSError, ValueError):
    return None


def _last_line(path):
  try:
    with open(path) as f:
      lines = [line for line in f if line.strip()]
    return json.loads(lines[-1]) if lines else None
  except (OSError, ValueError):
    return None


def _fmt(parts) -> str:
  return ", ".join(f"{label} {value:.3f}" if isinstance(value, float) else f"{label} {value}"
                   for label, value in parts if value is not None)


def stage_summary(run_dir: str, name: str, info: dict) -> str:
  """The one line that says what a finished stage produced (the figures the report card
  shows), read from the files it wrote."""
  d = stage_dir(run_dir, name)
  final = info.get("final_metrics") or {}
  ev = _read_json_or_none(os.path.join(d, "eval.json")) or {}
  if name == "tokenizer":
    parts = [("vocabulary", info.get("vocab_size"))]
  elif name == "pretrain":
    parts = [("train loss", final.get("train/loss")), ("held-out loss", final.get("eval/loss"))]
  elif name == "sft":
    parts = [("held-out loss", ev.get("eval/loss")),
             ("replies ending their turn", ev.get("end_of_turn_fraction"))]
  elif name == "rm_data":
    m = _read_json_or_none(os.path.join(d, "manifest.json")) or {}
    parts = [(f"{split} prompts", c.get("prompts")) for split, c in m.get("counts", {}).items()]
    parts += [(f"{split} mean gold", c.get("mean_gold"))
              for split, c in m.get("counts", {}).items()]
  elif name == "reward":
    parts = [("held-out accuracy", ev.get("accuracy_noisy")),
             ("vs the noiseless labeler", ev.get("accuracy_noiseless")),
             ("Spearman with gold", ev.get("spearman_gold"))]
  elif name in stage_names.rl_stages():
    last = _last_line(os.path.join(d, "rl_iterations.jsonl")) or {}
    parts = [("last iteration: RM score", last.get("rl/score")),
             ("gold", last.get("rl/gold_score")), ("KL", last.get("rl/kl")),
             ("held-out gold", ev.get("gold_mean")), ("KL to SFT", ev.get("kl_to_ref"))]
  elif name in stage_names.policy_stages():
    # An offline objective: its own pair metrics (dpo/accuracy, orpo/accuracy, ...), then gold.
    parts = [(k.replace("/", " "), final[k]) for k in sorted(final)
             if k.endswith(("/accuracy", "/margin")) and not k.startswith(("train/", "eval/"))]
    parts.append(("held-out gold", ev.get("gold_mean")))
  elif name == "compare":
    c = _read_json_or_none(os.path.join(run_dir, "compare.json")) or {}
    parts = [(f"{p} gold", r.get("gold_mean")) for p, r in c.get("policies", {}).items()]
  else:
    parts = []
  return _fmt(parts)


def _stage_work(cfg, name: str):
  """(kind, amount of work) of a stage, from its config alone, for the ETA: tokens trained for
  the supervised stages, tokens sampled and trained on for the online RL ones."""
  if name not in cfg:
    return None, 0
  online = stage_names.rl_stages()
  offline = [s for s in stage_names.policy_stages() if s not in online]
  if name in ("pretrain", "sft", "reward") or name in offline:
    c = cfg[name]
    sides = 2 if name in offline else 1          # pairs, or a reply and its mismatched one (KTO)
    return "train", c.train.steps * c.train.batch_size * c.data.seq_len * sides
  if name in online:
    r = cfg[name].rl
    rollouts = r.iterations * r.prompts_per_iteration * max(r.group_size, 1)
    return "rl", rollouts * (r.prompt_len + r.max_new_tokens) * (1 + r.epochs)
  return None, 0


def eta_line(cfg, run_dirs, remaining) -> str | None:
  """The time the remaining stages should take at the seconds per unit of work that this run's
  finished stages of the same kind measured (wall time, compilation included). `run_dirs`: the
  directories whose finished stages count (the main run's and a seed's); `remaining`: stage
  names, or (directory, stage name) pairs, still to run (those already complete count zero)."""
  rates = {}
  for d in dict.fromkeys([run_dirs] if isinstance(run_dirs, str) else run_dirs):
    for name in stage_fns():
      kind, work = _stage_work(cfg, name)
      if kind and work and is_done(d, name) and not os.path.islink(stage_dir(d, name)):
        wall = (_read_json_or_none(os.path.join(stage_dir(d, name), DONE_FILE)) or {}
                ).get("wall_s")
        if wall:
          rates.setdefault(kind, []).append(wall / work)
  total, unknown = 0.0, []
  for item in remaining:
    d, name = item if isinstance(item, tuple) else (None, item)
    kind, work = _stage_work(cfg, name)
    if not kind or (d is not None and is_done(d, name)):
      continue
    if kind not in rates:
      unknown.append(name)
      continue
    total += work * sorted(rates[kind])[len(rates[kind]) // 2]
  if not total and not unknown:
    return None
  if not total:
    return (f"ETA: known once a stage like {unknown[0]} has finished (from its measured speed)")
  line = f"ETA: about {max(total / 60, 1):.0f} min for the remaining training stages"
  if unknown:
    line += f", plus {', '.join(unknown)} (no stage of their kind has finished yet)"
  return line


def environment() -> dict:
  dev = jax.devices()[0]
  return {"python": platform.python_version(), "jax": jax.__version__,
          "platform": dev.platform, "device_kind": dev.device_kind,
          "device_count": jax.device_count(), "process_count": jax.process_count(),
          "host": platform.node(), "machine": platform.machine(),
          "cpu_count": os.cpu_count()}


def stage_fn(cfg, name: str):
  """The function that runs stage `name`: the config's `pipeline.stage_fns[name]`
  ('module:function'), else the built-in one, else a training stage from the config's own
  sub-config of that name (it must name its runner in `stage`)."""
  import importlib
  extra = cfg.pipeline.get("stage_fns") or {}
  if name in extra:
    module, _, fn = extra[name].partition(":")
    try:
      return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
      raise config_lib.ConfigError(f"pipeline.stage_fns.{name}: cannot load {extra[name]!r} "
                                   f"({e})") from None
  builtin = stage_fns()
  if name in builtin:
    if name in stage_names.policy_stages() and name not in cfg:
      raise config_lib.ConfigError(
          f"pipeline.stages: stage {name!r} has no sub-config {name!r} in this config (the "
          f"assistant recipe makes one from experiments/{name}.py)")
    return builtin[name]
  if name in cfg and "stage" in cfg[name]:
    return _train_stage(name)
  raise config_lib.ConfigError(f"pipeline.stages: unknown stage {name!r}; expected one of "
                               f"{stage_names.all_stages()}, a name in pipeline.stage_fns, or a "
                               "sub-config with a 'stage' field")


def seeded_stages(cfg) -> list[str]:
  """The stages each extra seed runs again: `pipeline.seeded_stages`, or every stage after SFT
  (the post-training ones) of `pipeline.stages`; the report is written once, for all seeds."""
  chosen = tuple(cfg.pipeline.get("seeded_stages", ()))
  for s in chosen:
    if s not in cfg.pipeline.stages or s in ("tokenizer", "report"):
      raise config_lib.ConfigError(
          f"pipeline.seeded_stages: {s!r} cannot run per seed; expected stages of "
          f"pipeline.stages other than tokenizer and report")
  if not chosen:
    names = stage_names.all_stages()
    chosen = names[names.index("sft") + 1:]
  return [s for s in cfg.pipeline.stages if s in chosen and s != "report"]


def seed_config(cfg, seed: int):
  """The pipeline config of one extra seed: every stage's seed and the comparison's set to it,
  only the seeded stages to run, and no seeds of its own."""
  c = copy.deepcopy(cfg)
  with c.unlocked():
    c.seed = seed
    for sub in c.values():
      if isinstance(sub, type(c)) and "seed" in sub:
        sub.seed = seed
    c.pipeline.stages = tuple(seeded_stages(cfg))
    c.pipeline.seeds = ()
  return c


def _extra_seeds(cfg) -> list[int]:
  seeds = [int(x) for x in cfg.pipeline.get("seeds", ())]
  if len(set(seeds)) != len(seeds):
    raise config_lib.ConfigError(f"pipeline.seeds: {tuple(seeds)} repeats a seed")
  return [x for x in seeds if x != cfg.seed]


def _link_shared_stages(run_dir: str, seed_dir: str, seeded: list[str]) -> None:
  """A seed's directory sees the main run's other stages (tokenizer, pretrain, SFT, ...) through
  symbolic links, so its stages find their inputs where a single run keeps them."""
  os.makedirs(seed_dir, exist_ok=True)
  for name in sorted(os.listdir(run_dir)):
    target = stage_dir(run_dir, name)
    link = stage_dir(seed_dir, name)
    if (name in seeded or name in ("report", SEEDS_DIR, XLA_CACHE_DIR)
        or not os.path.isdir(target)):
      continue
    if not os.path.lexists(link) and jax.process_index() == 0:
      os.symlink(os.path.relpath(target, seed_dir), link)


def run(cfg, run_dir: str, *, progress: bool = True) -> int:
  """Runs the pipeline; returns a process exit code (0 done, 143 interrupted and resumable).

  With `pipeline.seeds`, the main run (seed `cfg.seed`) comes first, then each other seed's
  seeded stages under <run>/seeds/<seed>/, then the report card over all of them."""
  stages = list(cfg.pipeline.stages)
  for s in stages:
    stage_fn(cfg, s)                 # an unknown stage is an error before anything runs
  for s in stages:
    # Caught before hours of earlier stages, not when the stage starts.
    if s in cfg and isinstance(cfg[s], type(cfg)) and "optim" in cfg[s]:
      try:
        config_lib.check_ranges(cfg[s])
      except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f"{s}.{e}") from None
  extra = _extra_seeds(cfg)
  seeded = seeded_stages(cfg) if extra else []
  os.makedirs(run_dir, exist_ok=True)
  if not jax.config.jax_compilation_cache_dir and jax.process_count() == 1:
    # The stages compile many of the same programs: the SFT stages share one train step, the
    # evaluation stages share samplers, and a seed's stages compile everything its first run did.
    # A cache hit is the executable XLA would have built, so no result depends on it. (One
    # process only: with several, each would write the same entries to the one shared folder.)
    # The setting is the process's: a later pipeline in the same process (a notebook that runs
    # two) keeps using the first run's folder, which is harmless, as entries are keyed by program.
    jax.config.update("jax_compilation_cache_dir", os.path.join(run_dir, XLA_CACHE_DIR))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  if jax.process_index() == 0:
    with open(os.path.join(run_dir, "pipeline_config.json"), "w") as f:
      f.write(config_lib.to_json(cfg))
    with open(os.path.join(run_dir, "environment.json"), "w") as f:
      json.dump(environment(), f, indent=2)
  head = [s for s in stages if s != "report"]
  tail = ["report"] if "report" in stages else []
  todo = [(cfg, run_dir, head)]
  for seed in extra:
    todo.append((seed_config(cfg, seed), os.path.join(run_dir, SEEDS_DIR, str(seed)), seeded))
  todo.append((cfg, run_dir, tail))
  for k, (c, d, names) in enumerate(todo):
    if not names:
      continue
    if d != run_dir:
      print(f"[pipeline] seed {c.seed}: {', '.join(names)} in {d}", flush=True)
      _link_shared_stages(run_dir, d, names)
      if jax.process_index() == 0:
        with open(os.path.join(d, "pipeline_config.json"), "w") as f:
          f.write(config_lib.to_json(c))
    later = [(dd, n) for _, dd, ns in todo[k + 1:] for n in ns]
    code = _run_stages(c, d, names, progress, later=later, rate_dirs=(run_dir, d))
    if code:
      return code
  if tail and is_done(run_dir, "report"):
    print(f"[pipeline] finished; the report card is "
          f"{read_done(run_dir, 'report').get('report')}", flush=True)
  return 0


def _run_stages(cfg, run_dir: str, stages: list[str], progress: bool, *, later=(),
                rate_dirs=()) -> int:
  """Runs `stages` in `run_dir` (skipping completed ones); `later` are the stages still to come
  after these (other seeds', the report), counted in the ETA."""
  for i, name in enumerate(stages):
    fingerprint = stage_fingerprint(cfg, name, run_dir)
    if is_done(run_dir, name) and name != "report":
      recorded = read_done(run_dir, name).get("config")
      changes = [] if recorded is None else _config_changes(recorded, fingerprint)
      if not changes:
        print(f"[pipeline] {name}: complete, skipping", flush=True)
        continue
      if name != "compare":
        # Never reuse a result made under other settings, and never delete it either: the
        # researcher decides which of the two runs they meant.
        shown = "; ".join(changes[:8]) + ("; ..." if len(changes) > 8 else "")
        raise config_lib.ConfigError(
            f"pipeline stage {name!r} in {stage_dir(run_dir, name)} was completed with a "
            f"different config ({len(changes)} field(s): {shown}). Its results are kept. To run "
            f"the stage again with the new config, move that directory aside (the stages after "
            f"it too); to reuse it, pass the original values, or choose another --workdir.")
      # The comparison is derived from the stages' checkpoints and is cheap to redo, e.g. after
      # `--config.pipeline.stages` adds GRPO or DPO to a finished run.
      print(f"[pipeline] compare: config changed ({'; '.join(changes)}); running it again",
            flush=True)
    print(f"[pipeline] {name}: running", flush=True)
    t0 = time.time()
    info = stage_fn(cfg, name)(cfg, run_dir, progress)
    if info is None:
      print(f"[pipeline] {name}: interrupted; run the same command again to resume", flush=True)
      return 143
    stop = info.pop("stop_requested", False)
    info["wall_s"] = time.time() - t0
    info["config"] = fingerprint
    _mark_done(run_dir, name, info)
    summary = stage_summary(run_dir, name, info)
    print(f"[pipeline] {name}: done in {info['wall_s']:.1f}s" + (f"; {summary}" if summary
                                                                 else ""), flush=True)
    eta = eta_line(cfg, rate_dirs or (run_dir,),
                   [*((run_dir, n) for n in stages[i + 1:]), *later])
    if eta:
      print(f"[pipeline] {eta}", flush=True)
    if stop and (i + 1 < len(stages) or later):
      # The signal came after the stage's last step: the stage is complete and kept, and the
      # pipeline stops as asked instead of starting the next one.
      print(f"[pipeline] stopping after {name}, as a signal asked; run the same command again to "
            "go on", flush=True)
      return 143
  return 0


def main(argv) -> int:
  overrides, rest = config_lib.split_argv(argv)
  p = argparse.ArgumentParser(prog="gptjax pipeline")
  p.add_argument("--config", required=True, help="path.py:preset")
  p.add_argument("--workdir", required=True, help="the run directory; one subdirectory per stage")
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--seeds", default=None,
                 help="comma-separated seeds, e.g. 0,1,2 (the same as --config.pipeline.seeds)")
  args = p.parse_args(rest)
  try:
    if args.seeds is not None:
      try:
        seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
      except ValueError:
        raise config_lib.ConfigError(f"--seeds: expected comma-separated integers such as "
                                     f"0,1,2, got {args.seeds!r}") from None
      overrides = [*overrides, f"pipeline.seeds={seeds!r}"]
    cfg = config_lib.load(args.config, overrides)
    from gptjax import sharding
    sharding.init_distributed(cfg.distributed)
    return run(cfg, args.workdir, progress=not args.no_progress)
  except config_lib.ConfigError as e:
    print(f"gptjax: config error: {e}", file=sys.stderr)
    return 2
  except DataError as e:
    print(f"gptjax: data error: {e}", file=sys.stderr)
    return 2
