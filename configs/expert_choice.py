"""Expert Choice (Zhou et al., NeurIPS 2022) on the default tiny model: every expert takes its top-C tokens of each
group (C = S / E * capacity_factor; capacity factor 2 = two experts per token on average, the paper's EC-CF2).

NOT CAUSAL: an expert's choice looks at the whole group, later tokens included; training a decoder with it lets
routing see the future (the trainer says so at start-up). Its main use is as an evaluation swap on a causally
trained router: python eval.py --workdir=<run> --swap=router=expert_choice,capacity_factor=2.
"""

from configs import default
from rectify_moe import variants


def get_config():
  config = default.get_config()
  config.moe.update(variants.overrides("expert_choice"))
  config.moe.update(dict(capacity_factor=2.0, eval_capacity_factor=2.0))
  return config
