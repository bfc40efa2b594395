"""The objectives the stages were built with: pretraining and SFT (next-token cross-entropy), the
Bradley–Terry reward model, PPO and GRPO online, DPO and IPO offline. Their losses live in
gptjax/losses/; this file says what each needs from its runner."""

from gptjax import batches
from gptjax.losses import dpo as dpo_losses
from gptjax.losses import lm as lm_losses
from gptjax.losses import policy as policy_losses
from gptjax.losses import reward as reward_losses
from gptjax.objectives import Objective, register
from gptjax.rl import rollout

_LM_WEIGHTS = {"ce": "tokens", "accuracy": "tokens"}

register(Objective(
    name="lm", loss=lm_losses.lm, runner="pretrain", batch=batches.LMBatch,
    eval_weights={f"train/{k}": f"train/{w}" for k, w in _LM_WEIGHTS.items()},
    description="next-token cross-entropy (+ optional z-loss) on packed documents"))

register(Objective(
    name="sft", loss=lm_losses.sft, runner="sft", batch=batches.LMBatch,
    eval_weights={f"sft/{k}": f"sft/{w}" for k, w in _LM_WEIGHTS.items()},
    description="cross-entropy on the assistant's tokens of chats"))

register(Objective(
    name="reward", loss=reward_losses.reward_loss, runner="reward", batch=batches.RewardBatch,
    check=reward_losses.check_hyperparameters,
    # Pair metrics are means over the batch's pairs; the BT loss is a mean over its rows.
    eval_weights={"rm/accuracy": "rm/pairs", "rm/margin": "rm/pairs", "rm/bt_loss": "rows"},
    description="Bradley–Terry over all ranked pairs of K replies"))

register(Objective(
    name="ppo", loss=policy_losses.ppo, runner="rl", batch=batches.RolloutBatch,
    needs=frozenset({"reference", "critic", "reward"}), kl="reward",
    advantages=rollout.gae_with_kl_reward, shared=("temperature",), compared=True,
    description="clipped policy + clipped value loss; KL in the reward; GAE"))

register(Objective(
    name="grpo", loss=policy_losses.grpo, runner="rl", batch=batches.RolloutBatch,
    check=policy_losses.check_grpo, needs=frozenset({"reference", "group", "reward"}), kl="loss",
    advantages=rollout.group_normalised, shared=("temperature", "kl_coef", "max_len"),
    sampler_old_logp=True, compared=True,
    description="group-normalised advantages, asymmetric clip, k3 KL in the loss"))

register(Objective(
    name="dpo", loss=dpo_losses.dpo, runner="preference", batch=batches.DPOBatch,
    needs=frozenset({"reference"}), compared=True,
    description="−log σ(β·h) over preference pairs, reference log-probs precomputed"))

register(Objective(
    name="ipo", loss=dpo_losses.ipo, runner="preference", batch=batches.DPOBatch,
    needs=frozenset({"reference"}), compared=True,
    description="(h − 1/(2β))² over preference pairs"))
