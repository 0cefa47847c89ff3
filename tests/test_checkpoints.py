"""The checkpoint module: named items, the workdir layout, restore-model-only with shape checks."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

import train_helpers
from rectify_moe import checkpoints, sharding, train_lib
from rectify_moe.evaluation import run as eval_run
from rectify_moe.workdir import Workdir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ckpt")
  config = train_helpers.tiny_config(tmp, mesh=(2, 4), steps=2)
  config.train.update(dict(checkpoint_every=1))
  workdir = str(tmp / "run")
  train_lib.train_and_evaluate(config, workdir)
  return config, workdir


def test_workdir_layout_and_named_items(run):
  _, workdir = run
  paths = Workdir(workdir)
  for path in (paths.config_json, paths.metrics_jsonl, paths.loads_jsonl, paths.tensorboard):
    assert os.path.exists(path), path
  assert sorted(os.listdir(paths.checkpoints)) == ["1", "2"]
  items = sorted(d for d in os.listdir(paths.checkpoint(2)) if os.path.isdir(os.path.join(paths.checkpoint(2), d)))
  assert items == ["data", "integrity", "model", "optimizer"]


def test_restore_model_only_equals_the_model_of_the_full_restore(run):
  config, workdir = run
  mesh = sharding.make_mesh(2, 4)
  _, state, shardings = train_lib.create_train_state(config, mesh)
  ckpt = checkpoints.Checkpointer(workdir, keep=3)
  full, data = ckpt.restore(2, state, shardings)
  ckpt.close()
  assert data["step"] == 2 and "iterator" in data
  other = sharding.make_mesh(1, 8)  # another mesh: experts land on 8 shards
  step, _, model = eval_run.restore_model(workdir, config, other)
  assert step == 2
  want = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(full)[0])
  got = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(model)))
  assert len(want) == len(got)
  for path, value in want:
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=jax.tree_util.keystr(path))


def test_missing_step_and_shape_mismatch_are_one_line(run):
  _, workdir = run
  ckpt = checkpoints.Checkpointer(workdir, read_only=True)
  try:
    with pytest.raises(checkpoints.CheckpointError, match="Step 7 has no checkpoint .* available steps: 1, 2"):
      ckpt.select_step(7)
    saved = ckpt.model_shapes(2)
    assert saved["embed"] == (259, 32)
    with pytest.raises(checkpoints.CheckpointError, match=r"parameter embed has shape \(259, 32\) in the checkpoint"):
      checkpoints.check_shapes(saved, {**{k: jax.ShapeDtypeStruct(v, np.float32) for k, v in saved.items()},
                                       "embed": jax.ShapeDtypeStruct((259, 16), np.float32)}, 2)
  finally:
    ckpt.close()
