"""The Rectify-Router paper's comparison, in small (docs/paper_study.md).

Like the paper: a dense model upcycled into 8 experts (every expert a copy of its layer's FFN, a fresh router), MoE
every other layer, one expert per device (8 fake CPU devices: mesh data=1, expert=8), every router variant
continued at the same capacity factors, on both sides of 1. Unlike it: a byte-level model of a few million
parameters on the Python standard library source (the offline corpus), trained for minutes, not Llama2-7B.

  python -m rectify_moe.study --study=configs/studies/paper.py --workdir=runs/paper_study
"""

import ml_collections

from rectify_moe.study import config as study_config


def get_config() -> ml_collections.ConfigDict:
  study = study_config.default_study()
  run = study.run
  run.mesh.update(dict(data=1, expert=8))
  # FFN-heavy, so that the MoE layers carry the model (their output zeroed costs far more than seed noise).
  run.model.update(dict(num_layers=4, d_model=128, num_heads=4, d_ff=512, moe_every=2))
  run.moe.update(dict(num_experts=8, expert_dim=512, group_size=256, priority="bpr", router_init_std=0.02))
  run.train.update(dict(batch_size=16, seq_len=128, warmup_steps=30, log_every=50, eval_batch_size=64))
  run.data.heldout_fraction = 0.01
  study.update(dict(devices=8, capacity_factors="0.5,1.0,1.5", seeds=3, dense_steps=600, dense_learning_rate=3e-3,
                    steps=100, learning_rate=1e-3, warmup_steps=10, eval_batch_size=64, eval_batches=0,
                    no_lb_variants="top1,top1_ir_fr"))
  return study
