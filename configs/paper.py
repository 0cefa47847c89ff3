"""The Rectify-Router paper's eight router variants (rectify_moe/variants.py) on the default tiny model.

Top-1 uses the straight-through combine; FR = top-(k+1) ranking with capacity held at the top-k value; IR = 'all'
for Top-1+IR, 'any' for Top-2+IR, 'ignore_kth' with FR; the IR buffer is exact (no capacity, as the official code;
bound it with e.g. --config.moe.ir_capacity_factor=0.5). Override the capacity factor with
--config.moe.capacity_factor=0.5 (and eval_capacity_factor).
"""

import ml_collections

from configs import default
from rectify_moe import variants

VARIANTS = variants.PAPER_VARIANTS


def variant_config(name: str, base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  config = default.get_config() if base is None else base
  config.moe.update(variants.paper_overrides(name))
  return config


def get_config(name: str = "top1") -> ml_collections.ConfigDict:
  """`--config=configs/paper.py:top2_ir_fr` selects a variant by name."""
  return variant_config(name)
