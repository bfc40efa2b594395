"""Config pieces shared by the experiment files. Each experiment's docstring has its launch command."""

import ml_collections

from gptjax.sharding import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stage = "pretrain"

  c.data = ml_collections.ConfigDict()
  c.data.source = "shakespeare"     # or any gptjax.data.sources spec, e.g. "text_files:/x/*.txt"
  c.data.text_field = "text"
  c.data.data_dir = ""               # TFDS data_dir; "" means ~/.cache/gptjax/tfds
  c.data.tokenizer = "char"          # 'char', a workdir/tokenizer dir, or a SentencePiece .model
  c.data.seq_len = 64
  # Pretraining: windows (random windows, nanoGPT), packed (epochs of documents), or grain (packed's
  # batches through a grain pipeline). SFT packs always; 'grain' gives it the same batches via grain.
  c.data.loader = "windows"
  c.data.grain_workers = 0           # with data.loader='grain': worker processes reading documents
  c.data.val_fraction = 0.1

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=0, num_layers=2, num_heads=4, num_kv_heads=None, d_model=64, mlp_dim=None,
      max_len=256, variant="gpt2", norm=None, activation=None, positional=None,
      tie_embeddings=None, use_bias=None, qk_norm=False, rope_theta=10_000.0, norm_eps=1e-5,
      dtype="float32", param_dtype="float32", remat="none", dropout_rate=0.0, scalar_head=False,
      attention_impl=None, scan_unroll=0))
  # LoRA adapters (gptjax/lora.py); rank 0 trains every parameter.
  c.model.lora = ml_collections.ConfigDict(dict(
      rank=0, alpha=16.0, dropout=0.0, targets=("q", "k", "v", "o", "mlp"), base_quant=""))

  c.loss = ml_collections.ConfigDict(dict(name="lm", z_loss=0.0))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=10, decay_steps=0, min_lr_ratio=0.1, b1=0.9, b2=0.99, eps=1e-8,
      weight_decay=0.1, clip_norm=1.0))

  c.train = ml_collections.ConfigDict(dict(
      steps=100, batch_size=16, grad_accum=1, log_every=10, eval_every=50, eval_batches=4,
      sample_every=0, sample_tokens=64, sample_prompts=("ROMEO:\n",), checkpoint_every=50,
      keep_checkpoints=3, init_from="", nan_policy="halt"))

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)          # (data, fsdp, tensor); one -1 takes the remaining devices
  c.mesh.rules = DEFAULT_RULES

  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=0, process_id=-1, cpu_collectives="", auto=False))
  return c


TOY_PROMPTS = ("hello", "tell me", "say it", "speak", "what now", "go on", "sing", "why so")
SIZES = ("micro", "tiny", "gpu")


def rl_fields() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      prompts=(),                   # inline prompts (tests); else data.source's `prompt` field
      max_prompts=0,                # 0 = every train prompt
      prompt_len=24,                # rendered prompt ids, right-padded / truncated to this
      reward="rm",                  # rm | gold | contains:WORD | char_fraction:C | python:MOD:FN
      reward_workdir="",            # the reward stage (rl.reward='rm', critic init)
      reference_workdir="",         # informational: the reference is the initial policy
      value_model="head",           # head (on the policy trunk) | critic (init from the RM) | none
      prompts_per_iteration=16,
      group_size=1,                 # GRPO: G samples per prompt
      max_new_tokens=32,
      temperature=1.0,
      epochs=4,
      iterations=20,
      kl_coef=0.05,                 # β
      kl_adaptive=False,            # Ziegler et al. controller
      kl_target=6.0,
      kl_horizon=10_000.0,
      kl_estimator="k1",            # k1 | k2 | k3 (PPO reward penalty; GRPO's loss always k3)
      gamma=1.0,
      lam=0.95,
      whiten_advantages=True,
      whiten_rewards=False,
      whiten_unbiased=False,        # whitening's variance: 1/n (False) or 1/(n-1) as TRL
      missing_eos_penalty=0.0,
      rollout_engine=False,         # True: continuous-batching rollouts (see the README)
      engine_slots=0,               # the engine's slots (0: one per rollout row)
      normalize_scores=False,
      scale_by_std=True,            # GRPO; False = Dr. GRPO
      scale_rewards="group",        # GRPO: the std of the group, or of the 'batch' (TRL)
      group_eps=1e-4,
      filter_zero_spread=True,
      old_logp="auto",              # auto | recompute | sampler (see rl/rollout.py)
      log_gold=False,               # also log rl/gold_score (VADER) each iteration
      eval_prompts=256,             # held-out prompts for eval.json (0 = skip)
      eval_split="validation",
      eval_temperature=0.7,
  ))


def policy_config(size: str, *, stage: str, loss: dict, online: bool) -> ml_collections.ConfigDict:
  """What every policy-optimisation preset shares, before its objective's own settings.

  micro: tests (a random-init model, a verifiable reward: the fraction of 'e' in the reply);
  tiny: the CPU pipeline (shapes of sft.py:tiny: replies of at most 24 tokens after a 40-token
  prompt fill its max_len of 64); gpu: one accelerator. With train.init_from the architecture
  comes from the SFT run (these sizes are for standalone use); dtype, remat and dropout stay these.
  """
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
  c = base_config()
  c.stage = stage
  c.optim.update(lr=1e-5, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, clip_norm=1.0,
                 b2=0.95)
  c.train.update(log_every=1, eval_every=0, sample_every=0, checkpoint_every=0,
                 keep_checkpoints=2)
  if not online:
    c.data.train_source = ""          # preference_jsonl:PATH (or the objective's own format)
    c.data.eval_source = ""
    c.data.seq_len = 96
  c.rl = rl_fields()
  c.loss = ml_collections.ConfigDict(loss)
  c.data.source = "shakespeare:dialogue"
  if size == "micro":
    c.model.update(num_layers=2, num_heads=2, d_model=32, max_len=32)
    c.rl.update(prompts=TOY_PROMPTS, prompt_len=12, max_new_tokens=12, reward="char_fraction:e",
                eval_prompts=0, eval_split="train", iterations=4, epochs=2)
    c.optim.update(lr=3e-3)
    if not online:
      c.data.seq_len = 32
      c.train.update(steps=6, batch_size=4)
  elif size == "tiny":
    c.model.update(num_layers=4, num_heads=4, d_model=128, max_len=64)
    c.rl.update(prompt_len=40, max_new_tokens=24, eval_prompts=256, reward="rm",
                normalize_scores=True, missing_eos_penalty=1.0, log_gold=True)
    if not online:
      c.data.seq_len = 64
      c.train.update(steps=300, batch_size=16, eval_every=100, eval_batches=4)
      c.optim.lr = 5e-5
  else:
    c.model.update(num_layers=6, num_heads=6, d_model=384, max_len=256, dtype="bfloat16")
    c.rl.update(prompt_len=128, max_new_tokens=128, eval_prompts=512, reward="rm",
                normalize_scores=True, missing_eos_penalty=1.0, log_gold=True)
    if not online:
      c.data.seq_len = 256
      c.train.update(steps=2000, batch_size=64, eval_every=200, eval_batches=10)
    c.optim.lr = 1e-5
  if online:
    c.data.seq_len = c.model.max_len      # unused by RL, but checked against max_len
  return c
