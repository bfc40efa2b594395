"""gptjax: the four-stage GPT recipe (pretrain, SFT, reward model, RLHF) in JAX.

Shape names, used in comments and docstrings across the codebase:
  B batch   T sequence length   S KV-cache length   D model width   H query heads
  N KV heads   K head dim   F MLP hidden width   V vocabulary   L layers   G samples per prompt
  A gradient-accumulation micro-batches   R query heads per KV head (H / N)
  P padded prompt length   M new tokens (max_new_tokens)
"""

__version__ = "0.1.0"

from gptjax import versions as _versions

_versions.warn_if_untested()
