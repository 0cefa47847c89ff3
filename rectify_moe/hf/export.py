"""Export a model to a Hugging Face folder (config.json, *.safetensors (+ index), tokenizer files).

  python -m rectify_moe.hf.export --workdir=runs/dense --out=/tmp/exported [--step=300] [--dtype=bfloat16]

What exports: a dense model (model.moe_every=0), e.g. one trained from `--config.init_from=hf:DIR` or from scratch,
as `LlamaForCausalLM` (or `Qwen2ForCausalLM` with qkv biases; an imported Mistral keeps its name); and an upcycled
vanilla top-k MoE with an MoE FFN in every layer (model.moe_every=1, no attention biases) as `MixtralForCausalLM`,
which routes dropless: softmax router, top-k, weights renormalised over the k (our combine='normalized', or top-1
with any weight-1 combine), no capacity. What does not: the Rectify routers (Intra-device and Fill-in
Rectification), an expert bias, combine='probs', StableMoE and hash routing have no Hugging Face counterpart, nor
has a model mixing dense and MoE layers (moe_every > 1); those are refused with one line naming the field.
When the run was imported (`init_from=hf:DIR`), DIR's other config.json keys (token ids, ...) and its tokenizer files
are carried over.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from rectify_moe.config import saved, schema
from rectify_moe.config.fields import ConfigError
from rectify_moe.hf import config as hf_config
from rectify_moe.hf import weights
from rectify_moe.workdir import Workdir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def export(params: dict[str, Any], model: schema.ModelConfig, out_dir: str, *, source_dir: Optional[str] = None,
           dtype: str = "float32", max_shard_bytes: int = 4 << 30, moe: Optional[schema.MoEConfig] = None
           ) -> list[str]:
  """Writes a model's pure parameters to `out_dir` in the Hugging Face layout; returns the files written.

  Args:
    params: the model's pure parameters (`nnx.to_pure_dict`).
    model: its config.
    moe: its MoE config (an MoE model exports as Mixtral when `mixtral_refusal` finds nothing to refuse).
    out_dir: the folder (created).
    source_dir: the folder the model was imported from (its config.json keys and tokenizer files are kept).
    dtype: 'float32' or 'bfloat16'.
    max_shard_bytes: larger models are split into shards with a `model.safetensors.index.json`.
  """
  if model.num_moe_layers:
    reason = mixtral_refusal(model, moe)
    if reason:
      raise ConfigError(reason)
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
  config = hf_config.to_hf(dataclasses.replace(model, moe_every=0), base=base, dtype=dtype)
  if model.num_moe_layers:
    config.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=moe.num_experts,
                  intermediate_size=moe.expert_dim,
                  num_experts_per_tok=moe.top_k, sliding_window=None, output_router_logits=False)
    config.pop("attention_bias", None), config.pop("mlp_bias", None)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  written.append("config.json")
  for name in TOKENIZER_FILES if source_dir else ():
    if os.path.isfile(os.path.join(source_dir, name)):
      shutil.copyfile(os.path.join(source_dir, name), os.path.join(out_dir, name))
      written.append(name)
  return written


def mixtral_refusal(model: schema.ModelConfig, moe: Optional[schema.MoEConfig]) -> str:
  """Why an MoE model has no Hugging Face (Mixtral) counterpart, in one line; '' when it exports as Mixtral."""
  reasons = []
  if moe is None:
    reasons.append("its moe config is unknown")
  else:
    if moe.router != "top_k" or moe.activation != "swiglu":
      reasons.append(f"moe.router={moe.router!r}, moe.activation={moe.activation!r} (needs 'top_k', 'swiglu')")
    if moe.ir_mode or moe.fill_in:
      reasons.append(f"moe.ir_mode={moe.ir_mode!r}, moe.fill_in={moe.fill_in} (the Rectify routers exist only "
                     "here)")
    if moe.expert_bias_update_rate:
      reasons.append(f"moe.expert_bias_update_rate={moe.expert_bias_update_rate} (an expert bias)")
    if moe.combine != "normalized" and moe.top_k > 1:
      reasons.append(f"moe.combine={moe.combine!r} (Mixtral renormalises the top-k weights)")
    if moe.top_k == 1 and moe.combine == "probs" and not moe.straight_through:
      reasons.append("moe.combine='probs' with top-1 (Mixtral's top-1 weight is 1)")
  if model.moe_every != 1:
    reasons.append(f"model.moe_every={model.moe_every} (Mixtral has an MoE FFN in every layer)")
  if model.qkv_bias or model.attn_out_bias:
    reasons.append("attention biases (Mixtral has none)")
  if not reasons:
    return ""
  return ("export: this MoE model has no Hugging Face counterpart: " + "; ".join(reasons) + ". Only a vanilla "
          "top-k MoE in every layer exports (as MixtralForCausalLM, dropless); export the dense run it was "
          "upcycled from instead.")


def export_run(workdir: str, out_dir: str, *, step: Optional[int] = None, dtype: str = "float32") -> list[str]:
  """Exports checkpoint `step` (default: the latest) of a dense training run."""
  paths = Workdir(workdir)
  fix = "--workdir must be a train.py workdir"
  cfg = saved.load(paths.config_json, fix)
  if cfg is None:
    raise ConfigError(f"export: no {paths.config_json}; {fix}.")
  if cfg.model.num_moe_layers and mixtral_refusal(cfg.model, cfg.moe):
    raise ConfigError(mixtral_refusal(cfg.model, cfg.moe))
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
  return export(params, cfg.model, out_dir, dtype=dtype, moe=cfg.moe,
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
