"""Shared pieces of the training tests: a tiny config and a small offline corpus."""

import os

import ml_collections

from configs import default

_WORDS = ("the router sends every token to its best expert and the rectified router keeps the dropped "
          "tokens on their own device while padding slots take further choices").split()


def write_corpus(folder: str, files: int = 6, lines: int = 120) -> str:
  """Writes a few deterministic text files (a simple language: loss falls fast) and returns a glob."""
  os.makedirs(folder, exist_ok=True)
  for f in range(files):
    with open(os.path.join(folder, f"doc{f}.txt"), "w") as fh:
      for i in range(lines):
        words = [_WORDS[(i * 7 + f * 3 + j * j) % len(_WORDS)] for j in range(12)]
        fh.write(" ".join(words) + ".\n")
  return os.path.join(folder, "*.txt")


def tiny_config(tmp_path, *, mesh=(2, 4), steps: int = 6) -> ml_collections.ConfigDict:
  """A model small enough to compile and step in seconds on fake CPU devices."""
  config = default.get_config()
  config.mesh.data, config.mesh.expert = mesh
  config.data.source = "text_files"
  config.data.text_files = write_corpus(str(tmp_path / "corpus"))
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.heldout_fraction = 0.2
  config.data.read_threads = 0
  config.data.prefetch_batches = 0
  config.model.update(dict(num_layers=2, d_model=32, num_heads=2, d_ff=64, moe_every=2))
  config.moe.update(dict(num_experts=8, expert_dim=32, group_size=32))
  config.train.update(dict(steps=steps, batch_size=16, seq_len=32, warmup_steps=2, learning_rate=3e-3,
                           log_every=2, eval_every=1000, eval_batches=2, eval_batch_size=16,
                           checkpoint_every=1000, keep_checkpoints=3))
  return config
