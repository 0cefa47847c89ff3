"""Forward+backward time of one MoE block on one device, against the ideal balanced batched matmul.

For each variant (vanilla, +IR, +FR, +IR+FR), dispatch implementation (einsum masks / index gathers) and
group size S, it times forward+backward of the block body on one device (no communication): `jit` of
`value_and_grad` of sum(out * a fixed random cotangent), see `_cotangent`. It reports
- useful TF/s = 12 * T * k * D * F / time (forward+backward FLOPs of the assigned tokens of a 2-matmul GELU
  expert, the anchors' convention: padding, masks and routing are overhead),
- the ideal: the same expert FLOPs as a pre-balanced batched matmul [E, T*k/E, D] x [E, D, F], timed in the
  same run, and the ratios to ideal and to ideal / capacity_factor,
- the experts alone on full capacity buffers [E, G, C, D] (capacity_bmm_ms) and the routing alone (router_ms),
  timed separately (so the block, whose XLA program fuses differently, can come out slightly faster),
- peak device memory (GPU), the dispatch+combine mask memory of the einsum path, drop / IR / IR-overflow rates.
Median of repeated samples, each of `inner` back-to-back calls then a device sync, after warm-up.

  python benchmarks/moe_block.py --shape=cpu_small           # CPU
  python benchmarks/moe_block.py --shape=anchor_e8            # one H100/H200 (anchors.md §6.3)
  python benchmarks/moe_block.py --shape=cpu_small --dispatch=index --variants=vanilla,ir_fr \
      --baselines=dropless,expert_choice --name=moe_block_cpu_small_baselines_cpu   # the comparison set

Baselines (--baselines, after the presets): "dropless" (vanilla top-k, moe.dispatch='dropless') and "expert_choice"
(every expert takes S/E*cf*k tokens), timed against the capacity rows of the last dispatch at the same S
(time_vs_vanilla, time_vs_ir_fr).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp

from benchmarks import common
from rectify_moe import intra_device, metrics, moe, variants
from rectify_moe.config.schema import MoEConfig
from rectify_moe.routers.base import RouteContext

SHAPES = {
    # tokens T, width D, hidden F, experts E, k, capacity factor, group sizes (all: router_skew 0.2)
    "tiny": dict(tokens=256, d_model=32, expert_dim=64, num_experts=4, top_k=2, capacity_factor=1.25,
                 group_sizes=(64,), router_skew=0.2),
    "cpu_small": dict(tokens=4096, d_model=256, expert_dim=1024, num_experts=8, top_k=2, capacity_factor=1.25,
                      group_sizes=(256, 1024), router_skew=0.2),
    "anchor_e8": dict(tokens=16384, d_model=2048, expert_dim=8192, num_experts=8, top_k=2, capacity_factor=1.25,
                      group_sizes=(1024, 4096), router_skew=0.2),
    "anchor_e64": dict(tokens=16384, d_model=2048, expert_dim=1024, num_experts=64, top_k=4, capacity_factor=1.25,
                       group_sizes=(1024,), router_skew=0.2),
    "mixtral": dict(tokens=8192, d_model=4096, expert_dim=14336, num_experts=8, top_k=2, capacity_factor=1.25,
                    group_sizes=(4096,), router_skew=0.2),
}
# IR buffer: 1/32 of S/E slots per expert per group (1 at S=256, 4 at S=1024 with E=8). On one device a rectified
# token's local expert is its top-1 expert, which already holds its first choice unless that was dropped, so
# almost every rectified token reuses a routed output and needs no IR row; the ir_reuse_rate and
# ir_overflow_rate columns show it (0 overflow on every shape here).
IR_CAPACITY_FACTOR = 1 / 32
RECTIFY = variants.PRESETS  # vanilla, ir, fr, ir_fr of the shape's k (rectify_moe/variants.py)
COLUMNS = ("variant", "dispatch", "group_size", "capacity", "median_ms", "useful_tflops", "ideal_tflops",
           "ratio_to_ideal", "ratio_to_ideal_over_cf", "time_vs_vanilla", "time_vs_ir_fr", "capacity_bmm_ms",
           "router_ms",
           "minus_capacity_bmm_ms", "mask_mb", "peak_mb", "drop_rate", "ir_rate", "ir_reuse_rate",
           "ir_overflow_rate")


def _inputs(shape, dtype):
  keys = jax.random.split(jax.random.key(0), 5)
  t, d, f, e = shape["tokens"], shape["d_model"], shape["expert_dim"], shape["num_experts"]
  # A component shared by all tokens shifts every expert's logit by its own amount, so expert popularity
  # differs as under a trained router and the capacity really drops tokens (router_skew 0.2: about 3% of
  # top-2 choices at capacity factor 1.25); without it the random router is balanced and IR has no work.
  shared = shape.get("router_skew", 0.0) * jax.random.normal(keys[4], (d,), jnp.float32)
  x = (jax.random.normal(keys[0], (1, t, d), jnp.float32) + shared).astype(dtype)
  router = jax.random.normal(keys[1], (d, e), jnp.float32) * 0.02
  weights = {"w_up": jax.random.normal(keys[2], (e, d, f), dtype) * d ** -0.5,
             "w_down": jax.random.normal(keys[3], (e, f, d), dtype) * f ** -0.5}
  return x, router, weights


def _cotangent(shape_, dtype, seed=7):
  """A fixed random output cotangent.

  Every timed function is value_and_grad of sum(out * cotangent): the value keeps the forward output alive
  and the cotangent is not a constant. Timing grad(sum(out)) instead lets XLA drop the last forward matmul
  (only the discarded value needs it) and simplify the backward against an all-ones cotangent, so an ideal
  timed that way skips work a real model does (measured on an H100: 5 of the 6 expert matmuls ran).
  """
  return jax.random.normal(jax.random.key(seed), shape_, dtype)


def _project(out, cotangent):
  return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32))


def _variant_fields(shape, variant, dispatch):
  """The `moe` fields of a benchmark variant: a rectification preset of the shape's k, or a baseline: "dropless"
  (vanilla top-k, dispatch="dropless") or "expert_choice" (each expert C = S / E * cf * k tokens: the same
  capacity buffers as the top-k rows)."""
  if variant == "dropless":
    return dict(top_k=shape["top_k"], capacity_factor=shape["capacity_factor"], dispatch="dropless",
                **variants.rectification(shape["top_k"], "vanilla"))
  if variant == "expert_choice":
    return dict(router="expert_choice", top_k=1, capacity_factor=shape["capacity_factor"] * shape["top_k"],
                dispatch=dispatch)
  return dict(top_k=shape["top_k"], capacity_factor=shape["capacity_factor"], dispatch=dispatch,
              **variants.rectification(shape["top_k"], variant))


def block_time(shape, variant, dispatch, group_size, *, dtype, ir_capacity_factor, warmup, repeats, inner):
  cfg = MoEConfig(num_experts=shape["num_experts"], expert_dim=shape["expert_dim"], group_size=group_size,
                  activation="gelu", dtype="bfloat16" if dtype == jnp.bfloat16 else "float32",
                  combine="normalized", ir_capacity_factor=ir_capacity_factor,
                  **_variant_fields(shape, variant, dispatch))
  x, router, weights = _inputs(shape, dtype)
  mask = jnp.ones(x.shape[:2], bool)

  cot = _cotangent(x.shape, dtype)

  def loss(x, router, weights, cot):
    y, local = moe.moe_shard_body(x, mask, moe.router_from_arrays(cfg, {"kernel": router}, d_model=x.shape[-1]),
                                  weights, cfg=cfg, train=True, expert_axis_size=1, expert_axis=None)
    block = moe.reduce_metrics(local)
    return _project(y, cot) + block["losses"]["aux_loss"], block["counts"]

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  timing = common.time_fn(lambda: step(x, router, weights, cot), warmup=warmup, repeats=repeats, inner=inner)
  (_, counts), _ = step(x, router, weights, cot)
  stats = metrics.rates(jax.device_get(counts))
  return cfg, timing, {k: float(stats[k]) for k in ("drop_rate", "padding_rate", "fill_in_rate", "ir_rate",
                                                     "ir_reuse_rate", "ir_overflow_rate")}


def _experts_time(shape, buffer_shape, seed, *, dtype, warmup, repeats, inner):
  """The experts alone, forward+backward, on random buffers of `buffer_shape` [E, N, C, D]."""
  _, _, weights = _inputs(shape, dtype)
  buffers = jax.random.normal(jax.random.key(seed), buffer_shape, dtype)
  cot = _cotangent(buffer_shape, dtype)

  def loss(buffers, weights, cot):
    return _project(moe.expert_ffn(buffers, weights, "gelu"), cot)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return common.time_fn(lambda: step(buffers, weights, cot), warmup=warmup, repeats=repeats, inner=inner)


def ideal_time(shape, **timing_args):
  """Pre-balanced tokens [E, T*k/E, D] through the experts: the best a capacity-free MoE could do."""
  e = shape["num_experts"]
  rows = shape["tokens"] * shape["top_k"] // e
  return _experts_time(shape, (e, 1, rows, shape["d_model"]), 1, **timing_args)


def capacity_bmm_time(shape, group_size, **timing_args):
  """The experts alone on full capacity buffers [E, G, C, D]: what a capacity-based block computes beyond routing."""
  e, groups = shape["num_experts"], shape["tokens"] // group_size
  capacity = MoEConfig(num_experts=e, expert_dim=shape["expert_dim"], top_k=shape["top_k"],
                           capacity_factor=shape["capacity_factor"], group_size=group_size).capacity(True)
  return _experts_time(shape, (e, groups, capacity, shape["d_model"]), 2, **timing_args)


def router_time(shape, variant, group_size, *, dtype, ir_capacity_factor, warmup, repeats, inner):
  """Routing alone (logits, softmax, top-k, slots, IR choice, losses), forward+backward into the router."""
  cfg = MoEConfig(num_experts=shape["num_experts"], expert_dim=shape["expert_dim"], top_k=shape["top_k"],
                  capacity_factor=shape["capacity_factor"], group_size=group_size,
                  **variants.rectification(shape["top_k"], variant))
  x, router, _ = _inputs(shape, dtype)
  xg = x.reshape(-1, group_size, shape["d_model"])
  mask = jnp.ones(xg.shape[:2], bool)

  ctx = RouteContext(token_mask=mask, token_ids=jnp.zeros(mask.shape, jnp.int32), step=jnp.zeros((), jnp.int32),
                     train=True, capacity=cfg.capacity(True))

  def loss(xg, router):
    routed = moe.router_from_arrays(cfg, {"kernel": router}, d_model=xg.shape[-1]).route(xg, ctx)
    probs, table = routed.probs, routed.table
    out = jnp.sum(table.combine_weight) + routed.losses["aux_loss"]
    if cfg.ir_mode is not None:
      ir = intra_device.intra_device_choice(probs, table, first_expert=0, num_local=shape["num_experts"],
                                            mode=cfg.ir_mode, ir_capacity=intra_device.ir_capacity_from_factor(
                                                group_size, shape["num_experts"], ir_capacity_factor))
      out = out + jnp.sum(ir.p * ir.placed)
    return out

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return common.time_fn(lambda: step(xg, router), warmup=warmup, repeats=repeats, inner=inner)


BASELINES = ("dropless", "expert_choice")  # rows after the rectification presets (see `_variant_fields`)


def run(shape_name, *, variants=tuple(RECTIFY), dispatches=("einsum", "index"), dtype=None, warmup=2,
        repeats=5, inner=None, ir_capacity_factor=IR_CAPACITY_FACTOR, out_dir=None, name=None,
        baselines=(), group_sizes=None):
  shape = dict(SHAPES[shape_name])
  if group_sizes:
    shape["group_sizes"] = tuple(group_sizes)
  gpu = jax.default_backend() == "gpu"
  dtype = dtype or (jnp.bfloat16 if gpu else jnp.float32)
  inner = inner or common.default_inner()
  timing_args = dict(dtype=dtype, warmup=warmup, repeats=repeats, inner=inner)
  useful_flops = 12 * shape["tokens"] * shape["top_k"] * shape["d_model"] * shape["expert_dim"]
  ideal = ideal_time(shape, **timing_args)
  ideal_tflops = useful_flops / ideal["median_s"] / 1e12
  print(f"[{shape_name}] ideal balanced bmm: {ideal['median_s'] * 1e3:.2f} ms, {ideal_tflops:.2f} TF/s", flush=True)
  rows, vanilla_ms, ir_fr_ms = [], {}, {}
  for group_size in shape["group_sizes"]:
    capacity_bmm_ms = capacity_bmm_time(shape, group_size, **timing_args)["median_s"] * 1e3
    router_ms = {v: router_time(shape, v, group_size, ir_capacity_factor=ir_capacity_factor,
                                **timing_args)["median_s"] * 1e3 for v in variants}
    # Baselines are compared with the capacity rows of the last dispatch (index when both run).
    runs = [(d, v) for d in dispatches for v in variants]
    runs += [("dropless", "dropless")] if "dropless" in baselines else []
    runs += [(d, "expert_choice") for d in dispatches] if "expert_choice" in baselines else []
    print(f"  S={group_size:5d} experts alone on the capacity buffers: {capacity_bmm_ms:.2f} ms; router alone: "
          + ", ".join(f"{v} {ms:.2f} ms" for v, ms in router_ms.items()), flush=True)
    for dispatch, variant in runs:
      cfg, timing, stats = block_time(shape, variant, dispatch, group_size,
                                      ir_capacity_factor=ir_capacity_factor, **timing_args)
      ms = timing["median_s"] * 1e3
      if variant == "vanilla":
        vanilla_ms[(dispatch, group_size)] = vanilla_ms[("last", group_size)] = ms
      if variant == "ir_fr":
        ir_fr_ms[(dispatch, group_size)] = ir_fr_ms[("last", group_size)] = ms
      row_key = (dispatch, group_size) if variant in variants else ("last", group_size)
      capacity = cfg.capacity(True)
      mask_elems = 2 * shape["tokens"] * shape["num_experts"] * capacity  # dispatch + combine, [G,S,E,C]
      useful = useful_flops / timing["median_s"] / 1e12
      peak = common.peak_memory_bytes()
      row = {"shape": shape_name, "variant": variant, "dispatch": dispatch, "group_size": group_size,
             "capacity": capacity, "median_ms": ms, "min_ms": timing["min_s"] * 1e3,
             "useful_tflops": useful, "ideal_tflops": ideal_tflops, "ratio_to_ideal": useful / ideal_tflops,
             "ratio_to_ideal_over_cf": useful / (ideal_tflops / shape["capacity_factor"]),
             "time_vs_vanilla": None, "time_vs_ir_fr": None, "_against": row_key,
             "capacity_bmm_ms": capacity_bmm_ms, "router_ms": router_ms.get(variant),
             "minus_capacity_bmm_ms": ms - capacity_bmm_ms,
             "mask_mb": mask_elems * jnp.dtype(dtype).itemsize / 2**20 if dispatch == "einsum" else 0.0,
             "peak_mb": None if peak is None else peak / 2**20, **stats}
      rows.append(row)
      vs = ms / vanilla_ms[row_key] if row_key in vanilla_ms else None
      print(f"  S={group_size:5d} {dispatch:8s} {variant:13s} {ms:9.2f} ms  {useful:7.2f} useful TF/s  "
            f"x{row['ratio_to_ideal']:.2f} of ideal" + ("" if vs is None else f"  x{vs:.2f} vs vanilla"), flush=True)
  for row in rows:  # against the capacity rows of the same dispatch (baselines: the last dispatch) and S
    key = row.pop("_against")
    row["time_vs_vanilla"] = row["median_ms"] / vanilla_ms[key] if key in vanilla_ms else None
    row["time_vs_ir_fr"] = row["median_ms"] / ir_fr_ms[key] if key in ir_fr_ms else None
  notes = (f"Shape {shape_name}: {shape}; dtype {jnp.dtype(dtype).name}; IR buffer ir_capacity_factor="
           f"{ir_capacity_factor} (IR mode 'any', 'ignore_kth' with FR); forward+backward of one block on one "
           f"device (no all-to-all); median of {repeats} samples of {inner} back-to-back calls after {warmup} warm-up "
           f"calls. capacity_bmm_ms: the experts alone on full capacity buffers [E, G, C, D]; router_ms: routing "
           f"alone; minus_capacity_bmm_ms = median_ms - capacity_bmm_ms (both timed separately). Baselines: "
           f"'dropless' = vanilla top-k with moe.dispatch='dropless' (every choice computed: sorted rows and "
           f"ragged_dot); 'expert_choice' = each expert takes C = S/E*cf*k tokens (the same buffers as the top-k "
           f"rows); "
           f"their time_vs_vanilla / time_vs_ir_fr compare with the top-k rows of the last dispatch at the same S; "
           f"useful TF/s counts T*k assigned rows for every row. On CPU XLA lowers ragged_dot densely (every row "
           f"through every expert, masked: E times the FLOPs), so the CPU dropless row measures that lowering; "
           f"on GPU ragged_dot is a grouped matmul."
           + ("" if jax.default_backend() == "gpu" else " CPU-only figures: not comparable with the GPU anchors."))
  common.write_results(name or f"moe_block_{shape_name}_{jax.default_backend()}", rows, COLUMNS, notes,
                       out_dir=out_dir)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", default="cpu_small", choices=sorted(SHAPES))
  parser.add_argument("--dispatch", default="einsum,index")
  parser.add_argument("--variants", default=",".join(RECTIFY))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--inner", type=int, default=None, help="back-to-back calls per timed sample "
                      "(default 5 on GPU, 1 on CPU)")
  parser.add_argument("--ir_capacity_factor", type=float, default=IR_CAPACITY_FACTOR,
                      help="IR buffer size (see IR_CAPACITY_FACTOR); the ir_overflow_rate column shows what it lost")
  parser.add_argument("--baselines", default=",".join(BASELINES),
                      help="baseline rows after the presets: dropless, expert_choice ('' = none)")
  parser.add_argument("--group_sizes", default=None, help="comma-separated group sizes (default: the shape's)")
  parser.add_argument("--out", default=None)
  parser.add_argument("--name", default=None, help="result file name (default moe_block_<shape>_<backend>)")
  args = parser.parse_args(argv)
  run(args.shape, variants=tuple(args.variants.split(",")), dispatches=tuple(args.dispatch.split(",")),
      warmup=args.warmup, repeats=args.repeats, inner=args.inner, ir_capacity_factor=args.ir_capacity_factor,
      out_dir=args.out, name=args.name, baselines=tuple(b for b in args.baselines.split(",") if b),
      group_sizes=None if args.group_sizes is None else tuple(int(g) for g in args.group_sizes.split(",")))


if __name__ == "__main__":
  main()
