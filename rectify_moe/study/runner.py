"""Runs a study: the dense pretraining, then every (variant, capacity factor, seed), each evaluated; resumable.

Layout of the study's workdir:
  WORKDIR/study.json              the study config (a rerun with another config is refused: use a new --workdir)
  WORKDIR/dense/                  the dense run (a train.py workdir)
  WORKDIR/runs/<variant>__cf<cf>__s<seed>/   one train.py workdir per run, plus study_result.json once evaluated
  WORKDIR/results.json, results.md, *.png    written by `report.py`

A run is finished when its `study_result.json` exists; a rerun skips finished runs and resumes an interrupted one
from its latest checkpoint (train.py's own resume), so killing the study loses at most the steps since the last
checkpoint of one run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional

import jax
import ml_collections
from flax import nnx

from rectify_moe import data as data_lib
from rectify_moe import evaluation, log, sharding, train_lib, variants
from rectify_moe.config import fields, schema
from rectify_moe.config.fields import ConfigError
from rectify_moe.evaluation.evaluator import Evaluator
from rectify_moe.hf import config as hf_config
from rectify_moe.study.config import StudyConfig, vanilla_of

RESULT_FILE = "study_result.json"
NO_LB = "/noLB"


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One continued run of the study."""
  variant: str            # the row label: a variant name, or 'NAME/noLB' (load-balance loss off)
  capacity_factor: float
  seed: int

  @property
  def base_variant(self) -> str:
    return self.variant.removesuffix(NO_LB)

  @property
  def no_lb(self) -> bool:
    return self.variant.endswith(NO_LB)

  @property
  def vanilla(self) -> str:
    """The row it is compared with: the vanilla router of the same k (and the same load-balance setting)."""
    return vanilla_of(self.base_variant) + (NO_LB if self.no_lb else "")

  @property
  def folder(self) -> str:
    return f"{self.variant.replace('/', '_')}__cf{self.capacity_factor:g}__s{self.seed}"


def plan(study: StudyConfig) -> list[RunSpec]:
  """Every run, seed-major (all variants and capacity factors of seed 0 first, so a partial study is balanced)."""
  names = study.variant_names() + [n + NO_LB for n in study.no_lb_names()]
  return [RunSpec(name, cf, seed) for seed in range(study.seeds) for cf in study.capacity_factor_values()
          for name in names]


def _template(study: StudyConfig) -> ml_collections.ConfigDict:
  return fields.to_config_dict(study.run)


def dense_config(study: StudyConfig) -> ml_collections.ConfigDict:
  """The dense pretraining run: the template with every FFN dense."""
  config = _template(study)
  config.model.moe_every = 0
  config.train.update(dict(steps=study.dense_steps, learning_rate=study.dense_learning_rate, eval_every=0,
                           checkpoint_every=max(study.dense_steps // 4, 1)))
  return config


def run_config(study: StudyConfig, spec: RunSpec, dense_workdir: str) -> ml_collections.ConfigDict:
  """The config of one continued run (upcycled from the dense run, or from scratch)."""
  config = _template(study)
  config.seed = spec.seed
  config.moe.update(variants.overrides(spec.base_variant))
  config.moe.update(dict(capacity_factor=spec.capacity_factor, eval_capacity_factor=spec.capacity_factor,
                         expert_dim=study.run.model.d_ff))
  steps = (study.scratch_steps or study.dense_steps + study.steps) if study.from_scratch else study.steps
  # The study evaluates each run itself (the whole held-out split): no evaluation inside the run.
  config.train.update(dict(steps=steps, eval_every=0, checkpoint_every=max(steps // 4, 1)))
  if not study.from_scratch:
    config.train.update(dict(learning_rate=study.learning_rate, warmup_steps=study.warmup_steps))
    config.init_from = dense_workdir
    config.init_noise = study.init_noise
  if spec.no_lb:
    config.train.aux_loss_weight = 0.0
  return config


def imported(study: StudyConfig) -> StudyConfig:
  """With study.dense_from=hf:DIR, the study whose run template has DIR's architecture and tokenizer."""
  if not study.dense_from:
    return study
  if not os.path.isdir(hf_config.hf_dir(study.dense_from)):
    hf_config.read(hf_config.hf_dir(study.dense_from))  # one line: no such directory
  run = hf_config.apply(dataclasses.replace(study.run, init_from=study.dense_from))
  return dataclasses.replace(study, run=dataclasses.replace(run, init_from=""))


def _check_identity(study: StudyConfig, workdir: str) -> None:
  """Writes WORKDIR/study.json, or refuses a rerun whose study config differs from the one that started it."""
  path = os.path.join(workdir, "study.json")
  current = json.loads(json.dumps(fields.as_dict(study), default=str))
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved != current:
      changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
      raise ConfigError(f"{workdir} holds a study with another config (study.{changed[0]} differs); use a new "
                        "--workdir, or the same config to resume.")
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(current, f, indent=2)


def _evaluate(study: StudyConfig, workdir: str, *, step: Optional[int] = None) -> dict[str, Any]:
  """The run's own router on the held-out split (study.eval_batches, 0 = all of it)."""
  results = evaluation.evaluate_checkpoint(None, workdir, step=step, eval_batches=study.eval_batches,
                                           eval_batch_size=study.eval_batch_size, write=False, plots=False,
                                           log=lambda message: None)
  row = results["routers"][0]
  return {k: row[k] for k in ("loss", "loss_se", "perplexity", "accuracy", "tokens", "mean")}


def ablated_loss(study: StudyConfig, workdir: str) -> float:
  """The held-out loss of a run's final checkpoint with every MoE layer's output zeroed (w_down of the experts set
  to 0): how much the experts carry."""
  cfg = schema.parse(evaluation.load_run_config(workdir))
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.expert)
  _, graphdef, state = evaluation.restore_model(workdir, cfg, mesh)
  pure = nnx.to_pure_dict(state)
  for i in cfg.model.moe_layer_indices:
    w = pure["blocks"][i]["ffn"]["w_down"]
    pure["blocks"][i]["ffn"]["w_down"] = jax.device_put(jax.numpy.zeros(w.shape, w.dtype), w.sharding)
  nnx.replace_by_pure_dict(state, pure)
  batches = data_lib.make_eval_batches(cfg.data, seq_len=cfg.train.seq_len, batch_size=study.eval_batch_size,
                                       max_batches=study.eval_batches or None)
  evaluator = Evaluator(graphdef, jax.tree.map(lambda x: x.sharding, state), mesh)
  return evaluator(state, batches)["loss"]


def _train(config: ml_collections.ConfigDict, workdir: str) -> None:
  with log.quiet():
    train_lib.train_and_evaluate(config, workdir)


def execute(study: StudyConfig, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the whole study; returns {"dense": ..., "runs": [...]} for the report."""
  study.validate()
  _check_identity(study, workdir)
  # Runs of one variant and capacity factor compile the same programs: keep them between runs and reruns.
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(workdir), "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  runs = plan(study)
  dense_dir = os.path.join(workdir, "dense")
  study = imported(study)
  log.info(f"Study: {len(runs)} runs ({len(study.variant_names()) + len(study.no_lb_names())} variants x "
           f"{len(study.capacity_factor_values())} capacity factors x {study.seeds} seeds) "
           f"{'from scratch' if study.from_scratch else 'upcycled from one dense run'}; {jax.device_count()} "
           f"{jax.default_backend()} device(s), mesh ({study.run.mesh.data}, {study.run.mesh.expert}).")
  dense = _load(dense_dir)
  if dense is None and study.dense_from:
    start = time.time()
    os.makedirs(dense_dir, exist_ok=True)
    result = evaluation.evaluate_checkpoint(
        fields.to_config_dict(study.run), None, init_from=study.dense_from, eval_batches=study.eval_batches,
        eval_batch_size=study.eval_batch_size, write=False, plots=False, log=lambda message: None)["routers"][0]
    dense = {"kind": "dense", "steps": 0, "from": study.dense_from, "seconds": time.time() - start,
             **{k: result[k] for k in ("loss", "loss_se", "perplexity", "accuracy", "tokens", "mean")}}
    _save(dense_dir, dense)
  if dense is None:
    start = time.time()
    _train(dense_config(study), dense_dir)
    dense = {"kind": "dense", "steps": study.dense_steps, **_evaluate(study, dense_dir),
             "seconds": time.time() - start}
    _save(dense_dir, dense)
  origin = study.dense_from or f"{study.dense_steps} steps"
  log.info(f"[dense] {origin}: held-out loss {dense['loss']:.4f} ± {dense['loss_se']:.4f} "
           f"({dense['tokens']:,} tokens)")
  results = []
  for index, spec in enumerate(runs, start=1):
    run_dir = os.path.join(workdir, "runs", spec.folder)
    result = _load(run_dir)
    if result is None:
      start = time.time()
      _train(run_config(study, spec, study.dense_from or dense_dir), run_dir)
      result = {"variant": spec.variant, "base_variant": spec.base_variant, "vanilla": spec.vanilla,
                "no_lb": spec.no_lb, "capacity_factor": spec.capacity_factor, "seed": spec.seed,
                **_evaluate(study, run_dir)}
      if study.ablate_moe and spec.variant == spec.vanilla:
        result["ablated_loss"] = ablated_loss(study, run_dir)
      result["seconds"] = time.time() - start
      _save(run_dir, result)
      done = f"{result['seconds']:.0f} s"
    else:
      done = "done before"
    mean = result["mean"]
    log.info(f"[run {index}/{len(runs)}] {spec.variant} cf={spec.capacity_factor:g} seed={spec.seed}: held-out loss "
             f"{result['loss']:.4f} ± {result['loss_se']:.4f}  drop {mean['drop_rate']:.3f}  pad "
             f"{mean['padding_rate']:.3f}  fill {mean['fill_in_rate']:.3f}  ir {mean['ir_rate']:.3f}  ({done})")
    results.append(result)
  return {"study": json.loads(json.dumps(fields.as_dict(study), default=str)), "dense": dense, "runs": results,
          "machine": f"{jax.device_count()} {jax.default_backend()} device(s)"}


def _load(run_dir: str) -> Optional[dict[str, Any]]:
  path = os.path.join(run_dir, RESULT_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _save(run_dir: str, result: dict[str, Any]) -> None:
  path = os.path.join(run_dir, RESULT_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=2)
  os.replace(path + ".tmp", path)  # a kill never leaves half a result
