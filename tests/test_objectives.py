"""The objective registry and the objectives added through it: each loss against its published
formula on hand-computed numbers (no model), the registry's fields, `--config.loss.<declared>=`,
and new objectives run as pipeline stages (each one's own micro run, with LoRA, is in
tests/test_lora.py)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import config as config_lib
from gptjax import objectives
from gptjax.losses import dpo as dpo_losses
from gptjax.losses import policy
from gptjax.objectives import gspo, kto, orpo, reinforce_pp, rloo, simpo
from gptjax.rl import advantages as adv_lib
from gptjax.rl import rollout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = ("rloo", "reinforce_pp", "gspo", "kto", "orpo", "simpo")


def scored(scores, logratio, mask, *, beta, group_size=1, **cfg):
  mask = jnp.asarray(mask, jnp.float32)
  ref = jnp.zeros_like(mask)
  return rollout.Scored(old_logp=jnp.asarray(logratio, jnp.float32) * mask, ref_logp=ref,
                        values=ref, mask=mask, scores=jnp.asarray(scores, jnp.float32),
                        beta=beta, cfg=rollout.RolloutConfig(group_size=group_size, **cfg))


# ------------------------------------------------------------------------ online objectives --

def test_rloo_leave_one_out_baseline_with_the_kl_in_the_reward():
  # Per-token log-ratio 0.5 over 2, 1 and 3 tokens: KL sums 1.0, 0.5, 1.5; β = 0.2, so the
  # rewards are 0.8, 1.9, 5.7, and each is compared with the mean of the other two.
  s = scored([1.0, 2.0, 6.0], 0.5, [[1, 1, 0], [1, 0, 0], [1, 1, 1]], beta=0.2, group_size=3)
  out = rloo.advantages(s)
  np.testing.assert_allclose(np.asarray(out.advantages)[:, 0], [-3.0, -1.35, 4.35], atol=1e-5)
  np.testing.assert_allclose(out.advantages, np.asarray(out.advantages)[:, :1] * s.mask)
  # Groups are independent: (1, 2) and (4, 7) in pairs.
  np.testing.assert_allclose(rloo.leave_one_out_advantages(jnp.asarray([1., 2., 4., 7.]),
                                                           group_size=2), [-1, 1, -3, 3])


def test_reinforce_pp_returns_then_global_normalisation():
  kl = jnp.asarray([[0.1, 0.2, 0.3], [0.5, 0.5, 0.0]])
  mask = jnp.asarray([[1., 1., 1.], [1., 1., 0.]])
  g = reinforce_pp.token_returns(jnp.asarray([1.0, -2.0]), kl, mask, beta=0.5)
  # Rewards −β·KL_t, the score added at the last token, summed from t to the end.
  np.testing.assert_allclose(g, [[0.7, 0.75, 0.85], [-2.5, -2.25, 0.0]], atol=1e-6)
  s = scored([1.0, -2.0], 0.0, mask, beta=0.5)
  s.old_logp = kl * mask                       # k1 of (old − ref) is the log-ratio itself
  out = reinforce_pp.advantages(s)
  flat = np.asarray([0.7, 0.75, 0.85, -2.5, -2.25])
  want = (flat - flat.mean()) / np.sqrt(flat.var() + 1e-8)
  np.testing.assert_allclose(np.asarray(out.advantages)[np.asarray(mask) > 0], want, atol=1e-5)


def test_gspo_sequence_ratio_is_length_normalised_and_clipped_per_sequence():
  logp = jnp.asarray([[0.1, 0.3], [-0.2, 9.0], [5.0, 5.0]])
  mask = jnp.asarray([[1., 1.], [1., 0.], [0., 0.]])       # the third row has no tokens
  adv = jnp.asarray([[1.0, 1.0], [-1.0, 0.0], [3.0, 3.0]]) * mask
  loss, m = gspo.gspo_objective(logp, jnp.zeros_like(logp), adv, mask, clip_eps_low=0.2,
                                clip_eps_high=0.2)
  # s = exp(mean log-ratio): e^0.2 = 1.2214 (A = 1, clipped to 1.2) and e^-0.2 = 0.8187
  # (A = −1: −min(−0.8187, −0.8) = 0.8187); the loss averages the two real sequences.
  np.testing.assert_allclose(float(loss), (-1.2 + np.exp(-0.2)) / 2, atol=1e-6)
  assert float(m["rl/clipfrac_binding"]) == pytest.approx(0.5)


def test_grpo_batch_std_scaling_and_the_binding_clip_fraction():
  scores = jnp.asarray([1.0, 3.0, 2.0, 2.0])
  group, _ = adv_lib.group_advantages(scores, group_size=2)
  batch, _ = adv_lib.group_advantages(scores, group_size=2, std_scope="batch")
  np.testing.assert_allclose(group, [-1 / (np.sqrt(2) + 1e-4), 1 / (np.sqrt(2) + 1e-4), 0, 0],
                             atol=1e-6)
  std = np.std([1, 3, 2, 2], ddof=1)
  np.testing.assert_allclose(batch, [-1 / (std + 1e-4), 1 / (std + 1e-4), 0, 0], atol=1e-6)
  # Ratios 1.5, 1.5, 0.5, 0.5 against advantages +, −, −, +: all four are outside 1 ± 0.2, but
  # only the first (above, A > 0) and the third (below, A < 0) clips change the gradient.
  logp = jnp.log(jnp.asarray([[1.5, 1.5, 0.5, 0.5]]))
  _, m = policy.clipped_surrogate(logp, jnp.zeros_like(logp), jnp.asarray([[1., -1., -1., 1.]]),
                                  jnp.ones_like(logp), clip_eps_low=0.2, clip_eps_high=0.2)
  assert float(m["rl/clipfrac"]) == 1.0 and float(m["rl/clipfrac_binding"]) == 0.5


def test_whitening_variance_biased_by_default_unbiased_on_request():
  x, mask = jnp.asarray([1., 2., 3., 4.]), jnp.ones(4)
  np.testing.assert_allclose(adv_lib.whiten(x, mask), (np.arange(1, 5) - 2.5) / np.sqrt(1.25),
                             atol=1e-6)
  np.testing.assert_allclose(adv_lib.whiten(x, mask, unbiased=True),
                             (np.arange(1, 5) - 2.5) / np.sqrt(5 / 3), atol=1e-6)


def test_grpo_dr_grpo_normaliser_is_the_given_completion_budget():
  per_token, mask = jnp.ones((2, 10)), jnp.ones((2, 10)).at[1, 5:].set(0)
  assert float(policy.aggregate(per_token, mask, mode="dr_grpo", max_len=5)) == 1.5
  assert float(policy.aggregate(per_token, mask, mode="dr_grpo")) == 0.75   # T = 10


# ----------------------------------------------------------------------- offline objectives --

def test_kto_value_against_a_clamped_reference_point():
  lp, ref = jnp.asarray([-1.0, -2.0]), jnp.asarray([-1.5, -1.0])
  # Mismatched pairs' log-ratios 0.4 and −0.2: z = max(0, 0.1) = 0.1.
  kl_lp, kl_ref = jnp.asarray([-3.0, -3.0]), jnp.asarray([-3.4, -2.8])
  loss, m = kto.kto_loss(lp, ref, kl_lp, kl_ref, jnp.asarray([1.0, 0.0]), beta=1.0,
                         undesirable_weight=2.0)
  sig = lambda x: 1 / (1 + np.exp(-x))
  want = ((1 - sig(0.5 - 0.1)) + 2 * (1 - sig(0.1 + 1.0))) / 2
  assert float(loss) == pytest.approx(want, abs=1e-6)
  assert float(loss) == pytest.approx(0.450396, abs=1e-5)
  assert float(m["kto/reference_point"]) == pytest.approx(0.1, abs=1e-6)
  _, m = kto.kto_loss(lp, ref, kl_lp, kl_ref + 1.0, jnp.asarray([1.0, 0.0]))
  assert float(m["kto/reference_point"]) == 0.0          # a negative KL estimate is clamped


def test_orpo_nll_plus_log_odds_ratio():
  lw, mw = jnp.asarray([[-0.5, -1.5]]), jnp.ones((1, 2))
  ll, ml = jnp.asarray([[-2.0, -2.0, 7.0]]), jnp.asarray([[1., 1., 0.]])
  loss, m = orpo.orpo_loss(lw, mw, ll, ml, beta=0.1)
  log_odds = lambda a: a - np.log(1 - np.exp(a))
  ratio = log_odds(-1.0) - log_odds(-2.0)
  assert float(m["orpo/log_odds_ratio"]) == pytest.approx(ratio, abs=1e-5)
  assert float(loss) == pytest.approx(1.0 + 0.1 * np.log1p(np.exp(-ratio)), abs=1e-5)
  assert float(loss) == pytest.approx(1.0238194, abs=1e-5)


def test_simpo_length_normalised_margin():
  lw, mw = jnp.asarray([[-1.0, -3.0]]), jnp.ones((1, 2))
  ll, ml = jnp.asarray([[-3.0, 100.0]]), jnp.asarray([[1., 0.]])
  loss, _ = simpo.simpo_loss(lw, mw, ll, ml, beta=2.0, gamma=1.0)
  # z = 2·(−2) − 2·(−3) − 1 = 1.
  assert float(loss) == pytest.approx(np.log1p(np.exp(-1.0)), abs=1e-6)


def test_ipo_length_normalisation_option():
  args = (jnp.asarray([-4.0]), jnp.asarray([-6.0]), jnp.asarray([-5.0]), jnp.asarray([-3.0]))
  summed, _ = dpo_losses.ipo_loss(*args, beta=0.5)
  per_token, _ = dpo_losses.ipo_loss(*args, beta=0.5, len_w=jnp.asarray([2.0]),
                                     len_l=jnp.asarray([3.0]))
  assert float(summed) == pytest.approx((4.0 - 1.0) ** 2)       # h = 1 − (−3)
  assert float(per_token) == pytest.approx((1.5 - 1.0) ** 2)    # h = 1/2 − (−3/3)


# ------------------------------------------------------------------------------- registry --

def test_registry_describes_every_objective():
  names = objectives.names()
  assert set(NEW) | {"ppo", "grpo", "dpo", "ipo"} <= set(names)
  for o in objectives.registered():
    assert o.online == (o.advantages is not None), o.name
    assert o.runner in objectives.RUNNERS
  assert "critic" in objectives.get("ppo").needs and objectives.get("ppo").kl == "reward"
  assert objectives.get("grpo").kl == "loss" and "group" in objectives.get("rloo").needs
  assert "reference" not in objectives.get("simpo").needs
  assert objectives.get("kto").batch is kto.KTOBatch


def test_any_declared_loss_hyperparameter_can_be_set_from_the_command_line():
  spec = os.path.join(REPO, "experiments", "rl.py") + ":dpo_micro"
  cfg = config_lib.load(spec, ["loss.gamma=0.5", "loss.name=simpo"])
  assert cfg.loss.gamma == 0.5 and cfg.loss.name == "simpo"
  with pytest.raises(config_lib.ConfigError, match="loss.gamma"):
    config_lib.load(spec, ["loss.gamma=0.5"])               # DPO's loss takes no gamma
  cfg = config_lib.load(spec, ["loss.name=ipo", "loss.length_normalize=True"])
  assert cfg.loss.length_normalize is True


def test_a_plain_registered_loss_is_an_objective_of_its_stage():
  from gptjax import losses

  @losses.register("test_hinge_loss")
  def hinge(params, batch, *, frozen=None, rng=None, model, delta: float = 1.0):
    raise NotImplementedError
  o = objectives.get("test_hinge_loss", stage="dpo")
  assert o.runner == "preference" and o.hyperparameters() == {"delta": 1.0}
  assert not o.compared


def test_kto_reads_its_format_and_names_the_bad_field(tmp_path):
  good = tmp_path / "good.jsonl"
  good.write_text(json.dumps({"prompt": "hi", "completion": "hello", "label": True}) + "\n")
  recs = kto.read(f"kto_jsonl:{good}", None)
  assert recs[0]["label"] is True and recs[0]["prompt"][-1]["content"] == "hi"
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "hi", "completion": "x", "label": "yes"}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'label'"):
    kto.read(f"kto_jsonl:{bad}", None)


# ---------------------------------------------------------------- trained end to end (micro) --

# Each new objective trained from its micro preset by the stage runners is in tests/test_lora.py
# (test_each_new_objective_trains_from_its_preset_with_lora): one run per objective, with
# adapters, which goes through the same objective and shared update step as a full fine-tune.


def test_new_objectives_are_pipeline_stages_in_the_comparison_and_report(micro_pipeline,
                                                                         tmp_path):
  """An online and an offline objective added through registration alone run as pipeline stages
  (from SFT, with the RM or the rm_data pairs linked by their runner) and appear in compare.json
  and the report card, with no edit in the pipeline, the comparison or the report."""
  import shutil
  import subprocess
  from conftest import PIPELINE_STAGES, child_env, pipeline_cmd
  run = str(tmp_path / "run")
  shutil.copytree(micro_pipeline, run)
  stages = [s for s in PIPELINE_STAGES if s not in ("compare", "report")] + [
      "rloo", "kto", "compare", "report"]
  proc = subprocess.run(pipeline_cmd(run, stages), env=child_env(), cwd=REPO,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[pipeline] ppo: complete, skipping" in proc.stdout
  cmp = json.load(open(os.path.join(run, "compare.json")))
  assert {"rloo", "kto", "ppo", "dpo"} <= set(cmp["policies"])
  for name in ("rloo", "kto"):
    assert np.isfinite(cmp["policies"][name]["gold_mean"])
    assert os.path.exists(os.path.join(run, name, "done.json"))
  # The micro pipeline evaluates online stages on held-out prompts as they finish (eval.json);
  # offline ones, like DPO there, are evaluated by the comparison only.
  assert os.path.exists(os.path.join(run, "rloo", "eval.json"))
  report = open(os.path.join(run, "report.md")).read()
  assert "rloo" in report and "kto" in report
