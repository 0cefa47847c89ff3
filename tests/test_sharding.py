"""rectify_moe.sharding: meshes, partition specs, layout checks (8 fake CPU devices, see conftest.py)."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from rectify_moe import sharding


@pytest.mark.parametrize("args, shape", [
    ((2, 4), (2, 4)),
    ((1, 8), (1, 8)),
    ((8, 1), (8, 1)),
    ((1, 1), (1, 1)),
    ((2, 2), (2, 2)),
    ((-1, 4), (2, 4)),
    ((4, -1), (4, 2)),
    ((-1, 1), (8, 1)),
    ((), (8, 1)),          # defaults: all devices on data, expert axis 1
])
def test_make_mesh_shapes(args, shape):
    mesh = sharding.make_mesh(*args)
    assert mesh.axis_names == ("data", "expert") == sharding.AXES
    assert (mesh.shape["data"], mesh.shape["expert"]) == shape
    assert mesh.devices.shape == shape
    assert tuple(mesh.axis_types) == (AxisType.Auto, AxisType.Auto)
    assert mesh.devices.size == shape[0] * shape[1]
    assert set(mesh.devices.flat) <= set(jax.devices())


def test_make_mesh_explicit_devices():
    devices = jax.devices()[4:]
    mesh = sharding.make_mesh(2, 2, devices=devices)
    assert set(mesh.devices.flat) == set(devices)
    mesh = sharding.make_mesh(-1, 2, devices=devices)
    assert (mesh.shape["data"], mesh.shape["expert"]) == (2, 2)


def test_too_many_devices_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Mesh \(4, 4\) needs 16 devices but only 8 exist"):
        sharding.make_mesh(4, 4)
    with pytest.raises(ValueError, match=r"jax_num_cpu_devices"):
        sharding.make_mesh(16, 1)
    with pytest.raises(ValueError, match=r"needs 4 devices but only 2 exist"):
        sharding.make_mesh(2, 2, devices=jax.devices()[:2])


@pytest.mark.parametrize("args, pattern", [
    ((-1, -1), r"cannot both be -1"),
    ((0, 1), r"mesh\.data=0 must be >= 1"),
    ((1, 0), r"mesh\.expert=0 must be >= 1"),
    ((-2, 1), r"mesh\.data=-2 must be >= 1"),
    ((-1, 3), r"mesh\.expert=3 does not divide the 8 available devices"),
    ((3, -1), r"mesh\.data=3 does not divide the 8 available devices"),
])
def test_bad_mesh_shapes(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        sharding.make_mesh(*args)


def test_resolve_mesh_shape():
    assert sharding.resolve_mesh_shape(-1, 2, 8) == (4, 2)
    assert sharding.resolve_mesh_shape(2, -1, 8) == (2, 4)
    assert sharding.resolve_mesh_shape(1, 2, 8) == (1, 2)  # fewer than all devices is allowed
    with pytest.raises(ValueError, match="needs 12 devices"):
        sharding.resolve_mesh_shape(3, 4, 8)


def test_specs():
    assert sharding.token_spec() == P(("data", "expert"), None, None)
    assert sharding.token_spec(3) == P(("data", "expert"), None, None)
    assert sharding.token_spec(2) == P(("data", "expert"), None)
    assert sharding.token_spec(1) == P(("data", "expert"))
    assert sharding.expert_spec() == P("expert", None, None)
    assert sharding.expert_spec(3) == P("expert", None, None)
    assert sharding.expert_spec(1) == P("expert")
    mesh = sharding.make_mesh(2, 4)
    assert sharding.named(mesh, sharding.token_spec(2)) == NamedSharding(mesh, P(("data", "expert"), None))


@pytest.mark.parametrize("mesh_shape", [(2, 4), (4, 2), (1, 8), (8, 1)])
def test_token_and_expert_layout(mesh_shape):
    """The layout the MoE tests' reference assumes: mesh position (d, e) -> flat index i = d*n_exp + e
    holds batch rows [i*B/n, (i+1)*B/n); expert weights: mesh position (d, e) holds experts [e*L, (e+1)*L)."""
    mesh = sharding.make_mesh(*mesh_shape)
    n_data, n_exp = mesh_shape
    batch, num_experts = 16, 8
    rows_per, L = batch // (n_data * n_exp), num_experts // n_exp
    tokens = jax.device_put(np.arange(batch * 3).reshape(batch, 3), sharding.named(mesh, sharding.token_spec(2)))
    experts = jax.device_put(np.arange(num_experts * 2).reshape(num_experts, 2),
                             sharding.named(mesh, sharding.expert_spec(2)))
    position = {dev: (d, e) for (d, e), dev in np.ndenumerate(mesh.devices)}
    for shard in tokens.addressable_shards:
        d, e = position[shard.device]
        i = d * n_exp + e
        np.testing.assert_array_equal(np.asarray(shard.data)[:, 0] // 3, np.arange(i * rows_per, (i + 1) * rows_per))
    for shard in experts.addressable_shards:
        _, e = position[shard.device]
        np.testing.assert_array_equal(np.asarray(shard.data)[:, 0] // 2, np.arange(e * L, (e + 1) * L))


def _layout(**overrides):
    kw = dict(num_experts=8, expert_axis=4, global_batch=8, seq_len=16, group_size=8, num_devices=8)
    kw.update(overrides)
    sharding.validate_moe_layout(**kw)


def test_validate_moe_layout_accepts_good_layouts():
    _layout()
    _layout(expert_axis=8, group_size=16)
    _layout(num_experts=1, expert_axis=1, num_devices=1, global_batch=3, group_size=48)


def test_validate_moe_layout_messages():
    with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by the mesh's expert axis \(4\).*"
                                         r"Use an expert axis that divides 6"):
        _layout(num_experts=6)
    with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by the 8 devices.*multiple of 8"):
        _layout(global_batch=12)
    with pytest.raises(ValueError, match=r"Each device holds 16 tokens \(batch 8 / 8 devices x seq_len 16\).*"
                                         r"moe\.group_size=6.*divides 16"):
        _layout(group_size=6)
    with pytest.raises(ValueError, match=r"group_size=32"):
        _layout(group_size=32)  # larger than a device's tokens
