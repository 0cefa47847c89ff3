"""Device meshes, partition specs and the checks that a configuration fits a mesh.

The mesh has two axes: `data` and `expert`. Tokens (the batch axis) are sharded over both, so every
device holds its own tokens; expert weights `[E, ...]` are sharded over `expert` and replicated over
`data`. Axis types are Auto (the MoE block is a manual `jax.shard_map` region; the rest is left to the
compiler).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
EXPERT = "expert"
AXES = (DATA, EXPERT)

# Batch axis sharded over every device: P(("data", "expert")).
BATCH = (DATA, EXPERT)


def token_spec(ndim: int = 3) -> P:
  """PartitionSpec of a `[B, ...]` token array: batch over (data, expert), the rest replicated."""
  return P(BATCH, *([None] * (ndim - 1)))


def expert_spec(ndim: int = 3) -> P:
  """PartitionSpec of stacked expert weights `[E, ...]`: experts over `expert`."""
  return P(EXPERT, *([None] * (ndim - 1)))


def resolve_mesh_shape(data: int, expert: int, num_devices: int) -> tuple[int, int]:
  """Resolves -1 entries (use all remaining devices) and checks the shape fits `num_devices`.

  Raises:
    ValueError: with the fix, if the shape is impossible.
  """
  if data == -1 and expert == -1:
    raise ValueError("mesh.data and mesh.expert cannot both be -1; set one of them to a size.")
  for name, value in ((DATA, data), (EXPERT, expert)):
    if value != -1 and value < 1:
      raise ValueError(f"mesh.{name}={value} must be >= 1 (or -1 for all remaining devices).")
  if data == -1:
    if num_devices % expert:
      raise ValueError(f"mesh.expert={expert} does not divide the {num_devices} available devices; "
                       f"pick a divisor of {num_devices}.")
    data = num_devices // expert
  if expert == -1:
    if num_devices % data:
      raise ValueError(f"mesh.data={data} does not divide the {num_devices} available devices; "
                       f"pick a divisor of {num_devices}.")
    expert = num_devices // data
  if data * expert > num_devices:
    raise ValueError(
        f"Mesh ({data}, {expert}) needs {data * expert} devices but only {num_devices} exist "
        f"({jax.default_backend()}). Lower mesh.data/mesh.expert, or on CPU simulate devices: run with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={data * expert} (or in Python, "
        f"jax.config.update('jax_num_cpu_devices', {data * expert}) before using JAX).")
  return data, expert


def make_mesh(data: int = -1, expert: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds the (data, expert) mesh with Auto axis types.

  Args:
    data: size of the `data` axis, -1 for all remaining devices.
    expert: size of the `expert` axis, -1 for all remaining devices.
    devices: devices to use (default: all of `jax.devices()`); the first data*expert are taken.

  Returns:
    A `jax.sharding.Mesh` with axes ("data", "expert"). Enter it with `jax.set_mesh(mesh)`.
  """
  devices = list(jax.devices() if devices is None else devices)
  data, expert = resolve_mesh_shape(data, expert, len(devices))
  return jax.make_mesh((data, expert), AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices[:data * expert])


def named(mesh: Mesh, spec: P) -> NamedSharding:
  return NamedSharding(mesh, spec)


def validate_moe_layout(*, num_experts: int, expert_axis: int, global_batch: int, seq_len: int,
                        group_size: int, num_devices: int) -> None:
  """Checks that an MoE configuration fits a mesh, before anything is compiled.

  Args:
    num_experts: E.
    expert_axis: size of the mesh's `expert` axis.
    global_batch: sequences per step over all devices.
    seq_len: tokens per sequence.
    group_size: S, tokens per routing group.
    num_devices: devices in the mesh (data * expert).

  Raises:
    ValueError: naming the offending values and what to change.
  """
  if num_experts % expert_axis:
    raise ValueError(
        f"num_experts={num_experts} is not divisible by the mesh's expert axis ({expert_axis}); every device "
        f"must hold the same number of experts. Use an expert axis that divides {num_experts}.")
  if global_batch % num_devices:
    raise ValueError(
        f"batch_size={global_batch} is not divisible by the {num_devices} devices of the mesh (the batch is "
        f"sharded over data x expert). Use a multiple of {num_devices}.")
  tokens_per_device = global_batch // num_devices * seq_len
  if tokens_per_device % group_size:
    raise ValueError(
        f"Each device holds {tokens_per_device} tokens (batch {global_batch} / {num_devices} devices x seq_len "
        f"{seq_len}), which is not divisible by moe.group_size={group_size}. Pick a group size that divides "
        f"{tokens_per_device}.")
