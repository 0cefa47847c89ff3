"""Export a dense model to a Hugging Face folder (config.json, *.safetensors (+ index), tokenizer files).

  python -m rectify_moe.hf.export --workdir=runs/dense --out=/tmp/exported [--step=300] [--dtype=bfloat16]

What exports: a dense model (model.moe_every=0), e.g. one trained from `--config.init_from=hf:DIR` or from scratch,
as `LlamaForCausalLM` (or `Qwen2ForCausalLM` with qkv biases; an imported Mistral keeps its name). What does not:
an MoE run. The Llama-family layout has no MoE layers; the nearest Hugging Face MoE layout (Mixtral) needs an MoE FFN
in every layer and vanilla dropless top-k routing, and the Rectify routers (Intra-device and Fill-in Rectification,
capacity, StableMoE, hash routing) have no Hugging Face counterpart at all, so an MoE run is refused with one line.
When the run was imported (`init_from=hf:DIR`), DIR's other config.json keys (token ids, ...) and its tokenizer files
are carried over.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any, Optional

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from rectify_moe import checkpoints, sharding
from rectify_moe import model as model_lib
from rectify_moe.config import schema
from rectify_moe.config.fields import ConfigError
from rectify_moe.hf import config as hf_config
from rectify_moe.hf import weights
from rectify_moe.workdir import Workdir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def export(params: dict[str, Any], model: schema.ModelConfig, out_dir: str, *, source_dir: Optional[str] = None,
           dtype: str = "float32", max_shard_bytes: int = 4 << 30) -> list[str]:
  """Writes a dense model's pure parameters to `out_dir` in the Hugging Face layout; returns the files written.

  Args:
    params: the dense model's pure parameters (`nnx.to_pure_dict`).
    model: its config.
    out_dir: the folder (created).
    source_dir: the folder the model was imported from (its config.json keys and tokenizer files are kept).
    dtype: 'float32' or 'bfloat16'.
    max_shard_bytes: larger models are split into shards with a `model.safetensors.index.json`.
  """
  if model.num_moe_layers:
    raise ConfigError(refusal(model))
  base = hf_config.read(source_dir) if source_dir else None
  tensors = weights.host_tensors(params, model, DTYPES[dtype])
  os.makedirs(out_dir, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, value in tensors.items():
    if shards[-1] and size + value.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = value
    size += value.nbytes
  written = []
  if len(shards) == 1:
    names = ["model.safetensors"]
  else:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
             "weight_map": {t: f for f, shard in zip(names, shards) for t in shard}}
    with open(os.path.join(out_dir, weights.INDEX), "w") as f:
      json.dump(index, f, indent=2)
    written.append(weights.INDEX)
  for name, shard in zip(names, shards):
    save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
    written.append(name)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config.to_hf(model, base=base, dtype=dtype), f, indent=2)
  written.append("config.json")
  for name in TOKENIZER_FILES if source_dir else ():
    if os.path.isfile(os.path.join(source_dir, name)):
      shutil.copyfile(os.path.join(source_dir, name), os.path.join(out_dir, name))
      written.append(name)
  return written


def refusal(model: schema.ModelConfig, moe: Optional[schema.MoEConfig] = None) -> str:
  router = f", moe.router={moe.router!r}" if moe is not None else ""
  return (f"export: an MoE model (model.moe_every={model.moe_every}{router}) has no Hugging Face counterpart: the "
          "Llama-family layout is dense, Mixtral's needs an MoE FFN in every layer with dropless top-k, and the "
          "Rectify routers (IR, FR, capacity) exist only here; export the dense run it was upcycled from.")


def export_run(workdir: str, out_dir: str, *, step: Optional[int] = None, dtype: str = "float32") -> list[str]:
  """Exports checkpoint `step` (default: the latest) of a dense training run."""
  paths = Workdir(workdir)
  try:
    with open(paths.config_json) as f:
      cfg = schema.parse(json.load(f))
  except (OSError, ValueError) as e:
    raise ConfigError(f"export: cannot read {paths.config_json} ({str(e).splitlines()[0]}); --workdir must be a "
                      "train.py workdir.") from None
  if cfg.model.num_moe_layers:
    raise ConfigError(refusal(cfg.model, cfg.moe))
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  _, abstract = model_lib.abstract_model(cfg, mesh)
  ckpt = checkpoints.Checkpointer(paths, read_only=True)
  try:
    step = ckpt.select_step(step)
    params = ckpt.restore_model(step, checkpoints.abstract_target(abstract, mesh))
  except checkpoints.CheckpointError as e:
    raise ConfigError(f"export: {e}") from None
  finally:
    ckpt.close()
  source = hf_config.hf_dir(cfg.init_from)
  return export(params, cfg.model, out_dir, dtype=dtype,
                source_dir=source if source and os.path.isdir(source) else None)


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a dense train.py run")
  parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
  args = parser.parse_args(argv)
  try:
    files = export_run(args.workdir, args.out, step=args.step, dtype=args.dtype)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"Wrote {', '.join(files)} to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
