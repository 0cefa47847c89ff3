"""Each benchmark runs in a tiny CPU mode: output files exist and have the documented columns (no timing asserts)."""

import json

from benchmarks import comm, moe_block, train_step


def _load(path):
  with open(path) as f:
    return json.load(f)


def test_comm_benchmark_ir_and_fr_add_no_all_to_all(tmp_path):
  comm.main(["--tiny", f"--out={tmp_path}"])
  result = _load(tmp_path / "comm.json")
  rows = {r["variant"]: r for r in result["rows"]}
  assert set(rows) == {"top1", "top1_ir_fr"}
  assert rows["top1"]["all_to_all_ops"] > 0
  assert rows["top1_ir_fr"]["all_to_all_bytes"] == rows["top1"]["all_to_all_bytes"]
  assert rows["top1_ir_fr"]["extra_vs_base_bytes"] == 0
  assert "| variant |" in (tmp_path / "comm.md").read_text()
  assert result["machine"]["device_count"] == 8


def test_moe_block_benchmark_tiny(tmp_path):
  rows = moe_block.run("tiny", variants=("vanilla", "ir_fr"), dispatches=("einsum", "index"), warmup=1,
                       repeats=1, out_dir=str(tmp_path), name="block")
  assert len(rows) == 4
  for row in rows:
    for column in moe_block.COLUMNS:
      assert column in row
    assert row["median_ms"] > 0 and row["useful_tflops"] > 0 and row["ideal_tflops"] > 0
  assert [r["mask_mb"] > 0 for r in rows] == [True, True, False, False]
  assert "useful_tflops" in (tmp_path / "block.md").read_text()


def test_moe_block_benchmark_baseline_rows(tmp_path):
  rows = moe_block.run("tiny", variants=("vanilla", "ir_fr"), dispatches=("index",), warmup=1, repeats=1,
                       out_dir=str(tmp_path), name="block", baselines=("dropless", "expert_choice"))
  assert [(r["variant"], r["dispatch"]) for r in rows] == [("vanilla", "index"), ("ir_fr", "index"),
                                                          ("dropless", "dropless"), ("expert_choice", "index")]
  for row in rows[2:]:
    assert row["time_vs_vanilla"] > 0 and row["time_vs_ir_fr"] > 0 and row["useful_tflops"] > 0
  assert rows[2]["drop_rate"] == 0 and rows[0]["drop_rate"] > 0


def test_train_step_benchmark_tiny(tmp_path):
  overrides = {"model": dict(num_layers=2, d_model=32, num_heads=2, d_ff=64),
               "moe": dict(expert_dim=32, group_size=32), "train": dict(batch_size=8, seq_len=32),
               "mesh": dict(data=2, expert=4)}
  rows = train_step.run("default", ("top1", "top1_ir_fr"), warmup=1, repeats=1, overrides=overrides,
                        out_dir=str(tmp_path))
  assert [r["variant"] for r in rows] == ["top1", "top1_ir_fr"]
  assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in rows)
  assert list(tmp_path.glob("train_step_default_cpu.*"))
