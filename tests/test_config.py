"""The config schema (rectify_moe/config): one default per field, every config file complete, typed checks with
one-line errors, command-line overrides (unknown fields, None), and the generated reference."""

import glob
import importlib
import json
import os
import subprocess
import sys

import ml_collections
import pytest

import train_helpers
from configs import paper
from rectify_moe import variants
from rectify_moe.config import cli, fields, reference, schema
from rectify_moe.config.fields import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                      if not p.endswith("__init__.py"))


def _keys(tree, prefix=""):
  out = set()
  for key, value in tree.items():
    out |= _keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
  return out


SCHEMA_KEYS = _keys(schema.default_config().to_dict())


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_has_every_schema_field_and_parses(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  assert _keys(config.to_dict()) == SCHEMA_KEYS
  cfg = schema.parse(config)
  cfg.model.validate()
  schema.resolve(config)[0].moe.validate()


def test_paper_variants_are_defined_once():
  assert set(paper.VARIANTS) == {f"top{k}{s}" for k in (1, 2) for s in ("", "_ir", "_fr", "_ir_fr")}
  for name in paper.VARIANTS:
    moe = paper.variant_config(name).moe
    for field, value in variants.paper_overrides(name).items():
      assert moe[field] == value, (name, field)


def test_defaults_live_in_the_schema_only():
  cfg = schema.RunConfig()
  assert fields.to_config_dict(cfg).to_dict() == schema.default_config().to_dict()
  assert schema.MoEConfig().eval_capacity_factor is None and schema.MoEConfig().priority == "position"


@pytest.mark.parametrize("values, message", [
    ({"moe": {"capcity_factor": 1.0}}, r"Unknown config field moe\.capcity_factor\. Did you mean 'moe\.capacity_factor'"),
    ({"trian": {}}, r"Unknown config field trian\. Did you mean 'train'"),
    ({"moe": {"priority": "random"}}, r"moe\.priority='random'; use one of \['position', 'bpr', 'token_major'\]"),
    ({"train": {"warmup_steps": -3}}, r"train\.warmup_steps=-3 must be >= 0"),
    ({"train": {"learning_rate": float("nan")}}, r"train\.learning_rate=nan must be >= 0"),
    ({"moe": {"top_k": "two"}}, r"moe\.top_k='two' is not of type int"),
    ({"moe": {"top_k": None}}, r"moe\.top_k=None is not allowed"),
    ({"data": {"heldout_fraction": 1.0}}, r"data\.heldout_fraction=1\.0 must be < 1"),
])
def test_bad_values_fail_in_one_line(values, message):
  with pytest.raises(ConfigError, match=message) as info:
    schema.parse(values)
  assert "\n" not in str(info.value)


def test_optional_fields_take_none_and_old_spellings():
  cfg = schema.parse({"moe": {"ir_mode": "None", "eval_capacity_factor": None}, "train": {"distributed": False}})
  assert cfg.moe.ir_mode is None and cfg.moe.eval_capacity_factor is None and cfg.train.distributed == "off"
  config = schema.default_config()
  config.moe.eval_capacity_factor = 0.5  # a placeholder keeps its type: the command line can set a float
  assert schema.parse(config).moe.eval_capacity_factor == 0.5


def test_preparse_checks_paths_and_takes_out_none():
  argv = ["train.py", "--config=configs/default.py", "--config.moe.ir_mode=None", "--config.moe.top_k", "2",
          "--config.moe.eval_capacity_factor", "null", "--noconfig.moe.fill_in", "--workdir=x"]
  out, nones = cli.preparse(argv, schema.RunConfig)
  assert out == ["train.py", "--config=configs/default.py", "--config.moe.top_k=2", "--noconfig.moe.fill_in",
                 "--workdir=x"]
  assert nones == ["moe.ir_mode", "moe.eval_capacity_factor"]
  config = cli.apply_none(ml_collections.ConfigDict(schema.default_config().to_dict()), nones)
  assert config.moe.ir_mode is None and config.moe.eval_capacity_factor is None
  for bad, message in (("--config.moe.capcity_factor=1", "Did you mean 'moe.capacity_factor'"),
                       ("--config.mdoel.d_model=1", "Did you mean 'model'"),
                       ("--config.moe.top_k=None", "moe.top_k=None is not allowed"),
                       ("--config.seed.x=1", "'seed' is a value, not a section")):
    with pytest.raises(ConfigError, match=message):
      cli.preparse([bad], schema.RunConfig)


def test_reference_doc_is_generated_from_the_schema():
  with open(os.path.join(REPO, reference.DOC_PATH)) as f:
    assert f.read() == reference.markdown(), "run: python -m rectify_moe.config.reference"
  for section, cls in schema.SECTIONS.items():
    for f in fields.fields_of(cls):
      assert f.metadata["doc"], f"{section}.{f.name} has no meaning"


# ---------------------------------------------------------------------------------------------------------
# train.py on configs/default.py: overrides of any field, None, a greedy router; errors in one line.
# ---------------------------------------------------------------------------------------------------------
def _env():
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


def _train(tmp_path, name, *overrides, steps=2):
  corpus = train_helpers.write_corpus(str(tmp_path / "corpus"))
  tiny = [f"--config.train.steps={steps}", "--config.data.source=text_files", f"--config.data.text_files={corpus}",
          f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.data.heldout_fraction=0.2",
          "--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.num_heads=2",
          "--config.model.d_ff=64", "--config.moe.expert_dim=32", "--config.moe.group_size=32",
          "--config.train.batch_size=4", "--config.train.seq_len=32", "--config.train.eval_batch_size=4",
          "--config.train.eval_batches=1", "--config.train.log_every=1"]
  workdir = tmp_path / name
  cmd = [sys.executable, "train.py", "--config=configs/default.py", f"--workdir={workdir}", *tiny, *overrides]
  result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  return result, workdir


def test_cli_none_and_gating_dropout_on_the_default_config(tmp_path):
  result, workdir = _train(tmp_path, "run", "--config.moe.ir_mode=None", "--config.moe.eval_capacity_factor=None",
                           "--config.moe.gating_dropout=0.2")
  assert result.returncode == 0, result.stdout + result.stderr
  with open(workdir / "config.json") as f:
    saved = json.load(f)["moe"]
  assert saved["ir_mode"] is None and saved["eval_capacity_factor"] is None and saved["gating_dropout"] == 0.2
  assert "Router: Top-1+FR" in result.stdout and "step 2/2" in result.stdout


def test_cli_greedy_router_on_the_default_config_turns_rectification_off(tmp_path):
  result, workdir = _train(tmp_path, "run", "--config.moe.router=hash")
  assert result.returncode == 0, result.stdout + result.stderr
  assert ("moe.router='hash' routes greedily to one expert; running without moe.fill_in=True, "
          "moe.ir_mode='ignore_kth'") in result.stderr
  with open(workdir / "config.json") as f:
    saved = json.load(f)["moe"]
  assert saved["router"] == "hash" and saved["fill_in"] is False and saved["ir_mode"] is None


@pytest.mark.parametrize("override, message", [
    ("--config.moe.capcity_factor=1", "Unknown config field 'moe.capcity_factor'. Did you mean 'moe.capacity_factor'?"),
    ("--config.train.warmup_steps=-3", "train.warmup_steps=-3 must be >= 0."),
])
def test_cli_bad_field_is_one_line_exit_2(tmp_path, override, message):
  result, workdir = _train(tmp_path, "run", override)
  assert result.returncode == 2
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
