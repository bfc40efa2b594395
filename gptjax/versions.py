"""The versions of the JAX stack that gptjax is tested with, and a warning past them.

setup.py sets only floors for jax, flax, optax and orbax-checkpoint: a Colab TPU runtime or a TPU
VM comes with whatever jax is current there, matched to its libtpu or CUDA plugin, and a cap would
make `pip install -e .` downgrade it out of step with that plugin. Instead, importing gptjax warns
once when one of them is newer than the newest release we have run the tests on.

This module imports nothing heavy (no jax): it runs at `import gptjax`, before gptjax.perf has
had the chance to set process options that must precede JAX.
"""

import importlib.metadata
import warnings

from packaging.version import InvalidVersion, Version

# Newest releases the test suite passed with (benchmarks/RESULTS.md, "Versions tested").
# Floors in setup.py are the oldest releases we support; both are updated together.
TESTED = {
    "jax": "0.10.2",
    "jaxlib": "0.10.2",
    "flax": "0.12.8",
    "optax": "0.2.8",
    "orbax-checkpoint": "0.12.8",
}
FLOORS = {
    "jax": "0.10.0",
    "flax": "0.12.0",
    "optax": "0.2.5",
    "orbax-checkpoint": "0.12.0",
}

_warned = False


def newer_than_tested(installed=None):
  """[(package, installed version, newest tested version)] for packages past TESTED.

  `installed` maps package name to version string; None reads the environment. A package that is
  absent or has a version string that does not parse is left out (it cannot be compared).
  """
  found = []
  for name, tested in TESTED.items():
    if installed is None:
      try:
        version = importlib.metadata.version(name)
      except importlib.metadata.PackageNotFoundError:
        continue
    else:
      version = installed.get(name)
      if version is None:
        continue
    try:
      if Version(version).release > Version(tested).release:
        found.append((name, version, tested))
    except InvalidVersion:
      continue
  return found


def warn_if_untested(installed=None):
  """Warns once per process for every package newer than the newest tested release."""
  global _warned
  if _warned:
    return
  _warned = True
  for name, version, tested in newer_than_tested(installed):
    warnings.warn(
        f"gptjax: {name} {version} is newer than the newest version gptjax is tested with "
        f"({name} {tested}); it will probably work, and if it does not, "
        f"pip install '{name}=={tested}' restores the tested one",
        UserWarning, stacklevel=3)
