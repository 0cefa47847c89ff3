"""A tiny study for a quick look and the tests: two Top-1 variants, one capacity factor, two seeds, a few steps."""

import ml_collections

from configs.studies import paper


def get_config() -> ml_collections.ConfigDict:
  study = paper.get_config()
  run = study.run
  run.model.update(dict(num_layers=2, d_model=32, num_heads=2, d_ff=64, moe_every=2))
  run.moe.update(dict(expert_dim=64, group_size=32))
  run.train.update(dict(batch_size=8, seq_len=32, warmup_steps=1, eval_batch_size=8))
  run.data.update(dict(stdlib_max_files=20, heldout_fraction=0.2, read_threads=0, prefetch_batches=0))
  study.update(dict(variants="top1,top1_ir_fr", no_lb_variants="", capacity_factors="0.5", seeds=2, dense_steps=4,
                    steps=3, warmup_steps=1, eval_batch_size=8, eval_batches=2))
  return study
