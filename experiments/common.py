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
