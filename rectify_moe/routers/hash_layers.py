"""Hash layers (Roller et al., NeurIPS 2021): a fixed token-id -> expert table, no learned router.

Two tables:
- "random": a random balanced assignment: a seeded permutation of the vocabulary dealt round-robin, so
  every expert owns floor(V/E) or ceil(V/E) token ids;
- "balanced": frequency-balanced: token ids sorted by their frequency in the training data (descending)
  and each given to the expert with the least frequency mass so far (greedy), so expected loads match.
"""

from __future__ import annotations

from collections.abc import Callable
import typing
from typing import TYPE_CHECKING, Any, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rectify_moe import routing
from rectify_moe.routers import base

if TYPE_CHECKING:
  from rectify_moe.config.schema import MoEConfig

Array = jax.Array
HashTableKind = Literal["random", "balanced"]
HASH_TABLES = typing.get_args(HashTableKind)


def random_balanced_table(vocab_size: int, num_experts: int, seed: int = 0) -> np.ndarray:
  """int32[V]: expert of each token id; every expert owns floor(V/E) or ceil(V/E) ids."""
  order = np.random.default_rng(seed).permutation(vocab_size)
  table = np.empty(vocab_size, np.int32)
  table[order] = np.arange(vocab_size) % num_experts
  return table


def frequency_balanced_table(token_counts: np.ndarray, num_experts: int) -> np.ndarray:
  """int32[V]: greedy frequency-balanced assignment (most frequent ids first, each to the lightest expert).

  Ties (equal counts, equal loads) break by the lower token id, fewer ids owned and the lower expert index,
  so the table is a deterministic function of the counts. Ids with count 0 (never seen in training) carry no
  load; they are dealt evenly (to the expert with the fewest such ids; ties: lower load, lower index) instead
  of piling onto the lightest expert. The heaviest expert exceeds the mean load by at most the count
  of the most frequent single token id.
  """
  counts = np.asarray(token_counts, np.int64)
  order = np.argsort(-counts, kind="stable")
  loads = np.zeros(num_experts, np.int64)
  owned = np.zeros(num_experts, np.int64)
  unseen = np.zeros(num_experts, np.int64)  # zero-count ids per expert
  table = np.empty(len(counts), np.int32)
  for token in order:
    if counts[token] > 0:  # lightest expert by load; ties: fewer ids owned, then lower index
      expert = int(np.lexsort((np.arange(num_experts), owned, loads))[0])
    else:  # ids never seen add no load: deal them evenly, lightest experts first
      expert = int(np.lexsort((np.arange(num_experts), loads, unseen))[0])
      unseen[expert] += 1
    table[token] = expert
    loads[expert] += counts[token]
    owned[expert] += 1
  return table


def build_table(kind: str, vocab_size: int, num_experts: int, *, seed: int = 0,
                token_counts: np.ndarray | None = None) -> np.ndarray:
  """The hash table of `kind` ("random" | "balanced"; "balanced" needs token_counts[V])."""
  if kind == "random":
    return random_balanced_table(vocab_size, num_experts, seed)
  if kind == "balanced":
    if token_counts is None:
      raise ValueError("moe.hash_table='balanced' needs token counts from the training data.")
    if len(token_counts) != vocab_size:
      raise ValueError(f"token_counts has {len(token_counts)} entries, expected vocab_size={vocab_size}.")
    return frequency_balanced_table(token_counts, num_experts)
  raise ValueError(f"Unknown moe.hash_table={kind!r}; use one of {list(HASH_TABLES)}.")


class HashRouter(base.Router):
  """Routes each token by `table[token_id]` (weight 1, no gate, no loss); the table is `RouterState` int32[V]."""

  needs_token_ids = True

  def __init__(self, cfg: "MoEConfig", *, d_model: int, vocab_size: int, rngs: nnx.Rngs,
               table: Optional[np.ndarray] = None):
    super().__init__(cfg, d_model=d_model, vocab_size=vocab_size, rngs=rngs)
    if table is None:
      if cfg.hash_table == "balanced":
        raise ValueError("moe.hash_table='balanced' needs the table from HashRouter.prepare (token counts of the "
                         "training data); build the model through rectify_moe.moe.prepare_router.")
      table = random_balanced_table(vocab_size, cfg.num_experts, seed=0)
    if len(table) != vocab_size:
      raise ValueError(f"The hash table has {len(table)} entries, expected vocab_size={vocab_size}.")
    self.table = base.RouterState(jnp.asarray(table, jnp.int32))

  @classmethod
  def prepare(cls, cfg: "MoEConfig", *, vocab_size: int,
              token_counts: Optional[Callable[[], np.ndarray]]) -> dict[str, Any]:
    if cfg.hash_table != "balanced":
      return {}
    if token_counts is None:  # an abstract model: the checkpoint holds the table
      return {"table": np.zeros((vocab_size,), np.int32)}
    return {"table": frequency_balanced_table(token_counts(), cfg.num_experts)}

  def route(self, x: Array, ctx: base.RouteContext) -> base.RouterOutput:
    choice = self.table[...][ctx.token_ids]
    onehot = jax.nn.one_hot(choice, self.cfg.num_experts, dtype=jnp.float32)
    table = routing.route_top_k(onehot, top_k=1, capacity=ctx.capacity, priority="position", combine="probs",
                                token_mask=ctx.token_mask)  # weight 1 for accepted tokens: no gate
    return base.output(onehot, table)

  @classmethod
  def describe(cls, cfg: "MoEConfig") -> str:
    return "Hash"
