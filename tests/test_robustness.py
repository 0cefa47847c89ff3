"""A training run that survives what users do to it: corrupt checkpoints, a changed architecture, a second process
on the workdir, a NaN, a second evaluation; and the checks of the multi-process settings."""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_helpers
from rectify_moe import checkpoints, distributed, integrity, launch, sharding, train_lib
from rectify_moe.config import fields, saved
from rectify_moe.evaluation import run as eval_run
from rectify_moe.evaluation.swaps import EvalError
from rectify_moe.workdir_lock import WorkdirBusyError, WorkdirLock


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-step run with checkpoints at steps 1 and 2."""
  tmp = tmp_path_factory.mktemp("robust")
  config = train_helpers.tiny_config(tmp, mesh=(2, 4), steps=2)
  config.train.update(dict(checkpoint_every=1, eval_every=0))
  workdir = str(tmp / "run")
  train_lib.train_and_evaluate(config, workdir)
  return config, workdir


def _copy(trained, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(trained[1], workdir)
  return workdir


def _data_files(step_dir):
  """The OCDBT data files of the model item (`d/` and `ocdbt.process_*/d/`); which one holds which array varies from
  run to run, so every one is damaged."""
  files = []
  for root, _, names in os.walk(os.path.join(step_dir, "model")):
    if os.path.basename(root) == "d":
      files += [os.path.join(root, n) for n in names]
  assert files
  return files


def _truncate(step_dir):
  for path in _data_files(step_dir):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _empty_metadata(step_dir):
  open(os.path.join(step_dir, "model", "_METADATA"), "w").close()


def _delete_manifest(step_dir):
  os.remove(os.path.join(step_dir, "model", "manifest.ocdbt"))


def _random_bytes(step_dir):
  rng = np.random.default_rng(0)
  for path in _data_files(step_dir):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      f.seek(size // 4)
      f.write(rng.integers(0, 256, size // 2, dtype=np.uint8).tobytes())


def _other_steps_arrays(step_dir):
  """Readable, finite arrays that are not this step's (files mixed up): only the stored checksum tells."""
  model = os.path.join(step_dir, "model")
  shutil.rmtree(model)
  shutil.copytree(os.path.join(os.path.dirname(step_dir), "1", "model"), model)


@pytest.mark.parametrize("corrupt", [_truncate, _empty_metadata, _delete_manifest, _random_bytes, _other_steps_arrays],
                         ids=["truncated_array_file", "empty_metadata", "deleted_manifest", "random_bytes",
                              "other_steps_arrays"])
def test_a_corrupt_latest_checkpoint_is_moved_aside_and_the_previous_one_resumed(trained, tmp_path, capsys, corrupt):
  config, _ = trained
  workdir = _copy(trained, tmp_path)
  corrupt(os.path.join(workdir, "checkpoints", "2"))
  mesh = sharding.make_mesh(2, 4)
  _, state, shardings = train_lib.create_train_state(config, mesh)
  ckpt = checkpoints.Checkpointer(workdir, keep=3)
  capsys.readouterr()
  step, _, data_state = integrity.restore_latest_good(ckpt, state, shardings)
  ckpt.close()
  err = capsys.readouterr().err
  assert step == 1 and data_state["step"] == 1
  # One line for the bad checkpoint, one for the fallback, no traceback. (Reads that TensorStore abandoned after the
  # failed restore may be reported later by the garbage collector; pytest shows those as warnings, not ours.)
  lines = [line for line in err.splitlines() if line.startswith(("WARNING: ", "error: "))]
  assert len(lines) == 2 and "Traceback" not in err.split("Exception ignored")[0], err
  assert lines[0].startswith("WARNING: Checkpoint step 2 ") and "is bad: " in lines[0]
  if corrupt is _other_steps_arrays:
    assert "does not match its stored checksum" in lines[0], lines[0]
  assert "Resuming from step 1" in lines[1]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]
  assert os.listdir(os.path.join(workdir, integrity.REJECTED)) == ["2"]


def test_checksums_are_exact_and_name_the_altered_leaf():
  w = jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32).reshape(8, 8)
  state = nnx.State({"w": w, "count": jnp.arange(4, dtype=jnp.int32)})
  sums = integrity.checksums(state)
  assert sums == integrity.checksums(nnx.State({"w": w[::-1][::-1], "count": jnp.arange(4, dtype=jnp.int32)}))
  altered = integrity.checksums(nnx.State({"w": w.at[3, 3].add(1e-7), "count": jnp.arange(4, dtype=jnp.int32)}))
  with pytest.raises(integrity.CorruptCheckpointError, match=r"leaf \['w'\] does not match its stored checksum"):
    integrity.compare(altered, sums)
  broken = integrity.checksums(nnx.State({"w": w.at[0, 0].set(jnp.nan), "count": jnp.arange(4, dtype=jnp.int32)}))
  with pytest.raises(integrity.CorruptCheckpointError, match=r"leaf \['w'\] holds NaN or inf"):
    integrity.compare(broken, sums)


def test_no_good_checkpoint_refuses_in_one_line(trained, tmp_path, capsys):
  config, _ = trained
  workdir = _copy(trained, tmp_path)
  _truncate(os.path.join(workdir, "checkpoints", "2"))
  _empty_metadata(os.path.join(workdir, "checkpoints", "1"))
  config = config.copy_and_resolve_references()
  config.train.steps = 3
  capsys.readouterr()
  assert train_lib.run_main(config, workdir) == 2
  err = capsys.readouterr().err
  assert err.count("is bad: ") == 2 and "error: No good checkpoint in" in err and "use a new --workdir" in err
  assert sorted(os.listdir(os.path.join(workdir, integrity.REJECTED))) == ["1", "2"]


def test_changed_architecture_names_the_field_and_keeps_config_json(trained, tmp_path, capsys):
  config, _ = trained
  workdir = _copy(trained, tmp_path)
  path = os.path.join(workdir, "config.json")
  before = open(path).read()
  for section, name, value in (("model", "d_model", 64), ("moe", "num_experts", 4), ("model", "tie_embeddings", True)):
    changed = config.copy_and_resolve_references()
    changed[section][name] = value
    with pytest.raises(fields.ConfigError, match=rf"{section}\.{name}={value!r} but this workdir's checkpoints have "
                                                 rf"{section}\.{name}=.*use a new --workdir"):
      train_lib.train_and_evaluate(changed, workdir)
  # A failed data config does not overwrite it either.
  broken = config.copy_and_resolve_references()
  broken.data.text_files = str(tmp_path / "missing" / "*.txt")
  broken.train.steps = 3
  capsys.readouterr()
  assert train_lib.run_main(broken, workdir) == 2
  assert len([line for line in capsys.readouterr().err.splitlines() if line.strip()]) == 1
  assert open(path).read() == before


def test_a_config_that_does_not_fit_the_checkpoints_is_one_line_and_moves_nothing(trained, tmp_path):
  config, _ = trained
  workdir = _copy(trained, tmp_path)
  changed = config.copy_and_resolve_references()
  changed.model.param_dtype = "bfloat16"
  with pytest.raises(fields.ConfigError, match=r"model\.param_dtype='bfloat16' but this workdir's checkpoints have "
                                               r"model\.param_dtype='float32'"):
    train_lib.train_and_evaluate(changed, workdir)
  # Past the saved-config check (e.g. config.json lost): the restore itself names the mismatch and rejects nothing.
  _, state, shardings = train_lib.create_train_state(changed, sharding.make_mesh(2, 4))
  ckpt = checkpoints.Checkpointer(workdir, keep=3)
  with pytest.raises(checkpoints.ConfigMismatchError, match=r"is float32 in the checkpoint but bfloat16 from the "
                                                           r"config; resume with the model\.param_dtype"):
    integrity.restore_latest_good(ckpt, state, shardings)
  ckpt.close()
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
  assert not os.path.exists(os.path.join(workdir, integrity.REJECTED))


def test_workdir_lock_refuses_a_second_process_and_takes_over_a_stale_one(trained, tmp_path, capsys):
  config, _ = trained
  workdir = str(tmp_path / "locked")
  with WorkdirLock(workdir):
    with pytest.raises(WorkdirBusyError, match=f"in use by training process pid {os.getpid()} "):
      WorkdirLock(workdir).acquire()
    capsys.readouterr()
    assert train_lib.run_main(config, workdir) == 2
    err = capsys.readouterr().err
    assert f"error: Workdir {workdir} is in use by training process pid {os.getpid()}" in err
    assert not os.path.exists(os.path.join(workdir, "config.json"))
  # A lock file left by a process that is gone is taken over.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  with open(os.path.join(workdir, "train.lock"), "w") as f:
    json.dump({"pid": dead.pid, "host": os.uname().nodename, "started": "earlier"}, f)
  capsys.readouterr()
  with WorkdirLock(workdir):
    assert f"training process pid {dead.pid} has exited" in capsys.readouterr().err


def test_nan_keeps_a_checkpoint_before_the_divergence_and_a_lower_lr_resumes(tmp_path, capsys):
  config = train_helpers.tiny_config(tmp_path, mesh=(2, 4), steps=6)
  config.train.update(dict(learning_rate=1e6, warmup_steps=0, grad_clip=1e6, checkpoint_every=1, log_every=100,
                           keep_checkpoints=20, write_loads=False, eval_every=0))
  workdir = str(tmp_path / "nan")
  capsys.readouterr()
  assert train_lib.run_main(config, workdir) == 3
  err = capsys.readouterr().err
  assert "Loss became nan at step " in err, err
  diverged = int(err.split("Loss became nan at step ")[1].split()[0])
  kept = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  assert kept and kept[-1] == diverged - 2, (kept, diverged)
  assert f"the rerun resumes from step {diverged - 2}" in err
  assert str(diverged - 1) in os.listdir(os.path.join(workdir, integrity.REJECTED))
  config.train.update(dict(learning_rate=1e-3, grad_clip=1.0))
  summary = train_lib.train_and_evaluate(config, workdir)
  assert summary["step"] == 6 and np.isfinite(summary["train"]["loss"])


def test_eval_labels_the_checkpoint_router_and_refuses_to_overwrite(trained, tmp_path):
  config, workdir = trained
  out = str(tmp_path / "eval")
  quiet = lambda message: None
  other = config.copy_and_resolve_references()
  other.moe.update(dict(top_k=2, fill_in=False, ir_mode=None))
  first = eval_run.evaluate_checkpoint(other, workdir, eval_batches=1, output_dir=out, plots=False, log=quiet)
  names = [r["name"] for r in first["routers"]]
  assert names[0].startswith("checkpoint (Top-1") and names[1].startswith("--config (Top-2"), names
  assert first["routers"][1]["swap"] == {"top_k": 2, "fill_in": False, "ir_mode": None}
  with pytest.raises(EvalError, match="holds an earlier evaluation; pass --overwrite"):
    eval_run.evaluate_checkpoint(None, workdir, eval_batches=1, output_dir=out, plots=False, log=quiet)
  again = eval_run.evaluate_checkpoint(None, workdir, eval_batches=1, output_dir=out, plots=False, log=quiet,
                                       overwrite=True)
  assert again["routers"][0]["loss"] == pytest.approx(first["routers"][0]["loss"], rel=1e-6)


def test_distributed_settings(monkeypatch):
  config = train_helpers.tiny_config.__globals__["default"].get_config()
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.settings(config) is None
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
  with pytest.raises(fields.ConfigError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
    distributed.settings(config)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  assert distributed.settings(config) == dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1)
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  with pytest.raises(fields.ConfigError, match=r"JAX_PROCESS_ID=2 must be in \[0, JAX_NUM_PROCESSES=2\)"):
    distributed.settings(config)
  monkeypatch.delenv("JAX_PROCESS_ID")
  monkeypatch.delenv("JAX_NUM_PROCESSES")
  config.train.update(dict(num_processes=2, process_id=0))
  assert distributed.settings(config)["process_id"] == 0
  env = launch.process_env({"XLA_FLAGS": "x"}, index=1, count=2, port=99, devices=4)
  assert env["JAX_PROCESS_ID"] == "1" and env["JAX_NUM_CPU_DEVICES"] == "4" and "XLA_FLAGS" not in env
  assert launch.command_of(["--", "train.py", "--workdir=x"]) == [sys.executable, "train.py", "--workdir=x"]


def test_saved_architecture_fields_ignore_training_settings(trained):
  config, workdir = trained
  cfg = train_lib.schema.resolve(config)[0]
  changed = cfg.__class__(**{**cfg.__dict__, "train": cfg.train.__class__(**{**cfg.train.__dict__, "steps": 99})})
  saved.check_unchanged(changed, os.path.join(workdir, "config.json"))  # no error: steps may change on a resume
