"""Sparse upcycling: a dense run's checkpoint -> the initial state of an MoE run (`--config.init_from=PATH`).

As the Rectify-Router authors built their models from Llama2-7B (and Komatsuzaki et al. 2023): embeddings,
attention, norms, the unembedding and the dense FFN layers are copied; every expert of an MoE layer is a copy of
that layer's dense SwiGLU FFN (`moe.expert_dim` must equal the dense `model.d_ff`); the router starts fresh (its
init from `moe.router_init_std`; 0 gives a zero router, i.e. uniform probabilities); `init_noise` > 0 adds
independent Gaussian noise to each expert copy, with std `init_noise` times the std of the dense weight it copies.
The optimizer and the step start at 0. With exact copies the MoE computes the dense model's function for any token
whose routed weights sum to 1 and for every token IR rectifies; `tests/test_upcycle.py` checks it.

PATH is a dense run's workdir (its latest checkpoint) or one checkpoint step folder (`WORKDIR/checkpoints/300`), or
`hf:DIR`, a local Hugging Face folder of the Llama family (`rectify_moe/hf`; the run takes DIR's architecture, and a
dense run (model.moe_every=0) simply starts from the imported model).
Every mismatch is one line before anything compiles (`check_source`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rectify_moe import checkpoints, log
from rectify_moe import model as model_lib
from rectify_moe.config import saved, schema
from rectify_moe.config.fields import ARCHITECTURE, ConfigError, names_of_kind
from rectify_moe.hf import config as hf_config
from rectify_moe.hf import weights as hf_weights
from rectify_moe.workdir import Workdir

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
# Model fields the dense run and the MoE run must share (the copied parameters' shapes and the function they compute).
SHARED_MODEL_FIELDS = tuple(name for name in names_of_kind(schema.ModelConfig, ARCHITECTURE) if name != "moe_every")


@dataclasses.dataclass(frozen=True)
class Source:
  """A dense checkpoint to upcycle: the run's workdir, the step, and the run's config (or a Hugging Face folder:
  `hf_dir`, step 0 and a config holding its architecture)."""
  workdir: str
  step: int
  config: schema.RunConfig
  hf_dir: str = ""


def locate(path: str) -> tuple[str, Any]:
  """(workdir, step or None for the latest) of `init_from`; ConfigError if PATH holds no checkpoint."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise ConfigError(f"init_from={path!r} does not exist; give a dense run's workdir or one of its "
                      "checkpoints/<step> folders.")
  parent, name = os.path.split(path.rstrip(os.sep))
  if name.isdigit() and os.path.basename(parent) == "checkpoints":
    return os.path.dirname(parent), int(name)
  if not checkpoints.exists(path):
    raise ConfigError(f"init_from={path!r} holds no checkpoint (no checkpoints/ folder); train the dense model "
                      f"first: python train.py --config=configs/dense.py --workdir={path}")
  return path, None


def check_source(cfg: schema.RunConfig) -> Source:
  """The dense checkpoint of `cfg.init_from`, checked against the MoE run's config (one-line ConfigError).

  Checks: a checkpoint exists; the run's config.json is readable and describes a dense model (model.moe_every=0);
  the shared model fields match; the MoE layers are SwiGLU experts of width moe.expert_dim = the dense d_ff.
  """
  directory = hf_config.hf_dir(cfg.init_from)
  if directory is not None:
    return _check_hf_source(cfg, directory)
  workdir, step = locate(cfg.init_from)
  paths = Workdir(workdir)
  fix = "init_from must be a workdir written by train.py"
  dense = saved.load(paths.config_json, fix)
  if dense is None:
    raise ConfigError(f"init_from: the dense run has no {paths.config_json}; {fix}.")
  if dense.model.num_moe_layers:
    raise ConfigError(f"init_from={cfg.init_from!r} is an MoE run (model.moe_every={dense.model.moe_every}); "
                      "upcycling starts from a dense run (model.moe_every=0, e.g. configs/dense.py).")
  if not cfg.model.num_moe_layers:
    raise ConfigError("init_from upcycles into MoE layers, but model.moe_every=0 here; set model.moe_every "
                      "(e.g. 2) or drop init_from.")
  _check_shared(cfg, dense, workdir)
  mine, theirs = (c.data.tokenizer or "byte" for c in (cfg, dense))
  if mine != theirs:  # the embeddings are indexed by the dense run's token ids
    raise ConfigError(f"init_from: data.tokenizer={mine!r} here but {theirs!r} in the dense run ({workdir}); set "
                      f"--config.data.tokenizer={theirs!r}.")
  ckpt = checkpoints.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.select_step(step)
  except checkpoints.CheckpointError as e:
    raise ConfigError(f"init_from: {e}") from None
  finally:
    ckpt.close()
  return Source(workdir=workdir, step=step, config=dense)


def _check_hf_source(cfg: schema.RunConfig, directory: str) -> Source:
  """A Hugging Face folder: its config.json in the family, its architecture = the run's (`hf.config.apply`)."""
  path = os.path.join(directory, "config.json")
  fields = hf_config.model_fields(hf_config.read(directory), path)
  dense = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields), init_from="")
  hf_weights.tensor_files(directory)  # a missing weight file or shard is one line now
  _check_shared(cfg, dense, directory)
  return Source(workdir=directory, step=0, config=dense, hf_dir=directory)


def _check_shared(cfg: schema.RunConfig, dense: schema.RunConfig, where: str) -> None:
  """The run's shared model fields (and, for an MoE run, its experts) against the dense model (one-line
  ConfigError)."""
  for name in SHARED_MODEL_FIELDS:
    mine, theirs = getattr(cfg.model, name), getattr(dense.model, name)
    if mine != theirs:
      raise ConfigError(f"init_from: model.{name}={mine!r} here but {theirs!r} in the dense run ({where}); set "
                        f"--config.model.{name}={theirs!r}.")
  if not cfg.model.num_moe_layers:  # a dense run starting from the imported model: nothing to copy into experts
    return
  if cfg.moe.expert_dim != dense.model.d_ff:
    raise ConfigError(f"init_from: moe.expert_dim={cfg.moe.expert_dim} must equal the dense model.d_ff="
                      f"{dense.model.d_ff} (every expert is a copy of the dense FFN); set "
                      f"--config.moe.expert_dim={dense.model.d_ff}.")
  if cfg.moe.activation != "swiglu":
    raise ConfigError(f"init_from: moe.activation={cfg.moe.activation!r}, but the dense FFN is SwiGLU; set "
                      "--config.moe.activation=swiglu.")


def load_dense(source: Source, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """The dense model's parameters (pure dict, replicated on `mesh`)."""
  if source.hf_dir:
    return hf_weights.load(source.hf_dir, source.config.model, mesh, log=log.info)
  _, abstract = model_lib.abstract_model(source.config, mesh)
  ckpt = checkpoints.Checkpointer(source.workdir, read_only=True)
  try:
    return ckpt.restore_model(source.step, checkpoints.abstract_target(abstract, mesh))
  except checkpoints.CheckpointError as e:
    raise ConfigError(f"init_from: {e}") from None
  finally:
    ckpt.close()


def _leaves(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_leaves(value, prefix + (str(key),)))
    return out
  return {prefix: tree}


def upcycled_model(model_pure: dict[str, Any], dense_pure: dict[str, Any], cfg: schema.RunConfig) -> dict[str, Any]:
  """The MoE model's pure state with every parameter taken from the dense model but its routers.

  Args:
    model_pure: the MoE model's freshly initialised pure state (its leaves keep their shardings).
    dense_pure: the dense model's pure parameters.
    cfg: the MoE run's config (`init_noise`, `seed`).

  Returns:
    A pure dict of the same structure and shardings as `model_pure`.
  """
  dense = _leaves(dense_pure)
  used = set()
  key = jax.random.key(cfg.seed + 7919)  # noise independent of the router init

  def take(path, leaf):
    nonlocal key
    path = tuple(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
    if path in dense and tuple(dense[path].shape) == tuple(leaf.shape):
      used.add(path)
      return jax.device_put(dense[path].astype(leaf.dtype), leaf.sharding)
    if len(path) >= 2 and path[-1] in EXPERT_WEIGHTS and path in dense:
      used.add(path)
      key, sub = jax.random.split(key)
      return _expert_copies(dense[path], leaf, cfg.init_noise, sub)
    if "router" in path:
      return leaf  # a fresh router
    raise ConfigError(f"init_from: the MoE model has parameter {'/'.join(path)} {tuple(leaf.shape)} that the dense "
                      "checkpoint cannot provide.")

  out = jax.tree_util.tree_map_with_path(take, model_pure)
  unused = sorted(set(dense) - used)
  if unused:
    raise ConfigError(f"init_from: the dense checkpoint's parameter {'/'.join(unused[0])} has no place in the MoE "
                      "model; check model.tie_embeddings and model.num_layers.")
  return out


def _expert_copies(dense_weight: jax.Array, target: jax.Array, noise: float, key: jax.Array) -> jax.Array:
  """[E, ...] copies of a dense weight, sharded like `target`, each with its own relative Gaussian noise."""
  num_experts = target.shape[0]

  def build(w, key):
    w = w.astype(jnp.float32)
    copies = jnp.broadcast_to(w[None], (num_experts, *w.shape))
    if noise > 0:
      copies = copies + noise * jnp.std(w) * jax.random.normal(key, copies.shape, jnp.float32)
    return copies.astype(target.dtype)

  return jax.jit(build, out_shardings=target.sharding)(dense_weight, key)


def initialize(state: Any, cfg: schema.RunConfig, source: Source, mesh: jax.sharding.Mesh) -> Any:
  """The `(model, optimizer)` train state with its model upcycled from `source` (the optimizer stays fresh)."""
  dense = load_dense(source, mesh)
  pure = nnx.to_pure_dict(state)
  new_state = jax.tree.map(lambda x: x, state)
  nnx.replace_by_pure_dict(new_state, {0: upcycled_model(pure[0], dense, cfg), 1: pure[1]})
  if not cfg.model.num_moe_layers:
    log.info(f"Dense model initialised from {source.workdir}.")
  else:
    log.info(f"Upcycled from {source.workdir} step {source.step}: every expert is a copy of its layer's dense FFN"
             + (f" (noise {cfg.init_noise} x std)" if cfg.init_noise else "") + "; routers start fresh.")
  return new_state
