"""Default: a tiny top-1 MoE LM (Top-1 + IR + FR) that trains on a laptop CPU in a few minutes, offline.

Data: the Python standard library source (present on every machine), byte-level tokens.
Run: python train.py --config=configs/default.py --workdir=runs/default
Override any field: --config.moe.top_k=2 --config.train.steps=100
"""

import ml_collections

from rectify_moe.config import schema
from rectify_moe.config.fields import to_config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Mesh: sizes of the 'data' and 'expert' axes; -1 = all remaining devices.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, expert=1))

  config.data = to_config_dict(schema.DataConfig())

  config.model = ml_collections.ConfigDict(dict(
      vocab_size=259, num_layers=4, d_model=128, num_heads=4, d_ff=512, moe_every=2,
      dtype="float32", remat=False, rope_base=10000.0, tie_embeddings=False))

  # The MoE layers (see rectify_moe/moe.py::MoEConfig). Default: Top-1 + IR + FR (the paper's best top-1 router).
  config.moe = ml_collections.ConfigDict(dict(
      num_experts=8, expert_dim=256, top_k=1, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0,
      priority="bpr", fill_in=True, fill_in_priority="same", ir_mode="ignore_kth", ir_capacity_factor=0.5,
      combine="normalized", straight_through=False, group_size=256, activation="swiglu", dispatch="einsum",
      dtype="float32", load_balance_all_k=False, router_init_std=0.02, eps=1e-9))

  config.train = ml_collections.ConfigDict(dict(
      steps=300, batch_size=16, seq_len=128,
      learning_rate=3e-3, warmup_steps=30, end_lr_factor=0.1, weight_decay=0.1, grad_clip=1.0,
      b1=0.9, b2=0.95,
      aux_loss_weight=0.01, z_loss_weight=0.0,
      log_every=25, eval_every=100, eval_batches=8, eval_batch_size=16,
      checkpoint_every=100, keep_checkpoints=3,
      write_loads=True,
      # Stop (with a checkpoint) after this step without changing the schedule; 0 = run to train.steps.
      stop_at_step=0,
      # Multi-host: "auto" initialises jax.distributed when the environment says so (see README).
      distributed="auto",
  ))
  return config
