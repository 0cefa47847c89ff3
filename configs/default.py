"""Default: a tiny top-1 MoE LM (Top-1 + IR + FR) that trains on a laptop CPU in a few minutes, offline.

Data: the Python standard library source (present on every machine), byte-level tokens.
Run: python train.py --config=configs/default.py --workdir=runs/default
Override any field: --config.moe.top_k=2 --config.train.steps=100 (every field: docs/config_reference.md)
"""

import ml_collections

from rectify_moe.config import schema


def get_config() -> ml_collections.ConfigDict:
  config = schema.default_config()  # every field of every section, at the schema's defaults
  # The MoE layers: Top-1 + IR + FR (the paper's best top-1 router) with batch-prioritized routing.
  config.moe.update(dict(priority="bpr", fill_in=True, ir_mode="ignore_kth", ir_capacity_factor=0.5,
                         eval_capacity_factor=1.0))
  return config
