"""StableMoE (Dai et al., ACL 2022) on the default tiny model.

Stage 1 (steps < moe.stablemoe_switch_step): greedy top-1 routing by centroid scores, sigmoid gate, balance
loss (alpha = train.aux_loss_weight = 0.3) and a distilled token-id router (weight 0.3). Stage 2: routing by
the frozen distilled router. Capacity factor 2.0 as the official README.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.moe.update(dict(router="stablemoe", top_k=1, fill_in=False, ir_mode=None, straight_through=False,
                         combine="probs", capacity_factor=2.0, eval_capacity_factor=2.0,
                         stablemoe_switch_step=100, stablemoe_routing_dim=50, stablemoe_distill_weight=0.3))
  config.train.aux_loss_weight = 0.3
  return config
