"""Hash layers (Roller et al., NeurIPS 2021): tokens routed by a fixed table of their id, no learned router.
--config.moe.hash_table=balanced builds a frequency-balanced table from the training data instead of the
random balanced one."""

from configs import default


def get_config():
  config = default.get_config()
  config.moe.update(dict(router="hash", hash_table="random", top_k=1, fill_in=False, ir_mode=None,
                         straight_through=False, combine="probs", capacity_factor=1.25,
                         eval_capacity_factor=1.25))
  return config
