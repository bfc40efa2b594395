"""Experiment configs: `experiments/<name>.py:<preset>`. A package, so the files import each other
relatively (`from .common import base_config`); gptjax.config loads them as its modules."""
