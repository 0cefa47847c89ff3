"""The router protocol: one class per router, one hook (`route`), one result (`RouterOutput`).

A router is an NNX module held by the MoE block (`MoEBlock.router`, built from `moe.router` through the registry in
`rectify_moe/routers/__init__.py`). It owns its parameters (`nnx.Param`) and its state outside the gradient
(`RouterState`: checkpointed with the model, never optimized), and maps ONE device's tokens to a `RouterOutput`: the
probabilities it ranked the experts by, the routing table (choices, slots, combine weights), its losses and its
counts. `route` runs inside the block's `jax.shard_map`, so it is a pure function of its arguments; mesh-wide
statistics go through `ctx.reduce_axes`.

Optional hooks, all with do-nothing defaults:
- `validate(cfg)` (classmethod): rules on the router's own config fields, raising `ConfigError`;
- `prepare(cfg, *, vocab_size, token_counts)` (classmethod): data-dependent initialisation, e.g. a hash table
  balanced on the training data; its result reaches `__init__` as keyword arguments;
- `after_step(metrics)`: state updated outside the gradient after each optimizer step, from the layer's global
  metrics of that step (e.g. the auxiliary-loss-free expert bias);
- `optimizer_transform(cfg)` (classmethod): an optax transformation appended to the optimizer chain (e.g.
  StableMoE's freeze of its distilled router);
- `describe(cfg)` (classmethod): the router's short name in tables ("Top-2+IR(any)+FR").

Capabilities the block checks (class attributes): `rectifiable` (the router ranks experts by a softmax over all E,
so Intra-device Rectification, Fill-in Rectification and Gating Dropout apply) and `needs_token_ids`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rectify_moe import routing

if TYPE_CHECKING:
  from rectify_moe.config.schema import MoEConfig

Array = jax.Array


class RouterState(nnx.Variable):
  """Router state outside the gradient (a hash table, an expert bias): checkpointed, never optimized."""


@dataclasses.dataclass(frozen=True)
class RouteContext:
  """What a router may read besides its tokens, for one device's shard.

  Attributes:
    token_mask: bool[G, S] (False = padding: never dispatched, excluded from losses and counts).
    token_ids: int32[G, S] input token ids.
    step: int32 scalar, the optimizer step (0 in evaluation).
    train: training (training capacity factor, stage switches) or evaluation.
    capacity: C, slots per expert per group.
    reduce_axes: mesh axes that span the batch (psum over them for batch-global statistics); () unsharded.
  """
  token_mask: Array
  token_ids: Array
  step: Array
  train: bool
  capacity: int
  reduce_axes: tuple[str, ...] = ()

  def global_sum(self, value: Array) -> Array:
    """`value` summed over every device of the batch (itself when unsharded)."""
    return jax.lax.psum(value, self.reduce_axes) if self.reduce_axes else value


@flax.struct.dataclass
class RouterOutput:
  """The routing decision of one device's shard.

  Attributes:
    probs: float32[G, S, E] the probabilities the experts were ranked by (IR picks its local expert by them).
    table: the `routing.RoutingTable` (K ranked choices, slots, combine weights, per-group statistics).
    losses: {name: float32 scalar} per-device values whose mean over the mesh is the global loss (e.g. the
      load-balance loss "aux_loss", weighted by train.aux_loss_weight; other names are added to the training
      loss as they are, already weighted by the router's own field).
    token_loss_sums: {name: float32 scalar} sums over this device's valid tokens; the global loss is their sum
      over the mesh divided by the mesh's valid tokens (e.g. the router z-loss "z_loss").
    counts: {name: float32 scalar or [E]} this device's routing counts (`routing.table_counts`), psum-ed.
  """
  probs: Array
  table: routing.RoutingTable
  losses: dict[str, Array]
  token_loss_sums: dict[str, Array]
  counts: dict[str, Array]


def output(probs: Array, table: routing.RoutingTable, *, losses: Optional[dict[str, Array]] = None,
           token_loss_sums: Optional[dict[str, Array]] = None) -> RouterOutput:
  """A `RouterOutput` with the table's counts."""
  return RouterOutput(probs=probs, table=table, losses=dict(losses or {}),
                      token_loss_sums=dict(token_loss_sums or {}), counts=routing.table_counts(table))


class Router(nnx.Module):
  """Base class of the routers (see the module docstring for the protocol)."""

  rectifiable: ClassVar[bool] = False
  needs_token_ids: ClassVar[bool] = False

  def __init__(self, cfg: "MoEConfig", *, d_model: int, vocab_size: int, rngs: nnx.Rngs):
    self.cfg = cfg

  def route(self, x: Array, ctx: RouteContext) -> RouterOutput:
    """Routes one shard: x [G, S, D] (the block's activations, any float dtype) -> RouterOutput."""
    raise NotImplementedError(f"{type(self).__name__} must implement route(x, ctx).")

  @classmethod
  def validate(cls, cfg: "MoEConfig") -> None:
    """Raises ConfigError for values of the router's own fields it cannot use."""

  @classmethod
  def prepare(cls, cfg: "MoEConfig", *, vocab_size: int,
              token_counts: Optional[Callable[[], np.ndarray]]) -> dict[str, Any]:
    """Data-dependent initialisation: keyword arguments for `__init__`.

    `token_counts()` gives int64[V] token frequencies of the training data; None when there is no data (an
    abstract model whose state a checkpoint restore replaces): then return placeholders of the right shapes.
    """
    return {}

  def after_step(self, metrics: dict[str, Any]) -> None:
    """Updates `RouterState` after an optimizer step from this layer's global metrics ("counts", "losses")."""

  @classmethod
  def optimizer_transform(cls, cfg: "MoEConfig") -> Optional[optax.GradientTransformation]:
    """An optax transformation appended after the optimizer (None = none)."""
    return None

  @classmethod
  def describe(cls, cfg: "MoEConfig") -> str:
    return cfg.router


def softmax_router_kernel(cfg: "MoEConfig", d_model: int, rngs: nnx.Rngs) -> nnx.Param:
  """The [D, E] router kernel (replicated), normal(router_init_std) init."""
  init = nnx.with_partitioning(nnx.initializers.normal(cfg.router_init_std), (None, None))
  return nnx.Param(init(rngs.params(), (d_model, cfg.num_experts)))


def router_logits(x: Array, kernel: Array) -> Array:
  """float32[G, S, E] logits of x [G, S, D] under kernel [D, E], in float32."""
  # Shape: [G, S, E] = einsum("gsd,de->gse")
  return jnp.einsum("gsd,de->gse", x.astype(jnp.float32), kernel.astype(jnp.float32))
