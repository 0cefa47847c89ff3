"""Gate-Expert-Drop (Liu et al., ICML 2022): like Gating Dropout, and a dropped step also skips the expert
(the token keeps only its residual path)."""

from configs import gating_dropout


def get_config():
  config = gating_dropout.get_config()
  config.moe.gating_dropout_mode = "gate_expert_drop"
  return config
