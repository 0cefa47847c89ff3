"""The Rectify-Router paper's eight router variants on the default tiny model.

Each variant follows the official configs (ZhiYuanZeng/gpt-moe, see docs/routing_contract.md):
- Top-1 uses the straight-through combine (forward weight 1);
- FR = top-(k+1) ranking with capacity held at the top-k value;
- IR = 'all' for Top-1+IR, 'any' for Top-2+IR (the authors' 8-expert run), 'ignore_kth' with FR; the IR
  buffer is exact (no capacity, as the official code).
Override the capacity factor with --config.moe.capacity_factor=0.5 (and eval_capacity_factor).
"""

import ml_collections

from configs import default

VARIANTS = {
    "top1": dict(top_k=1, fill_in=False, ir_mode=None, straight_through=True),
    "top1_ir": dict(top_k=1, fill_in=False, ir_mode="all", straight_through=True),
    "top1_fr": dict(top_k=1, fill_in=True, ir_mode=None, straight_through=False),
    "top1_ir_fr": dict(top_k=1, fill_in=True, ir_mode="ignore_kth", straight_through=False),
    "top2": dict(top_k=2, fill_in=False, ir_mode=None, straight_through=False),
    "top2_ir": dict(top_k=2, fill_in=False, ir_mode="any", straight_through=False),
    "top2_fr": dict(top_k=2, fill_in=True, ir_mode=None, straight_through=False),
    "top2_ir_fr": dict(top_k=2, fill_in=True, ir_mode="ignore_kth", straight_through=False),
}


def variant_config(name: str, base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  if name not in VARIANTS:
    raise ValueError(f"Unknown router variant {name!r}; use one of {sorted(VARIANTS)}.")
  config = default.get_config() if base is None else base
  config.moe.update(VARIANTS[name])
  config.moe.combine = "normalized"
  # The official IR has no capacity: an exact buffer (S slots per local expert; cheap with one expert per
  # device, L x S rows with L local experts). Set a factor to bound it, e.g. --config.moe.ir_capacity_factor=0.5.
  config.moe.ir_capacity_factor = None
  return config


def get_config(name: str = "top1") -> ml_collections.ConfigDict:
  """`--config=configs/paper.py:top2_ir_fr` selects a variant by name."""
  return variant_config(name)
