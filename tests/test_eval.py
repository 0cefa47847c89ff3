"""Checkpoint evaluation: loss parity with training, routing statistics, router swaps, meshes, clear errors.

One tiny Top-1 checkpoint (mesh (2, 4)) is trained per session and shared by every test.
"""

import dataclasses
import functools
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import paper
from rectify_moe import data as data_lib
from rectify_moe import evaluation as eval_lib
from rectify_moe import routing
from rectify_moe import sharding
from rectify_moe import train_lib
from rectify_moe.config.schema import MoEConfig
import train_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
QUIET = lambda message: None  # noqa: E731

# Rows of the shared sweep (after the checkpoint's own router, row 0).
SWEEP = {
    "vanilla_cf8": "vanilla,eval_capacity_factor=8",  # C = S: nothing can drop
    "ir_cf8": "ir,ir_capacity_factor=None,eval_capacity_factor=8",
    "vanilla_cf025": "vanilla,capacity_factor=0.25",  # `capacity_factor` sets the eval capacity in a swap
    "ir_cf025": "ir,ir_capacity_factor=None,eval_capacity_factor=0.25",
    "fr": "fr",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, config, final eval line of metrics.jsonl) of a tiny Top-1 run on mesh (2, 4)."""
  tmp = tmp_path_factory.mktemp("eval_run")
  config = paper.variant_config("top1", train_helpers.tiny_config(tmp, mesh=(2, 4), steps=STEPS))
  workdir = str(tmp / "run")
  train_lib.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if r["kind"] == "eval"]
  assert evals and evals[-1]["step"] == STEPS
  return workdir, config, evals[-1]


@pytest.fixture(scope="module")
def sweep(run, tmp_path_factory):
  """One evaluate_checkpoint call on the training mesh with every swap of SWEEP; outputs written."""
  workdir, _, _ = run
  out = str(tmp_path_factory.mktemp("eval_out"))
  lines = []
  results = eval_lib.evaluate_checkpoint(None, workdir, swaps=list(SWEEP.values()), output_dir=out,
                                         log=lines.append)
  rows = {"checkpoint": results["routers"][0]}
  rows.update({name: results["routers"][i + 1] for i, name in enumerate(SWEEP)})
  return results, rows, out, lines


def _layer(row):
  assert len(row["layers"]) == 1  # the tiny model has one MoE layer
  return row["layers"][0]


def test_loss_equals_training_eval_step_and_outputs_are_written(run, sweep):
  _, _, final_eval = run
  results, rows, out, lines = sweep
  base = rows["checkpoint"]
  assert results["step"] == STEPS and results["mesh"] == {"data": 2, "expert": 4}
  assert base["loss"] == pytest.approx(final_eval["loss"], rel=1e-6, abs=1e-6)
  assert base["accuracy"] == pytest.approx(final_eval["accuracy"], abs=1e-9)
  assert base["tokens"] == final_eval["tokens"]
  assert base["perplexity"] == pytest.approx(np.exp(base["loss"]))
  layer = _layer(base)
  for key in ("drop_rate", "unrouted_rate", "padding_rate", "fill_in_rate", "ir_rate", "ir_overflow_rate",
              "load_max_over_mean", "load_cv", "a2a_rows_per_token", "expert_load", "expert_demand"):
    assert key in layer, key
  assert layer["tokens"] == base["tokens"]
  assert sum(layer["expert_demand"]) == base["tokens"]  # one top-1 choice per valid token
  # Top-1, cf 1: C = S / E, so the all-to-all carries E * C / S = 1 row per token.
  assert layer["a2a_rows_per_token"] == pytest.approx(1.0)
  # Progress lines name the router and the batch.
  assert any("router 1/6" in line and "batch 2/2" in line for line in lines), lines
  # Files: results.json (same numbers), results.md (the table), two PNGs.
  assert sorted(os.listdir(out)) == ["load_heatmap.png", "rates_by_router.png", "results.json", "results.md"]
  with open(os.path.join(out, "results.json")) as f:
    saved = json.load(f)
  assert [r["name"] for r in saved["routers"]] == [r["name"] for r in results["routers"]]
  assert saved["routers"][0]["loss"] == base["loss"]
  with open(os.path.join(out, "results.md")) as f:
    text = f.read()
  assert "| router | cf | loss | ppl | accuracy | drop | unrouted | pad | fill-in | IR |" in text
  for row in results["routers"]:
    assert f"| {row['name']} |" in text
  for png in ("load_heatmap.png", "rates_by_router.png"):
    with open(os.path.join(out, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _router_probs(graphdef, state, tokens):
  """float32[B, T, E] router probabilities of the first MoE layer, running the pre-norm blocks by hand."""
  model = nnx.merge(graphdef, state)
  x = jnp.take(model.embed[...], tokens, axis=0)
  for block in model.blocks:
    x = x + block.attn(block.attn_norm(x))
    if block.is_moe:
      break
    x = x + block.ffn(block.ffn_norm(x))
  h = block.ffn_norm(x)
  return jax.nn.softmax(jnp.einsum("btd,de->bte", h.astype(jnp.float32), block.ffn.router.kernel[...]), axis=-1)


def _route_by_hand(workdir, config, routers):
  """Per-router routing counts from `routing.route_top_k` on router probabilities computed layer by layer."""
  mesh = sharding.make_mesh(2, 4)
  _, graphdef, state = eval_lib.restore_model(workdir, config, mesh)
  batches = data_lib.make_eval_batches(config.data, seq_len=config.train.seq_len,
                                       batch_size=config.train.eval_batch_size,
                                       max_batches=config.train.eval_batches)
  totals = [dict(tokens=0.0, dropped=0.0, unrouted=0.0, filled=0.0, slots=0.0, fill_in=0.0,
                 load=np.zeros(cfg.num_experts), demand=np.zeros(cfg.num_experts)) for cfg in routers]
  probs_fn = jax.jit(functools.partial(_router_probs, graphdef))
  for local in batches:
    with jax.set_mesh(mesh):
      probs = np.asarray(probs_fn(state, local["inputs"]))
    mask = local["token_mask"]
    for cfg, total in zip(routers, totals):
      group = cfg.group_size
      table = routing.route_top_k(
          probs.reshape(-1, group, cfg.num_experts), top_k=cfg.top_k, capacity=cfg.capacity(False),
          priority=cfg.priority, fill_in=cfg.fill_in, fill_in_priority=cfg.fill_in_priority,
          combine=cfg.combine, straight_through=cfg.straight_through, token_mask=mask.reshape(-1, group))
      s = jax.device_get(table.stats)
      total["tokens"] += s.num_tokens.sum()
      total["dropped"] += np.rint(s.drop_rate * s.num_tokens * cfg.top_k).sum()
      total["unrouted"] += np.rint(s.unrouted_rate * s.num_tokens).sum()
      total["filled"] += s.expert_load.sum()
      total["slots"] += s.num_tokens.shape[0] * cfg.num_experts * cfg.capacity(False)
      total["fill_in"] += s.fill_in_slots.sum()
      total["load"] += s.expert_load.sum(0)
      total["demand"] += s.expert_demand.sum(0)
  return totals


def test_routing_statistics_equal_route_top_k_on_the_same_batches(run, sweep):
  workdir, config, _ = run
  _, rows, _, _ = sweep
  names = ("checkpoint", "vanilla_cf025", "fr")
  base = MoEConfig.from_dict(config.moe)
  routers = [dataclasses.replace(base, **rows[name]["moe"]) for name in names]
  for name, total in zip(names, _route_by_hand(workdir, config, routers)):
    layer = _layer(rows[name])
    assert layer["tokens"] == total["tokens"], name
    np.testing.assert_array_equal(layer["expert_load"], total["load"], err_msg=name)
    np.testing.assert_array_equal(layer["expert_demand"], total["demand"], err_msg=name)
    assert layer["dropped_choices"] == total["dropped"], name
    assert layer["unrouted_tokens"] == total["unrouted"], name
    assert layer["slots"] == total["slots"] and layer["filled_slots"] == total["filled"], name
    assert layer["fill_in_slots"] == total["fill_in"], name
    assert layer["drop_rate"] == pytest.approx(total["dropped"] / total["demand"].sum()), name
    assert layer["unrouted_rate"] == pytest.approx(total["unrouted"] / total["tokens"]), name
    assert layer["padding_rate"] == pytest.approx(1 - total["filled"] / total["slots"]), name
    load = total["load"]
    assert layer["load_max_over_mean"] == pytest.approx(load.max() / load.mean()), name
    assert layer["load_cv"] == pytest.approx(load.std() / load.mean()), name


def test_swap_that_cannot_change_results_leaves_the_loss_unchanged(sweep):
  _, rows, _, _ = sweep
  vanilla, ir = rows["vanilla_cf8"], rows["ir_cf8"]
  assert _layer(vanilla)["drop_rate"] == 0 and _layer(vanilla)["unrouted_rate"] == 0  # C = S
  assert _layer(ir)["ir_rate"] == 0  # nothing unrouted: IR has no work
  assert ir["loss"] == pytest.approx(vanilla["loss"], rel=1e-6)
  assert ir["accuracy"] == vanilla["accuracy"]
  # Preset 'vanilla' of a Top-1 checkpoint is the checkpoint's own router: identical results, not recomputed.
  assert rows["vanilla_cf8"]["moe"]["ir_mode"] is None and rows["vanilla_cf8"]["moe"]["straight_through"]


def test_low_capacity_raises_drops_and_ir_rectifies_every_unrouted_token(sweep):
  _, rows, _, _ = sweep
  base, low, ir_low = (_layer(rows[n]) for n in ("checkpoint", "vanilla_cf025", "ir_cf025"))
  assert rows["vanilla_cf025"]["eval_capacity_factor"] == 0.25
  assert low["capacity"] < base["capacity"]
  assert low["drop_rate"] > base["drop_rate"] > 0
  assert low["unrouted_rate"] > base["unrouted_rate"]
  assert low["a2a_rows_per_token"] < base["a2a_rows_per_token"]
  # IR does not change the main routing table, but rectifies every unrouted token (exact IR buffer).
  assert ir_low["drop_rate"] == low["drop_rate"] and ir_low["unrouted_rate"] == low["unrouted_rate"]
  assert ir_low["ir_rate"] > 0
  assert ir_low["ir_rectified"] == ir_low["unrouted_tokens"] and ir_low["ir_overflow"] == 0
  assert rows["ir_cf025"]["loss"] != rows["vanilla_cf025"]["loss"]
  assert np.isfinite(rows["ir_cf025"]["loss"])
  # FR keeps the top-1 assignment and fills padding with second choices.
  fr = _layer(rows["fr"])
  assert fr["drop_rate"] == base["drop_rate"]
  assert fr["fill_in_rate"] > 0 and fr["padding_rate"] < base["padding_rate"]
  assert fr["unrouted_rate"] <= base["unrouted_rate"]
  assert fr["padding_rate"] == pytest.approx(base["padding_rate"] - fr["fill_in_rate"])


@pytest.mark.parametrize("mesh", [(4, 2), (1, 8), (8, 1)])
def test_restore_onto_another_mesh_gives_the_same_loss(run, sweep, mesh):
  workdir, _, _ = run
  _, rows, _, _ = sweep
  swaps = ["ir,ir_capacity_factor=None"] if mesh == (4, 2) else []
  results = eval_lib.evaluate_checkpoint(None, workdir, mesh_shape=mesh, swaps=swaps, write=False, log=QUIET)
  assert results["mesh"] == {"data": mesh[0], "expert": mesh[1]}
  row = results["routers"][0]
  assert row["loss"] == pytest.approx(rows["checkpoint"]["loss"], rel=1e-5)
  assert row["accuracy"] == pytest.approx(rows["checkpoint"]["accuracy"], abs=1 / row["tokens"] + 1e-9)
  assert _layer(row)["expert_load"] == _layer(rows["checkpoint"])["expert_load"]
  if swaps:  # IR depends on which experts are local: only invariants, not equality with mesh (2, 4)
    ir = results["routers"][1]
    assert np.isfinite(ir["loss"])
    assert _layer(ir)["ir_rectified"] == _layer(ir)["unrouted_tokens"] > 0


# ---------------------------------------------------------------------------------------------------------
# Swap parsing (no compilation).
# ---------------------------------------------------------------------------------------------------------
def test_presets_follow_the_checkpoints_k():
  top1 = MoEConfig(top_k=1, straight_through=True, capacity_factor=1.0)
  top2 = MoEConfig(top_k=2, capacity_factor=1.0)
  assert eval_lib.parse_swap("ir", top1) == dict(fill_in=False, ir_mode="all", straight_through=True)
  assert eval_lib.parse_swap("ir", top2) == dict(fill_in=False, ir_mode="any", straight_through=False)
  assert eval_lib.parse_swap("fr", top1) == dict(fill_in=True, ir_mode=None, straight_through=False)
  assert eval_lib.parse_swap("ir_fr", top2)["ir_mode"] == "ignore_kth"
  # Explicit fields after a preset; capacity_factor also sets the eval capacity; K > 1 drops straight-through.
  assert eval_lib.parse_swap("ir, ir_capacity_factor=None, capacity_factor=0.5", top1) == dict(
      fill_in=False, ir_mode="all", straight_through=True, ir_capacity_factor=None, capacity_factor=0.5,
      eval_capacity_factor=0.5)
  assert eval_lib.parse_swap("moe.fill_in=true", top1) == dict(fill_in=True, straight_through=False)
  assert eval_lib.parse_swap("top_k=2,priority=position", top1) == dict(top_k=2, priority="position",
                                                                        straight_through=False)


def test_router_specs_sweep_every_router_over_the_capacity_factors():
  base = MoEConfig(top_k=1, straight_through=True, eval_capacity_factor=1.0)
  specs = eval_lib.router_specs(base, ["presets"], [0.5, 2.0])
  assert len(specs) == 5 * 3
  assert specs[0].label == "checkpoint (Top-1)" and specs[0].overrides == {}
  assert [s.label.split(" ")[0] for s in specs[1:5]] == ["vanilla", "ir", "fr", "ir_fr"]
  assert specs[5].label == "checkpoint (Top-1) @cf=0.5"
  assert {eval_lib.eval_capacity_factor(s.moe) for s in specs[5:10]} == {0.5}
  assert {eval_lib.eval_capacity_factor(s.moe) for s in specs[10:]} == {2.0}
  assert specs[14].moe.fill_in and specs[14].moe.ir_mode == "ignore_kth" and specs[14].label.startswith("ir_fr")
  # A factor equal to the checkpoint's gives the rows above again: it adds none.
  assert len(eval_lib.router_specs(base, ["presets"], [1.0, 0.5])) == 5 * 2


@pytest.mark.parametrize("spec, message", [
    ("num_experts=4", "moe.num_experts, which defines the model's parameters"),
    ("expert_dim=64", "moe.expert_dim, which defines the model's parameters"),
    ("d_model=64", "model.d_model, which defines the model's parameters"),
    ("group_size=64", "not a routing field"),
    ("bogus=1", "unknown field 'bogus'"),
    ("top_k=two", "moe.top_k='two' is not of type int"),
    ("ir,fr", "names 2 presets"),
    ("turbo", "Unknown router preset 'turbo'"),
    ("ir_mode=sideways", "moe.ir_mode='sideways'"),
    ("top_k=9", "moe.top_k=9"),
])
def test_bad_swaps_are_rejected_with_a_clear_message(spec, message):
  base = MoEConfig(top_k=1, straight_through=True)
  with pytest.raises(eval_lib.EvalError, match=message.replace("(", r"\(")):
    eval_lib.router_specs(base, [spec])


# ---------------------------------------------------------------------------------------------------------
# Errors: one line on stderr, non-zero exit, no traceback.
# ---------------------------------------------------------------------------------------------------------
def _expect_error(capsys, config, workdir, *fragments, **kwargs):
  code = eval_lib.run_main(config, workdir, write=False, log=QUIET, **kwargs)
  err = capsys.readouterr().err
  assert code != 0
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert "Traceback" not in err
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  return lines[0]


def test_missing_workdir_and_missing_checkpoint(tmp_path, run, capsys):
  _expect_error(capsys, None, str(tmp_path / "nope"), "does not exist")
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(os.path.join(run[0], "config.json"), empty / "config.json")
  _expect_error(capsys, None, str(empty), "No checkpoint")
  (empty / "checkpoints").mkdir()
  _expect_error(capsys, None, str(empty), "No checkpoint")
  _expect_error(capsys, None, str(tmp_path), "No config.json")


def test_unknown_step_lists_the_existing_ones(run, capsys):
  _expect_error(capsys, None, run[0], "Step 7 has no checkpoint", f"available steps: {STEPS}.", step=7)


@pytest.mark.parametrize("section, field, value", [("model", "d_model", 64), ("moe", "num_experts", 4)])
def test_config_that_does_not_match_the_checkpoint(run, capsys, section, field, value):
  workdir, config, _ = run
  other = eval_lib.load_run_config(workdir)
  trained = other[section][field]
  other[section][field] = value
  _expect_error(capsys, other, workdir, f"{section}.{field}={value}", f"{trained!r} in the run")


def test_edited_config_json_is_caught_by_the_parameter_shapes(run, tmp_path, capsys):
  copy = str(tmp_path / "run")
  shutil.copytree(run[0], copy)
  with open(os.path.join(copy, "config.json")) as f:
    values = json.load(f)
  values["moe"]["expert_dim"] = 48
  with open(os.path.join(copy, "config.json"), "w") as f:
    json.dump(values, f)
  _expect_error(capsys, None, copy, "does not match checkpoint step", "blocks/1/ffn/w_",
                "(8, 32, 32) in the checkpoint", "48")


@pytest.mark.parametrize("damage", ["truncate_data", "delete_metadata"])
def test_corrupt_checkpoint(run, tmp_path, capsys, damage):
  copy = str(tmp_path / "run")
  shutil.copytree(run[0], copy)
  step_dir = os.path.join(copy, "checkpoints", str(STEPS))
  if damage == "truncate_data":
    files = glob.glob(os.path.join(step_dir, "model", "d", "*"))
    assert files
    for path in files:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  else:
    os.remove(os.path.join(step_dir, "model", "_METADATA"))
  _expect_error(capsys, None, copy, f"checkpoints/{STEPS} is corrupt or incomplete")


# ---------------------------------------------------------------------------------------------------------
# The command line (one process with a single CPU device: the (2, 4) training mesh does not fit).
# ---------------------------------------------------------------------------------------------------------
def _env():
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


def test_cli_evaluates_on_a_single_device_with_a_swap(run, tmp_path):
  workdir, _, final_eval = run
  out = tmp_path / "out"
  result = subprocess.run([sys.executable, "eval.py", f"--workdir={workdir}", "--swap=fr", f"--output_dir={out}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "evaluating on mesh (1, 1)" in result.stdout
  assert "[eval] router 2/2 fr (Top-1+FR): batch 2/2" in result.stdout
  assert "| fr (Top-1+FR) |" in result.stdout
  with open(out / "results.json") as f:
    saved = json.load(f)
  assert saved["mesh"] == {"data": 1, "expert": 1}
  assert saved["routers"][0]["loss"] == pytest.approx(final_eval["loss"], rel=1e-5)
  assert (out / "load_heatmap.png").exists() and (out / "rates_by_router.png").exists()


def test_cli_error_is_one_line_and_non_zero(run):
  result = subprocess.run([sys.executable, "eval.py", f"--workdir={run[0]}", "--step=999"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines == [f"error: Step 999 has no checkpoint in {os.path.join(run[0], 'checkpoints')!r}; "
                   f"available steps: {STEPS}."], result.stderr


def test_whole_split_and_the_standard_error_of_the_loss(run):
  """eval_batches=0 reads the whole held-out split; loss_se is the ratio estimator over its batches, recomputed
  here from one evaluation per batch."""
  workdir, config, _ = run
  results = eval_lib.evaluate_checkpoint(None, workdir, eval_batches=0, write=False, log=QUIET)
  every = data_lib.make_eval_batches(config.data, seq_len=config.train.seq_len,
                                     batch_size=config.train.eval_batch_size)
  assert results["eval_batches"] == len(every) > config.train.eval_batches
  row = results["routers"][0]
  mesh = sharding.make_mesh(2, 4)
  _, graphdef, state = eval_lib.restore_model(workdir, config, mesh)
  evaluator = eval_lib.Evaluator(graphdef, jax.tree.map(lambda x: x.sharding, state), mesh)
  per_batch = [evaluator.sums(state, [batch]) for batch in every]
  ce = np.array([b["ce_sum"] for b in per_batch])
  tokens = np.array([b["tokens"] for b in per_batch])
  loss = ce.sum() / tokens.sum()
  n = len(ce)
  want_se = np.sqrt(n / (n - 1) * np.sum((ce - loss * tokens) ** 2)) / tokens.sum()
  assert row["loss"] == pytest.approx(loss, rel=1e-6)
  assert row["loss_se"] == pytest.approx(want_se, rel=1e-6) and row["loss_se"] > 0
