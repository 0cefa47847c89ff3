"""eval.py --dropless_reference: the loss gap and the per-layer relative L2 distance to dropless routing, checked
against a direct computation on a tiny step-0 checkpoint (mesh (1, 2))."""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import paper
from rectify_moe import data as data_lib
from rectify_moe import checkpoints, dropless, lm_loss, model as model_lib, sharding, train_lib
from rectify_moe import evaluation as eval_lib
from rectify_moe.config import saved, schema
import train_helpers
from rectify_moe.workdir import Workdir


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """A step-0 checkpoint (no training: the reference path does not care) evaluated with one swap, dropless
  reference on, one held-out batch."""
  tmp = tmp_path_factory.mktemp("dropless_eval")
  config = paper.variant_config("top1", train_helpers.tiny_config(tmp, mesh=(1, 2), steps=2))
  config.moe.eval_capacity_factor = 0.5  # C = 2 of S/E = 4: drops
  cfg = schema.parse(config)
  workdir = str(tmp / "run")
  paths = Workdir(workdir)
  os.makedirs(paths.root)
  saved.write(cfg, (1, 2), paths.config_json)
  _, state, _ = train_lib.create_train_state(cfg, sharding.make_mesh(1, 2))
  ckpt = checkpoints.Checkpointer(paths)
  ckpt.save(0, state, {})
  ckpt.wait()
  ckpt.close()
  out = str(tmp / "eval")
  results = eval_lib.evaluate_checkpoint(None, workdir, swaps=["router=expert_choice,capacity_factor=2"],
                                         eval_batches=1, dropless_reference=True, output_dir=out,
                                         log=lambda m: None)
  return workdir, config, results, out


def _sums(graphdefs, state, batch):
  """ce sums of the row's model and of its dropless reference; squared distance / norm of the MoE output."""
  model, ref = (nnx.merge(g, state) for g in graphdefs)
  ce = [lm_loss.lm_sums(m, batch, train=False)["ce_sum"] for m in (model, ref)]
  mask = batch["token_mask"]
  x = jnp.take(model.embed[...], batch["inputs"], axis=0)
  for block, ref_block in zip(model.blocks, ref.blocks):
    if block.is_moe:  # the MoE layer's input from the row's model; the reference sees the same input
      h = block.ffn_norm(x + block.attn(block.attn_norm(x)))
      valid = mask[..., None].astype(jnp.float32)
      y, y_ref = block.ffn(h, mask, train=False)[0] * valid, ref_block.ffn(h, mask, train=False)[0] * valid
      return ce, jnp.sum((y - y_ref) ** 2), jnp.sum(y_ref ** 2)
    x = block(x, mask, False, batch["inputs"], jnp.zeros((), jnp.int32), None)[0]


def _direct(workdir, config, moe_cfg):
  """(held-out loss, loss of the dropless reference, rel. L2 of the MoE layer's output), by hand."""
  cfg = schema.parse(config)
  mesh = sharding.make_mesh(1, 2)
  _, _, state = eval_lib.restore_model(workdir, config, mesh)
  graphdefs = [model_lib.abstract_model(config, mesh, c)[0] for c in (moe_cfg, dropless.reference_config(moe_cfg))]
  (local,) = data_lib.make_eval_batches(cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.eval_batch_size,
                                        max_batches=1)
  batch = {k: jnp.asarray(local[k]) for k in ("inputs", "targets", "token_mask")}
  with jax.set_mesh(mesh):
    ce, dist, norm = jax.device_get(jax.jit(lambda s, b: _sums(graphdefs, s, b))(state, batch))
  tokens = float(np.sum(local["token_mask"]))
  return ce[0] / tokens, ce[1] / tokens, np.sqrt(dist / norm)


def test_dropless_reference_columns_equal_a_direct_computation(evaluated):
  workdir, config, results, _ = evaluated
  rows = results["routers"]
  assert [r["name"] for r in rows] == ["checkpoint (Top-1)", "router=expert_choice,capacity_factor=2"]
  base = schema.parse(config).moe
  for row, moe_cfg in zip(rows, (base, dataclasses.replace(base, router="expert_choice", top_k=1,
                                                           straight_through=False, capacity_factor=2.0,
                                                           eval_capacity_factor=2.0))):
    assert row["moe"]["dispatch"] == moe_cfg.dispatch
    loss, ref_loss, rel_l2 = _direct(workdir, config, moe_cfg)
    assert row["loss"] == pytest.approx(loss, rel=1e-5)
    assert row["dropless_loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert row["dropless_loss_gap"] == pytest.approx(loss - ref_loss, abs=1e-5)
    assert row["layers"][0]["dropless_rel_l2"] == pytest.approx(rel_l2, rel=1e-4)
    assert row["mean"]["dropless_rel_l2"] == row["layers"][0]["dropless_rel_l2"]
  # Top-1 at capacity factor 0.5 drops tokens: its output is away from dropless.
  assert rows[0]["layers"][0]["drop_rate"] > 0 and rows[0]["layers"][0]["dropless_rel_l2"] > 0.01


def test_dropless_reference_outputs(evaluated):
  _, _, results, out = evaluated
  with open(os.path.join(out, "results.md")) as f:
    text = f.read()
  assert "| loss - dropless | rel. L2 to dropless |" in text and "rel. L2 to dropless" in text.split("## ")[-1]
  with open(os.path.join(out, "dropless_gap.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert results["dropless_reference"] is True


def test_router_swaps_between_kernel_routers_only():
  top1 = schema.MoEConfig(num_experts=8, group_size=32, fill_in=True, ir_mode="ignore_kth")
  specs = eval_lib.router_specs(top1, ["router=expert_choice,capacity_factor=2", "router=base_layer"])
  assert [s.moe.router for s in specs] == ["top_k", "expert_choice", "base_layer"]
  assert (specs[1].moe.fill_in, specs[1].moe.ir_mode, specs[1].moe.capacity(False)) == (False, None, 8)
  for base, spec in ((schema.MoEConfig(router="stablemoe"), "router=expert_choice"),
                     (top1, "router=hash"),
                     (schema.MoEConfig(expert_bias_update_rate=1e-3), "router=expert_choice")):
    with pytest.raises(eval_lib.EvalError, match="a router swap works between top_k, expert_choice, base_layer"):
      eval_lib.router_specs(base, [spec])
  with pytest.raises(eval_lib.EvalError, match=r"moe\.capacity_factor=16\.0 gives C=64"):
    eval_lib.router_specs(top1, ["router=expert_choice,capacity_factor=16"])


def test_baselines_are_study_variants():
  """Every baseline variant makes a valid run config in the paper study (each of its capacity factors)."""
  from configs.studies import paper as paper_study
  from rectify_moe.study import config as study_config, runner
  names = "top1,top2,top1_dropless,top2_dropless,expert_choice,base_layer"
  study = study_config.parse({**paper_study.get_config().to_dict(), "variants": names, "no_lb_variants": ""})
  runs = runner.plan(study)
  assert {r.variant for r in runs} == set(names.split(","))
  for spec in runs:
    cfg, unused = schema.resolve(runner.run_config(study, spec, "/dense"))
    assert not unused
    cfg.moe.validate()
    if spec.variant.endswith("_dropless"):
      assert cfg.moe.dispatch == "dropless" and cfg.moe.ir_mode is None and not cfg.moe.fill_in
    if spec.variant in ("expert_choice", "base_layer"):
      assert cfg.moe.router == spec.variant and cfg.moe.ir_mode is None and not cfg.moe.fill_in
