"""Tokens/s and model FLOP/s utilisation of full training steps, vanilla vs rectified routers.

Runs the real jitted train step (train_lib.jit_train_step) on synthetic token batches for each router variant
of a config, after warm-up, device-synchronised. FLOPs per token = 6 * active parameters (the experts
counted k times, i.e. as the router's k choices) + attention (12 * layers * seq * d_model); MFU divides the
achieved FLOP/s by the device's dense bf16 peak when known (GPU), else it is left empty.

  python benchmarks/train_step.py --config=default          # CPU, tiny model
  python benchmarks/train_step.py --config=gpu_medium       # one H100/H200
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import jax

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks import common
from rectify_moe import sharding, train_lib
from rectify_moe.config import schema
from rectify_moe.evaluation.evaluator import global_batch
from rectify_moe.variants import PAPER_VARIANTS as VARIANTS

COLUMNS = ("config", "variant", "median_ms", "tokens_per_s", "model_tflops", "mfu", "active_params_m")


def active_params(state, config) -> int:
  """Parameters one token uses: everything but the experts, plus k of E experts per MoE layer."""
  total, expert = train_lib.count_params(state)
  k, e = config.moe.top_k, config.moe.num_experts
  return int(total - expert + expert * k / e)


def run(config_name="default", variants=("top1", "top1_ir_fr", "top2", "top2_ir_fr"), *, warmup=2, repeats=5,
        overrides=None, out_dir=None):
  rows = []
  for variant in variants:
    config = importlib.import_module(f"configs.{config_name}").get_config()
    config.moe.update(VARIANTS[variant])
    for section, values in (overrides or {}).items():
      config[section].update(values)
    mesh = sharding.make_mesh(*train_lib.validate_config(config))
    graphdef, state, shardings = train_lib.create_train_state(config, mesh)
    cfg = schema.parse(config)
    _, schedule = train_lib.make_optimizer(cfg.train, cfg.moe)
    train_fn = train_lib.jit_train_step(cfg, graphdef, shardings, mesh, schedule)
    rng = np.random.default_rng(0)
    b, t = config.train.batch_size, config.train.seq_len
    local = {"inputs": rng.integers(3, 259, (b, t)).astype(np.int32),
             "targets": rng.integers(3, 259, (b, t)).astype(np.int32), "token_mask": np.ones((b, t), bool)}
    with jax.set_mesh(mesh):
      batch = global_batch(local, mesh)
      holder = {"state": state}

      def step():
        holder["state"], metrics = train_fn(holder["state"], batch)
        return metrics

      timing = common.time_fn(step, warmup=warmup, repeats=repeats, inner=common.default_inner())
    tokens = b * t
    params = active_params(holder["state"], config)
    flops_per_token = 6 * params + 12 * config.model.num_layers * t * config.model.d_model
    achieved = flops_per_token * tokens / timing["median_s"]
    peak = common.PEAK_FLOPS.get(jax.devices()[0].device_kind)
    row = {"config": config_name, "variant": variant, "median_ms": timing["median_s"] * 1e3,
           "tokens_per_s": tokens / timing["median_s"], "model_tflops": achieved / 1e12,
           "mfu": None if peak is None else achieved / (peak * jax.device_count()),
           "active_params_m": params / 1e6}
    rows.append(row)
    print(f"{config_name}/{variant:10s} {row['median_ms']:8.1f} ms/step  {row['tokens_per_s']:10,.0f} tok/s  "
          f"{row['model_tflops']:.3f} TF/s", flush=True)
  notes = (f"Full train step (forward, backward, AdamW) of configs/{config_name}.py, synthetic tokens, "
           f"mesh {config.mesh.to_dict()}, median of {repeats} samples (each {common.default_inner()} back-to-back "
           f"steps) after {warmup} warm-up steps."
           + ("" if jax.default_backend() == "gpu" else " CPU-only figures; MFU needs a known peak (GPU)."))
  common.write_results(f"train_step_{config_name}_{jax.default_backend()}", rows, COLUMNS, notes, out_dir=out_dir)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="default", help="a module name in configs/")
  parser.add_argument("--variants", default="top1,top1_ir_fr,top2,top2_ir_fr")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  run(args.config, tuple(args.variants.split(",")), warmup=args.warmup, repeats=args.repeats, out_dir=args.out)


if __name__ == "__main__":
  main()
