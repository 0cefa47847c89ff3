"""All-to-all payload per training step of the MoE block, read from the compiled HLO, for every router variant.

IR and FR must add zero communication: FR keeps the [E, C, D] buffers of the router it rectifies, and IR
runs on the device's own experts. This benchmark compiles forward+backward of one MoE block on a (2, 4)
mesh of fake CPU devices and sums the result bytes of every all-to-all (one device's view).

  python benchmarks/comm.py            # writes benchmarks/results/comm.{json,md}
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

if __name__ == "__main__":
  jax.config.update("jax_num_cpu_devices", 8)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp
from flax import nnx

from benchmarks import common
from rectify_moe import moe, sharding
from rectify_moe.config.schema import MoEConfig
from rectify_moe.variants import PAPER_VARIANTS as VARIANTS

COLUMNS = ("variant", "all_to_all_ops", "all_to_all_bytes", "extra_vs_base_bytes", "all_reduce_ops",
           "capacity", "a2a_rows_per_token")


def measure(variant: str, *, mesh_shape=(2, 4), d_model=64, expert_dim=128, num_experts=8, batch=16, seq=64,
            group_size=64, capacity_factor=1.0, dtype="bfloat16") -> dict:
  """Compiles grad of one MoE block and returns its collective counts and all-to-all bytes."""
  cfg = MoEConfig(num_experts=num_experts, expert_dim=expert_dim, capacity_factor=capacity_factor,
                  group_size=group_size, dtype=dtype, combine="normalized", **VARIANTS[variant])
  mesh = sharding.make_mesh(*mesh_shape)
  x = jnp.zeros((batch, seq, d_model), jnp.float32)
  with jax.set_mesh(mesh):
    block = moe.MoEBlock(cfg, d_model=d_model, rngs=nnx.Rngs(0))

    def loss(block, x):
      y, metrics = block(x)
      return jnp.sum(y.astype(jnp.float32) ** 2) + metrics["losses"]["aux_loss"]

    hlo = jax.jit(nnx.grad(loss)).lower(block, x).compile().as_text()
  found = common.collectives(hlo)
  return {"variant": variant, "all_to_all_ops": len(found["all-to-all"]),
          "all_to_all_bytes": sum(found["all-to-all"]), "all_reduce_ops": len(found["all-reduce"]),
          "capacity": cfg.capacity(True), "a2a_rows_per_token": cfg.num_experts * cfg.capacity(True) / group_size,
          "all_to_all_op_bytes": sorted(found["all-to-all"])}


def run(variants=tuple(VARIANTS), out_dir=None, **kwargs) -> list[dict]:
  rows = []
  for variant in variants:
    row = measure(variant, **kwargs)
    base = variant.split("_")[0]  # top1 / top2
    rows.append(row)
    print(f"{variant:12s} all-to-all ops {row['all_to_all_ops']:2d}  bytes/device {row['all_to_all_bytes']:,}", flush=True)
  by_name = {r["variant"]: r for r in rows}
  for row in rows:
    base = by_name.get(row["variant"].split("_")[0])
    row["extra_vs_base_bytes"] = None if base is None else row["all_to_all_bytes"] - base["all_to_all_bytes"]
  notes = ("Forward+backward of one MoE block, mesh (data=2, expert=4) of fake CPU devices, bf16 payload, "
           f"{kwargs or 'default shapes'}; bytes are one device's all-to-all results per step. "
           "extra_vs_base_bytes compares each variant with vanilla top-k of the same k (must be 0).")
  common.write_results("comm", rows, COLUMNS, notes, out_dir=out_dir)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
  parser.add_argument("--tiny", action="store_true", help="small shapes, two variants (for tests)")
  args = parser.parse_args(argv)
  if args.tiny:
    run(("top1", "top1_ir_fr"), out_dir=args.out, d_model=16, expert_dim=16, batch=8, seq=16, group_size=16)
  else:
    run(out_dir=args.out)


if __name__ == "__main__":
  main()
