"""The default model with every FFN dense (model.moe_every=0): the starting point of upcycling.

  python train.py --config=configs/dense.py --workdir=runs/dense
  # then an MoE whose experts are copies of the dense FFNs (expert width = model.d_ff):
  python train.py --config=configs/top1_ir_fr.py --workdir=runs/upcycled --config.init_from=runs/dense \\
      --config.moe.expert_dim=512
"""

import ml_collections

from rectify_moe.config import schema


def get_config() -> ml_collections.ConfigDict:
  config = schema.default_config()
  config.model.moe_every = 0
  return config
