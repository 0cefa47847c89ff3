"""A GPU-sized model: about 121M parameters in total (8 experts, MoE every other layer), Top-1 + IR + FR, bf16.

Parameters: 8 layers, d_model 512, 8 heads; 4 MoE layers x 8 experts x SwiGLU(512 -> 2048) = 100.7M expert
parameters, plus 4 dense SwiGLU layers (12.6M), attention (8.4M) and embeddings. About 37M are active per token.
Run on one GPU:   python train.py --config=configs/gpu_medium.py --workdir=runs/gpu_medium
On 8 GPUs with one expert per device:  --config.mesh.data=1 --config.mesh.expert=8
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.update(dict(num_layers=8, d_model=512, num_heads=8, d_ff=2048, moe_every=2, dtype="bfloat16"))
  config.moe.update(dict(num_experts=8, expert_dim=2048, group_size=1024, dtype="bfloat16"))
  config.train.update(dict(steps=20000, batch_size=64, seq_len=1024, learning_rate=6e-4, warmup_steps=1000,
                           log_every=50, eval_every=1000, eval_batches=32, eval_batch_size=64,
                           checkpoint_every=1000))
  return config
