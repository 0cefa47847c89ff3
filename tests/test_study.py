"""The study runner (rectify_moe/study): a tiny study end to end through its command line, killed mid-study and
rerun (finished runs are not redone); the plan, the configs of its runs, and the statistics of its report."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs.studies import paper, tiny
from rectify_moe.study import config as study_config
from rectify_moe.study import report, runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


def _study_cmd(workdir, data_dir):
  return [sys.executable, "-m", "rectify_moe.study", "--study=configs/studies/tiny.py", f"--workdir={workdir}",
          f"--study.run.data.data_dir={data_dir}"]


def test_tiny_study_killed_and_rerun_completes_without_redoing_runs(tmp_path):
  workdir, data_dir = tmp_path / "study", tmp_path / "tfds"
  proc = subprocess.Popen(_study_cmd(workdir, data_dir), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines, deadline = [], time.time() + 400
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line)
    if line.startswith("[run 2/4]"):
      proc.send_signal(signal.SIGKILL)  # as hard as it gets: no cleanup, run 3 may be mid-training
      break
  proc.wait(timeout=60)
  assert any(line.startswith("[run 2/4]") for line in lines), "".join(lines)
  finished = {d: os.path.getmtime(workdir / "runs" / d / runner.RESULT_FILE)
              for d in os.listdir(workdir / "runs") if (workdir / "runs" / d / runner.RESULT_FILE).exists()}
  assert len(finished) == 2

  result = subprocess.run(_study_cmd(workdir, data_dir), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  out = result.stdout
  assert out.count("(done before)") == 2 and "[run 4/4]" in out and "[dense]" in out
  for folder, mtime in finished.items():  # not redone
    assert os.path.getmtime(workdir / "runs" / folder / runner.RESULT_FILE) == mtime
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert [(r["variant"], r["capacity_factor"], r["seed"]) for r in results["runs"]] == [
      ("top1", 0.5, 0), ("top1_ir_fr", 0.5, 0), ("top1", 0.5, 1), ("top1_ir_fr", 0.5, 1)]
  assert [(r["variant"], r["seeds"]) for r in results["rows"]] == [("top1", 2), ("top1_ir_fr", 2)]
  assert "diff_mean" in results["rows"][1] and "ablated_loss" in results["runs"][0]
  text = (workdir / "results.md").read_text()
  assert "| top1 | 0.5 |" in text and "| top1_ir_fr | 0.5 |" in text
  for png in ("loss_vs_cf.png", "rates_vs_cf.png"):
    assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Another config on the same workdir is refused in one line.
  other = subprocess.run(_study_cmd(workdir, data_dir) + ["--study.steps=5"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=120)
  assert other.returncode == 2 and "study.steps differs" in other.stderr and "new --workdir" in other.stderr


def test_plan_and_run_configs():
  study = study_config.parse(paper.get_config())
  runs = runner.plan(study)
  assert len(runs) == (8 + 2) * 3 * 3
  assert runs[0] == runner.RunSpec("top1", 0.5, 0)
  no_lb = [r for r in runs if r.no_lb]
  assert {r.variant for r in no_lb} == {"top1/noLB", "top1_ir_fr/noLB"} and no_lb[0].vanilla == "top1/noLB"
  spec = runner.RunSpec("top2_ir_fr", 1.5, 2)
  config = runner.run_config(study, spec, "/dense")
  assert (config.seed, config.init_from, config.moe.capacity_factor, config.moe.eval_capacity_factor) == (
      2, "/dense", 1.5, 1.5)
  assert (config.moe.top_k, config.moe.fill_in, config.moe.ir_mode) == (2, True, "ignore_kth")
  assert config.moe.expert_dim == config.model.d_ff and config.train.steps == study.steps
  assert runner.run_config(study, runner.RunSpec("top1/noLB", 0.5, 0), "/d").train.aux_loss_weight == 0.0
  dense = runner.dense_config(study)
  assert dense.model.moe_every == 0 and dense.train.steps == study.dense_steps
  scratch = study_config.parse({**paper.get_config().to_dict(), "from_scratch": True})
  config = runner.run_config(scratch, spec, "/dense")
  assert config.init_from == "" and config.train.steps == study.dense_steps + study.steps


@pytest.mark.parametrize("values, message", [
    ({"variants": "top1,top1_ri"}, "unknown variant 'top1_ri'. Did you mean 'top1_ir'"),
    ({"variants": "top1_ir"}, "no 'top1', the vanilla router"),
    ({"capacity_factors": "0.5,x"}, "give numbers"),
    ({"no_lb_variants": "top2"}, "not in study.variants"),
])
def test_bad_study_configs_are_one_line(values, message):
  study = study_config.parse({**tiny.get_config().to_dict(), **values})
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    study.validate()


def test_paired_differences_and_intervals_by_hand():
  runs = []
  for seed, (a, b) in enumerate([(2.0, 1.9), (2.1, 2.05), (1.95, 1.80)]):
    for variant, loss in (("top1", a), ("top1_ir", b)):
      runs.append({"variant": variant, "vanilla": "top1", "capacity_factor": 0.5, "seed": seed, "loss": loss,
                   "loss_se": 0.01, "accuracy": 0.5, "mean": {k: 0.1 for k, _ in report.RATES}})
  rows = report.aggregate(runs)
  d = np.array([-0.1, -0.05, -0.15])
  half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)  # t(0.975, 2)
  ir = rows[1]
  assert ir["vs"] == "top1" and ir["diff_pairs"] == 3
  np.testing.assert_allclose([ir["diff_mean"], ir["diff_ci_low"], ir["diff_ci_high"]],
                             [d.mean(), d.mean() - half, d.mean() + half], rtol=1e-9)
  np.testing.assert_allclose(rows[0]["loss_std"], np.std([2.0, 2.1, 1.95], ddof=1))
  assert "diff_mean" not in rows[0]
