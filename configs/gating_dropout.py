"""Gating Dropout (Liu et al., ICML 2022): Top-1 where, with probability p per step and layer (one decision
shared by all devices), tokens stay on their device and the all-to-all is skipped. Training only.
Variant: configs/gate_expert_drop.py also skips the expert on dropped steps.
"""

from configs import paper


def get_config():
  config = paper.variant_config("top1")
  config.moe.update(dict(gating_dropout=0.2, gating_dropout_mode="gate_drop", gating_dropout_weight="one"))
  return config
