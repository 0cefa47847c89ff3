"""End-to-end training: a tiny run on fake devices, exact resume, SIGTERM, paper configs, clear errors."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from configs import paper
from rectify_moe import checkpoints, train_lib
from rectify_moe.data import registered as registered_data
import train_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _params(workdir, config):
  """The latest checkpoint's model parameters as a flat {path: np.ndarray}."""
  mesh = train_lib.sharding.make_mesh(*train_lib.validate_config(config))
  _, state, shardings = train_lib.create_train_state(config, mesh)
  ckpt = checkpoints.Checkpointer(workdir, keep=3)
  state, _ = ckpt.restore(ckpt.latest_step(), state, shardings)
  ckpt.close()
  flat = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state)[0])
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def test_tiny_run_on_mesh_2x4_loss_falls_and_writes_outputs(tmp_path):
  config = train_helpers.tiny_config(tmp_path, steps=40)
  config.train.update(dict(log_every=5, eval_every=20, checkpoint_every=20))
  workdir = str(tmp_path / "run")
  summary = train_lib.train_and_evaluate(config, workdir)
  assert summary["step"] == 40
  train_lines = [r for r in _read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["kind"] == "train"]
  first, last = train_lines[0]["ce"], train_lines[-1]["ce"]
  assert last < first - 1.0, (first, last)
  for key in ("drop_rate", "padding_rate", "fill_in_rate", "ir_rate", "tokens_per_second"):
    assert key in train_lines[-1]
  eval_lines = [r for r in _read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["kind"] == "eval"]
  assert [r["step"] for r in eval_lines] == [20, 40]
  assert eval_lines[-1]["loss"] < eval_lines[0]["loss"]
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()) == [20, 40]
  loads = _read_jsonl(os.path.join(workdir, "loads", "loads.jsonl"))
  assert [r["step"] for r in loads] == list(range(1, 41))
  demand = np.asarray(loads[0]["demand"])
  assert demand.shape == (1, 8)  # one MoE layer x 8 experts
  # Every valid token makes one top-1 choice: the demand sums to the tokens of the batch.
  assert demand.sum() == 16 * 32
  assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_resume_is_exact(tmp_path):
  config = train_helpers.tiny_config(tmp_path, steps=8)
  full = str(tmp_path / "full")
  train_lib.train_and_evaluate(config, full)

  split = str(tmp_path / "split")
  config.train.stop_at_step = 4  # interrupted at step 4 (same schedule), then resumed
  assert train_lib.train_and_evaluate(config, split)["step"] == 4
  config.train.stop_at_step = 0
  summary = train_lib.train_and_evaluate(config, split)
  assert summary["step"] == 8

  losses = lambda w: {r["step"]: r["loss"] for r in _read_jsonl(os.path.join(w, "metrics.jsonl"))
                      if r["kind"] == "train"}
  assert losses(full) == losses(split)  # bit-identical logged losses
  p_full, p_split = _params(full, config), _params(split, config)
  assert p_full.keys() == p_split.keys()
  for key in p_full:
    np.testing.assert_array_equal(p_full[key], p_split[key], err_msg=key)


def _train_cmd(workdir, *overrides):
  return [sys.executable, "train.py", "--config=configs/default.py", f"--workdir={workdir}", *overrides]


def _subprocess_overrides(tmp_path, steps):
  glob = train_helpers.write_corpus(str(tmp_path / "corpus"))
  return [f"--config.train.steps={steps}", "--config.mesh.data=1", "--config.mesh.expert=1",
          "--config.data.source=text_files", f"--config.data.text_files={glob}",
          f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.data.heldout_fraction=0.2",
          "--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.num_heads=2",
          "--config.model.d_ff=64", "--config.moe.expert_dim=32", "--config.moe.group_size=32",
          "--config.train.batch_size=4", "--config.train.seq_len=32", "--config.train.eval_batch_size=4",
          "--config.train.log_every=1", "--config.train.eval_every=100000",
          "--config.train.checkpoint_every=100000"]


def _env():
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


def test_sigterm_saves_checkpoint_and_next_run_resumes(tmp_path):
  workdir = tmp_path / "run"
  overrides = _subprocess_overrides(tmp_path, steps=100000)
  proc = subprocess.Popen(_train_cmd(workdir, *overrides), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = []
  deadline = time.time() + 240
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line)
    if line.startswith("step 3/"):
      proc.send_signal(signal.SIGTERM)
      break
  rest, _ = proc.communicate(timeout=240)
  output = "".join(lines) + rest
  assert proc.returncode == 0, output
  assert "Received SIGTERM: saved checkpoint" in output
  steps = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
  assert len(steps) == 1 and steps[0] >= 3
  saved = steps[0]

  result = subprocess.run(_train_cmd(workdir, *_subprocess_overrides(tmp_path, steps=saved + 2)), cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert f"Resumed from step {saved}" in result.stdout
  assert f"step {saved + 2}/{saved + 2}" in result.stdout


@pytest.mark.parametrize("variant", sorted(paper.VARIANTS))
def test_every_paper_config_runs_one_step(tmp_path, variant):
  base = train_helpers.tiny_config(tmp_path, steps=1)
  config = paper.variant_config(variant, base)
  config.moe.capacity_factor = 0.5  # make drops happen, so IR and FR have work
  summary = train_lib.train_and_evaluate(config, str(tmp_path / variant))
  assert summary["step"] == 1
  assert np.isfinite(summary["train"]["loss"])
  assert summary["train"]["drop_rate"] > 0
  if config.moe.ir_mode is not None:
    assert summary["train"]["ir_rate"] > 0
  if config.moe.fill_in:
    assert summary["train"]["fill_in_rate"] > 0


@pytest.mark.parametrize("override, message", [
    (dict(moe=dict(num_experts=6)), "not divisible by the mesh's expert axis"),
    (dict(train=dict(batch_size=12)), "not divisible by the 8 devices"),
    (dict(moe=dict(group_size=48)), "not divisible by moe.group_size=48"),
    (dict(mesh=dict(data=4, expert=4)), "needs 16 devices but only 8 exist"),
    (dict(moe=dict(top_k=9)), "moe.top_k=9"),
    (dict(moe=dict(priority="random")), "moe.priority='random'"),
    (dict(data=dict(text_files="/nonexistent/*.txt")), "/nonexistent/*.txt"),
])
def test_bad_config_gives_one_clear_error_before_compiling(tmp_path, override, message, monkeypatch):
  config = train_helpers.tiny_config(tmp_path)
  for section, values in override.items():
    config[section].update(values)
  compiled = []
  monkeypatch.setattr(train_lib, "jit_train_step", lambda *a, **k: compiled.append(1))
  with pytest.raises(ValueError, match=message.replace("*", r"\*").replace("(", r"\(")):
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  assert not compiled


def test_empty_text_files_are_rejected(tmp_path):
  config = train_helpers.tiny_config(tmp_path)
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "a.txt").write_text("")
  config.data.text_files = str(empty / "*.txt")
  with pytest.raises(ValueError, match="empty"):
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))


def test_unknown_tfds_name_offline_fails_fast(tmp_path, monkeypatch):
  config = train_helpers.tiny_config(tmp_path)
  config.data.source = "tfds"
  config.data.tfds_name = "no_such_dataset_xyz"
  monkeypatch.setattr(registered_data, "is_online", lambda *a, **k: False)
  start = time.time()
  with pytest.raises(ValueError, match="no_such_dataset_xyz"):
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  assert time.time() - start < 30


def test_cli_unknown_config_field_is_one_clear_line(tmp_path):
  result = subprocess.run(_train_cmd(tmp_path / "run", "--config.moe.bogus_field=1"), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "bogus_field" in result.stderr


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  config = train_helpers.tiny_config(tmp_path, steps=2)
  config.train.update(dict(checkpoint_every=2, log_every=1))
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(config, workdir)  # a good checkpoint at step 2
  config.train.steps = 8
  # A NaN learning rate (the config rejects one) makes step 3 poison the parameters.
  real = train_lib.make_optimizer
  monkeypatch.setattr(train_lib, "make_optimizer",
                      lambda train, moe_cfg=None: real(dataclasses.replace(train, learning_rate=float("nan")), moe_cfg))
  with pytest.raises(train_lib.NonFiniteLossError, match="Loss became nan at step 4.*resumes from step 2"):
    train_lib.train_and_evaluate(config, workdir)
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps == [2]


def test_remat_gives_the_same_loss_and_gradients(tmp_path):
  """Rematerialisation trades memory for compute; the numbers must not change."""
  results = {}
  for remat in (False, True):
    config = train_helpers.tiny_config(tmp_path, steps=2)
    config.model.remat = remat
    summary = train_lib.train_and_evaluate(config, str(tmp_path / f"remat_{remat}"))
    results[remat] = summary["train"]
  np.testing.assert_allclose(results[True]["loss"], results[False]["loss"], rtol=1e-5)
  np.testing.assert_allclose(results[True]["grad_norm"], results[False]["grad_norm"], rtol=1e-4)


def test_stop_signal_on_a_checkpoint_step_saves_once_and_exits_cleanly(tmp_path, monkeypatch):
  """A SIGTERM that lands on a step that is checkpointed anyway must not try to save that step twice."""
  config = train_helpers.tiny_config(tmp_path, steps=1000)
  config.train.update(dict(checkpoint_every=1, eval_every=100000, log_every=100000))
  real_global_batch, calls = train_lib.global_batch, []

  def global_batch(local, mesh):
    calls.append(1)
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer: stop after this step
    return real_global_batch(local, mesh)

  monkeypatch.setattr(train_lib, "global_batch", global_batch)
  summary = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["reason"] == "stopped by SIGTERM" and summary["step"] == 3
  steps = sorted(int(s) for s in os.listdir(tmp_path / "run" / "checkpoints") if s.isdigit())
  assert steps == [1, 2, 3]
