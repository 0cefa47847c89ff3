"""BASE layers (Lewis et al., ICML 2021) on the default tiny model: in training every expert takes exactly S/E
tokens of each group (a balanced assignment maximising the summed router scores, solved by an auction), greedy
top-1 at evaluation (eval capacity factor 2: few drops; or --config.moe.dispatch=dropless for none). No
load-balance loss (the assignment balances by construction).
"""

from configs import default
from rectify_moe import variants


def get_config():
  config = default.get_config()
  config.moe.update(variants.overrides("base_layer"))
  config.moe.update(dict(capacity_factor=1.0, eval_capacity_factor=2.0))
  config.train.aux_loss_weight = 0.0
  return config
