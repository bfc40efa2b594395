"""Sharding: the same five steps give the same losses on every mesh over 8 simulated CPU devices,
and mesh / rule helpers reject what they cannot do. The multi-device part runs in a child process,
since XLA_FLAGS must be set before JAX starts and this process already has one CPU device."""

import json
import types

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gptjax import sharding as shd
from conftest import run_helper


@pytest.fixture(scope="module")
def parity():
  proc = run_helper("sharding_parity.py", num_devices=8)
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("mesh", ["(8, 1, 1)", "(2, 4, 1)", "(2, 2, 2)"])
def test_five_steps_same_loss_on_every_mesh(parity, mesh):
  reference = parity["(1, 1, 1)"]
  np.testing.assert_allclose(parity[mesh]["losses"], reference["losses"], rtol=1e-5)
  np.testing.assert_allclose(parity[mesh]["param_norm"], reference["param_norm"], rtol=1e-5)
  # Five optimizer steps really moved the loss, so equal curves are not equal constants.
  assert reference["losses"][-1] < reference["losses"][0] - 1e-3


def test_kernels_are_really_sharded_on_the_3d_mesh(parity):
  # blocks/mlp/fc/kernel is [layers, embed, mlp] -> (None, fsdp, tensor) under the default rules.
  assert parity["fc_kernel_spec"] == [None, "fsdp", "tensor"]


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_qlora_base_is_stored_split_like_its_float_kernels(parity, kind):
  """Each device stores its share of a QLoRA base's codes and scales (a quarter of an MLP kernel's
  over fsdp x tensor), placed by `qlora.stored_shardings`, not left to XLA (which may replicate
  them), and the values are those of quantizing the whole base on one device. The memory plan's
  shapes-only base carries the same shardings."""
  got = parity["qlora"][kind]
  assert got["max_diff"] == 0.0 and got["abstract_same"]
  fc = got["shards"]["blocks/mlp/fc/kernel"]
  (full, shard) = fc["codes"]
  # int8: [layers, embed, mlp] split (None, fsdp, tensor); nf4: [layers, blocks, 32] with the
  # blocks split over both axes.
  assert int(np.prod(shard)) * 4 == int(np.prod(full)), fc
  assert all(int(np.prod(s)) < int(np.prod(f)) for f, s in got["shards"]["blocks/attn/query/"
                                                                        "kernel"].values()), got
  assert len(got["shards"]) >= 6


def test_grad_accum_on_a_sharded_mesh(parity):
  # Accumulation changes only how the batch is summed, so the losses match the one-shot run.
  np.testing.assert_allclose(parity["accum2_losses"], parity["(1, 1, 1)"]["losses"][:2],
                             rtol=1e-5)


def test_mesh_shape_resolution_and_errors():
  assert shd.mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert shd.mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  for shape, words in [((3, 1, 1), "does not divide"), ((2, 1, 1), "uses 2 devices"),
                       ((-1, -1, 1), "at most one"), ((2, 2), "expected 3"),
                       ((0, 1, 1), "positive")]:
    with pytest.raises(ValueError, match="mesh.shape") as e:
      shd.mesh_shape(shape, 8)
    assert words in str(e.value)


def test_rules_reject_unknown_mesh_axis():
  with pytest.raises(ValueError, match=r"mesh.rules\[1\].*'model'"):
    shd.rules_from_config((("batch", ("data", "fsdp")), ("embed", "model")))


def test_dimension_that_does_not_divide_is_replicated():
  # fit_spec reads only the mesh's axis sizes, so a stand-in mesh of 4 devices is enough here.
  mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 2, "tensor": 2})
  assert shd.fit_spec(P("tensor", "fsdp"), (64, 32), mesh) == P("tensor", "fsdp")
  # A 65-character vocabulary cannot split over tensor=2: that dimension is replicated instead.
  assert shd.fit_spec(P("tensor", "fsdp"), (65, 32), mesh) == P(None, "fsdp")
  assert shd.fit_spec(P(("data", "fsdp"), None), (3, 32), mesh) == P(None, None)
