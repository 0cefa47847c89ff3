"""Dropless top-k (moe.dispatch='dropless') on the default tiny model: every top-k choice is computed (tokens sorted
by expert and grouped matmuls; a ragged all-to-all across expert shards), so capacity factors are ignored and
Intra-device / Fill-in Rectification do not apply. Top-1 by default; --config=configs/dropless.py:top2 for Top-2.
The reference the rectified routers are measured against (eval.py --dropless_reference).
"""

import ml_collections

from configs import default
from rectify_moe import variants


def get_config(name: str = "top1") -> ml_collections.ConfigDict:
  config = default.get_config()
  config.moe.update(variants.overrides(f"{name}_dropless"))
  return config
