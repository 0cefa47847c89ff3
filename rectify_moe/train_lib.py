"""Training: config checks, model and optimizer state, jitted train step, the loop.

`train_and_evaluate(config, workdir)` is the whole job behind `train.py`. Its pieces are importable:
- `validate_config`: every check that can run before data is read or anything compiles;
- `create_train_state`: the model + AdamW optimizer as one NNX state on the mesh;
- `train_step`: a pure function of (graphdef, state, batch), jitted with explicit shardings and donation;
evaluation is `evaluation.evaluator.Evaluator` (shared with eval.py), checkpoints `checkpoints.Checkpointer`,
outputs `writers.MetricsWriter`, every path `workdir.Workdir`.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rectify_moe import checkpoints, distributed, integrity, lm_loss, log, metrics, routers, sharding, upcycle
from rectify_moe import data as data_lib
from rectify_moe import model as model_lib
from rectify_moe import moe as moe_lib
from rectify_moe.config import fields, saved, schema
from rectify_moe.evaluation.evaluator import Evaluator, batch_shardings, global_batch
from rectify_moe.workdir import Workdir
from rectify_moe.workdir_lock import WorkdirBusyError, WorkdirLock
from rectify_moe.writers import MetricsWriter

Array = jax.Array


# ---------------------------------------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------------------------------------
def validate_config(config: Any, num_devices: Optional[int] = None,
                    process_count: Optional[int] = None) -> tuple[int, int]:
  """Checks the whole config against the devices before any data is read or anything compiles.

  Returns:
    The resolved (data, expert) mesh shape.

  Raises:
    ValueError: one line naming the field, the value and the fix.
  """
  cfg = schema.parse(config)
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  cfg.model.validate()
  if cfg.model.num_moe_layers:
    cfg.moe.validate()
  mesh_shape = sharding.resolve_mesh_shape(cfg.mesh.data, cfg.mesh.expert, num_devices)
  used = mesh_shape[0] * mesh_shape[1]
  train = cfg.train
  for name in ("batch_size", "eval_batch_size"):
    if getattr(train, name) % process_count:
      raise fields.ConfigError(f"train.{name}={getattr(train, name)} is not divisible by the {process_count} "
                               "processes.")
    if cfg.model.num_moe_layers:
      sharding.validate_moe_layout(num_experts=cfg.moe.num_experts, expert_axis=mesh_shape[1],
                                   global_batch=getattr(train, name), seq_len=train.seq_len,
                                   group_size=cfg.moe.group_size, num_devices=used)
    elif getattr(train, name) % used:
      raise fields.ConfigError(f"train.{name}={getattr(train, name)} is not divisible by the {used} devices of the "
                               "mesh.")
  tokenizer = data_lib.load_tokenizer(cfg.data.tokenizer)
  if cfg.model.vocab_size < tokenizer.vocab_size:
    raise fields.ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                             f"{tokenizer.vocab_size} (data.tokenizer={cfg.data.tokenizer!r}); set it to at least "
                             "that.")
  data_lib.validate_data_config(cfg.data)
  return mesh_shape


# ---------------------------------------------------------------------------------------------------------
# State.
# ---------------------------------------------------------------------------------------------------------
def make_optimizer(train: schema.TrainConfig, moe_cfg: Optional[schema.MoEConfig] = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup + cosine decay to end_lr_factor * lr, global-norm clipping, and the router's own
  transformations after it (`moe.optimizer_transforms`, e.g. StableMoE's freeze; `moe_cfg` None = a dense model).
  """
  train = fields.from_mapping(schema.TrainConfig, train, "train")
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.learning_rate, warmup_steps=min(train.warmup_steps, train.steps),
      decay_steps=max(train.steps, train.warmup_steps + 1), end_value=train.learning_rate * train.end_lr_factor)
  tx = optax.chain(optax.clip_by_global_norm(train.grad_clip),
                   optax.adamw(schedule, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay))
  extra = moe_lib.optimizer_transforms(moe_cfg) if moe_cfg is not None else []
  if extra:
    tx = optax.chain(tx, *extra)
  return tx, schedule


def _moe_or_none(cfg: schema.RunConfig) -> Optional[schema.MoEConfig]:
  return cfg.moe if cfg.model.num_moe_layers else None


def create_train_state(config: Any, mesh: jax.sharding.Mesh):
  """Builds model and optimizer on the mesh.

  Returns:
    (graphdef, state, state_shardings): `nnx.split((model, optimizer))` and the NamedSharding of every leaf.
  """
  cfg = schema.parse(config)
  moe_cfg = _moe_or_none(cfg)
  tx, _ = make_optimizer(cfg.train, moe_cfg)
  prepared = None
  if moe_cfg is not None:
    prepared = moe_lib.prepare_router(moe_cfg, vocab_size=cfg.model.vocab_size,
                                      token_counts=lambda: train_token_counts(cfg, cfg.model.vocab_size))
  with jax.set_mesh(mesh):
    model = model_lib.TransformerLM(cfg.model, moe_cfg, rngs=nnx.Rngs(cfg.seed), router_prepared=prepared)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    state_shardings = jax.tree.map(lambda x: _leaf_sharding(x, mesh), state)
    state = jax.device_put(state, state_shardings)
  return graphdef, state, state_shardings


def train_token_counts(config: Any, vocab_size: int, max_tokens: int = 20_000_000) -> np.ndarray:
  """int64[V] token frequencies of the training split (its first max_tokens tokens), for data-prepared routers."""
  cfg = schema.parse(config)
  windows = data_lib.make_packed_windows(cfg.data, cfg.data.train_split, seq_len=cfg.train.seq_len)
  stream = windows.stream_slice(0, min(windows.num_tokens, max_tokens))
  return np.bincount(stream, minlength=vocab_size)[:vocab_size].astype(np.int64)


def _leaf_sharding(x: Any, mesh: jax.sharding.Mesh) -> NamedSharding:
  spec = x.sharding.spec if isinstance(getattr(x, "sharding", None), NamedSharding) else P()
  return NamedSharding(mesh, spec)


def count_params(state) -> tuple[int, int]:
  """(total parameters, expert parameters) of the model half of a `(model, optimizer)` state."""
  total = expert = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(state[0]):
    size = int(np.prod(leaf.shape))
    total += size
    names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    if leaf.ndim == 3 and names & {"w_gate", "w_up", "w_down"}:
      expert += size
  return total, expert


# ---------------------------------------------------------------------------------------------------------
# The train step.
# ---------------------------------------------------------------------------------------------------------
def summed_losses(layer_metrics: list[dict[str, Any]]) -> dict[str, Array]:
  """{loss name: sum over the MoE layers} of the blocks' losses (empty for a dense model)."""
  if not layer_metrics:
    return {}
  return {k: jnp.sum(jnp.stack([m["losses"][k] for m in layer_metrics])) for k in layer_metrics[0]["losses"]}


def loss_fn(model, batch, aux_weight: float, z_weight: float, step=None, rng=None):
  """CE + aux_weight * summed load-balance losses + z_weight * summed z-losses + the routers' other losses (each
  already weighted by its router, e.g. StableMoE's distillation)."""
  sums = lm_loss.lm_sums(model, batch, train=True, step=step, rng=rng)
  tokens = jnp.maximum(sums["tokens"], 1.0)
  ce = sums["ce_sum"] / tokens
  losses = summed_losses(sums["layers"])
  zero = jnp.zeros(())
  loss = ce + aux_weight * losses.get("aux_loss", zero) + z_weight * losses.get("z_loss", zero)
  for name, value in losses.items():
    if name not in ("aux_loss", "z_loss"):
      loss = loss + value
  aux = dict(ce=ce, aux_loss=losses.get("aux_loss", zero), z_loss=losses.get("z_loss", zero),
             accuracy=sums["correct"] / tokens, layers=sums["layers"])
  aux.update({k: v for k, v in losses.items() if k not in aux})
  return loss, aux


def step_rng(seed: int, step: Array) -> Array:
  """The replicated PRNG key of a training step (a function of seed and step: resumes exactly)."""
  return jax.random.fold_in(jax.random.key(seed), step)


def train_step(graphdef, state, batch, *, aux_weight: float, z_weight: float, schedule, seed: int = 0):
  """One optimizer step, then the routers' state updates. Pure: (state, batch) -> (new state, metrics)."""
  model, optimizer = nnx.merge(graphdef, state)
  step = optimizer.step[...]
  grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
  (loss, aux), grads = grad_fn(model, batch, aux_weight, z_weight, step, step_rng(seed, step))
  optimizer.update(model, grads)
  layers = aux.pop("layers")
  model.after_step(layers)
  out = dict(loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=schedule(step), **aux)
  if layers:
    counts = {k: jnp.stack([m["counts"][k] for m in layers]) for k in layers[0]["counts"]}
    layer_rates = metrics.rates(counts)
    out.update({k: jnp.mean(layer_rates[k]) for k in metrics.TRAIN_RATE_KEYS})
    out["expert_demand"] = counts["expert_demand"]  # [num_moe_layers, E]
    out["expert_load"] = counts["expert_load"]
  return nnx.state((model, optimizer)), out


def jit_train_step(cfg: schema.RunConfig, graphdef, state_shardings, mesh, schedule):
  """jax.jit'd train step with explicit in/out shardings; the train state is donated."""
  return jax.jit(
      functools.partial(train_step, graphdef, aux_weight=cfg.train.aux_loss_weight,
                        z_weight=cfg.train.z_loss_weight, schedule=schedule, seed=cfg.seed),
      in_shardings=(state_shardings, batch_shardings(mesh)), out_shardings=(state_shardings, NamedSharding(mesh, P())),
      donate_argnums=0)


# ---------------------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------------------
class _StopRequest:
  """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits cleanly after the current step."""

  def __init__(self):
    self.signal: Optional[int] = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


class NonFiniteLossError(FloatingPointError):
  pass


def _reject_after_divergence(checkpointer: checkpoints.Checkpointer,
                             diverged_at: int) -> tuple[list[int], Optional[int]]:
  """Moves aside the checkpoints not known to precede the divergence first seen at step `diverged_at` (the loss of
  step s is computed from checkpoint s-1, so checkpoints >= diverged_at - 1 are out); returns (moved, kept)."""
  bad = [s for s in checkpointer.all_steps() if s >= diverged_at - 1]
  if bad:
    integrity.reject_steps(checkpointer, bad)
  good = checkpointer.all_steps()
  return bad, (good[-1] if good else None)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the latest checkpoint in workdir if any), evaluates periodically, saves.

  Returns:
    A summary: final step, last train metrics, last eval metrics, stop reason.
  """
  cfg, unused = schema.resolve(config)
  if unused:
    log.warning(f"moe.router={cfg.moe.router!r} routes greedily to one expert; running without "
                f"{', '.join(unused)}.")
  caveat = getattr(routers.get(cfg.moe.router), "training_caveat", None) if cfg.model.num_moe_layers else None
  if caveat:
    log.warning(caveat)
  distributed.maybe_initialize(cfg)
  mesh_shape = validate_config(cfg)
  paths = Workdir(workdir)
  if checkpoints.exists(paths):  # a resume: the architecture cannot change
    saved.check_unchanged(cfg, paths.config_json)
  # Upcycling starts a new run only; a workdir with checkpoints resumes from them.
  source = upcycle.check_source(cfg) if cfg.init_from and not checkpoints.exists(paths) else None
  os.makedirs(paths.root, exist_ok=True)
  lock = WorkdirLock(paths.root).acquire() if jax.process_index() == 0 else None
  try:
    return _train(cfg, paths, mesh_shape, source)
  finally:
    if lock is not None:
      lock.release()


def _train(cfg: schema.RunConfig, paths: Workdir, mesh_shape: tuple[int, int], source: Any) -> dict[str, Any]:
  """The body of `train_and_evaluate`, with the workdir locked."""
  train_cfg = cfg.train
  moe_cfg = _moe_or_none(cfg)
  mesh = sharding.make_mesh(*mesh_shape)
  log.info(f"Mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} device(s), "
           f"{jax.process_count()} process(es).")
  graphdef, state, state_shardings = create_train_state(cfg, mesh)
  _, schedule = make_optimizer(train_cfg, moe_cfg)
  train_fn = jit_train_step(cfg, graphdef, state_shardings, mesh, schedule)
  model_graphdef = nnx.graphdef(nnx.merge(graphdef, state)[0])
  evaluator = Evaluator(model_graphdef, state_shardings[0], mesh)
  total, expert = count_params(state)
  router = moe_lib.describe(moe_cfg) if moe_cfg is not None else "none (dense)"
  log.info(f"Parameters: {total:,} total, {expert:,} in experts. Router: {router}"
           + (f", priority={moe_cfg.priority}, capacity_factor={moe_cfg.capacity_factor}." if moe_cfg else "."))

  process_index, process_count = jax.process_index(), jax.process_count()
  train_iter = data_lib.make_train_iterator(cfg.data, seq_len=train_cfg.seq_len,
                                            global_batch_size=train_cfg.batch_size, seed=cfg.seed,
                                            process_index=process_index, process_count=process_count)
  eval_batches = data_lib.make_eval_batches(cfg.data, seq_len=train_cfg.seq_len,
                                            batch_size=train_cfg.eval_batch_size // process_count,
                                            max_batches=train_cfg.eval_batches, process_index=process_index,
                                            process_count=process_count)
  if process_index == 0:  # the config is written once the data and the model are set up
    saved.write(cfg, mesh_shape, paths.config_json)

  checkpointer = checkpoints.Checkpointer(paths, keep=train_cfg.keep_checkpoints)
  latest, state, data_state = integrity.restore_latest_good(checkpointer, state, state_shardings)
  start_step = latest or 0
  if latest is not None:
    if data_state.get("iterator") is not None:
      train_iter.set_state(data_state["iterator"])
    log.info(f"Resumed from step {start_step} ({checkpointer.directory}).")
  elif source is not None:
    state = upcycle.initialize(state, cfg, source, mesh)
    checkpointer.save(0, state, {"iterator": train_iter.get_state(), "step": 0},  # the upcycled model, evaluable
                      integrity=integrity.checksums(state))
  if start_step >= train_cfg.steps:
    log.info(f"Nothing to do: checkpoint step {start_step} >= train.steps={train_cfg.steps}.")

  writer = MetricsWriter(paths, write_loads=train_cfg.write_loads)
  tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
  pending: list[tuple[int, dict[str, Array]]] = []
  last_good_step, last_train, last_eval, reason = start_step, {}, {}, "completed"
  window_start, window_steps = time.time(), 0

  def drain() -> None:
    """Fetches pending step metrics, checks them, writes them. Raises NonFiniteLossError on NaN/inf."""
    nonlocal last_train, last_good_step
    for step, step_metrics in jax.device_get(pending):
      if not np.isfinite(step_metrics["loss"]):
        checkpointer.wait()
        moved, kept = _reject_after_divergence(checkpointer, step)
        where = (f"the rerun resumes from step {kept}, the newest checkpoint whose next step was finite"
                 if kept is not None else "no checkpoint precedes it, the rerun starts over")
        raise NonFiniteLossError(
            f"Loss became {step_metrics['loss']} at step {step}"
            + (f" (checkpoints {', '.join(map(str, moved))} moved to {integrity.REJECTED}/)" if moved else "")
            + f"; {where}. Lower train.learning_rate (now {train_cfg.learning_rate}) or raise train.warmup_steps, "
            "then rerun with the same --workdir.")
      if "expert_demand" in step_metrics:
        writer.loads_trace(step, step_metrics.pop("expert_demand"), step_metrics.pop("expert_load"))
      last_train = {k: float(v) for k, v in step_metrics.items()}
      last_good_step = step
    pending.clear()

  saved_steps = set(checkpointer.all_steps())

  def save(step: int) -> None:
    if step in saved_steps:  # e.g. a stop signal on a step that was just checkpointed
      return
    checkpointer.save(step, state, {"iterator": train_iter.get_state(), "step": step},
                      integrity=integrity.checksums(state))
    saved_steps.add(step)

  step = start_step
  try:
    with jax.set_mesh(mesh), _StopRequest() as stop:
      stop_at = train_cfg.stop_at_step or train_cfg.steps
      while step < min(train_cfg.steps, stop_at):
        batch = global_batch(next(train_iter), mesh)
        state, step_metrics = train_fn(state, batch)
        step += 1
        window_steps += 1
        pending.append((step, step_metrics))
        stopping = stop.signal is not None if process_count == 1 else distributed.any_process(stop.signal is not None)
        if step % train_cfg.log_every == 0 or step in (train_cfg.steps, stop_at) or stopping:
          drain()
          elapsed = time.time() - window_start
          rate = tokens_per_step * window_steps / max(elapsed, 1e-9)
          writer.scalars(step, "train", {**last_train, "tokens_per_second": rate})
          log.info(progress_line(step, train_cfg.steps, last_train, rate,
                                 gating_dropout=moe_cfg is not None and moe_cfg.gating_dropout > 0))
          window_start, window_steps = time.time(), 0
        if train_cfg.eval_every and (step % train_cfg.eval_every == 0 or step == train_cfg.steps):
          drain()
          last_eval = evaluator(state[0], eval_batches, moe_layer_indices=cfg.model.moe_layer_indices)
          writer.scalars(step, "eval", last_eval)
          log.info(f"[eval] step {step}: loss {last_eval['loss']:.4f}  ppl {last_eval['perplexity']:.2f}  "
                   f"accuracy {last_eval['accuracy']:.4f}  ({int(last_eval['tokens'])} tokens)")
        if step % train_cfg.checkpoint_every == 0 or step in (train_cfg.steps, stop_at):
          drain()
          save(step)
        writer.flush()
        if stopping:
          drain()
          save(step)
          name = signal.Signals(stop.signal).name if stop.signal is not None else "a stop signal (another process)"
          reason = f"stopped by {name}"
          log.info(f"Received {name}: saved checkpoint at step {step}; rerun to resume.")
          if process_count > 1:
            print(f"Process {process_index}: stopped with the others at step {step}.", flush=True)
          break
  finally:
    writer.close()
    checkpointer.close()
  return dict(step=step, train=last_train, eval=last_eval, reason=reason, last_good_step=last_good_step)


def progress_line(step: int, total: int, values: dict[str, float], tokens_per_second: float,
                  gating_dropout: bool = False) -> str:
  parts = [f"step {step}/{total}", f"loss {values.get('loss', float('nan')):.4f}",
           f"ce {values.get('ce', float('nan')):.4f}", f"lr {values.get('learning_rate', 0.0):.2e}",
           f"{tokens_per_second:,.0f} tok/s"]
  for key, label in (("drop_rate", "drop"), ("padding_rate", "pad"), ("fill_in_rate", "fill"), ("ir_rate", "ir"),
                     ("gating_dropped", "gd")):
    if key in values and (key != "gating_dropped" or gating_dropout):
      parts.append(f"{label} {values[key]:.3f}")
  return "  ".join(parts)


def run_main(config: ml_collections.ConfigDict, workdir: str) -> int:
  """train.py's body: clear one-line errors for bad configs and NaN losses; exit codes for scripts."""
  checkpoints.drop_closed_loop_errors()
  try:
    code = 0
    summary = train_and_evaluate(config, workdir)
  except (ValueError, FileNotFoundError, WorkdirBusyError, integrity.CorruptCheckpointError,
          checkpoints.CheckpointError) as e:
    log.error(log.one_line(e, 2000))
    code = 2
  except NonFiniteLossError as e:
    log.error(str(e))
    code = 3
  except KeyboardInterrupt:
    log.error("Interrupted by a second Ctrl-C: stopped without saving; rerun to resume from the last checkpoint.")
    code = 130
  except Exception as e:  # noqa: BLE001 - in a multi-process job, end the other processes too
    if jax.process_count() > 1:
      log.error(f"Process {jax.process_index()} failed: {type(e).__name__}: {log.one_line(e)}")
      import traceback
      traceback.print_exc()
      distributed.fail_job(f"{type(e).__name__}: {log.one_line(e, 200)}")
    raise
  if code:
    if jax.process_count() > 1:
      distributed.fail_job(log.one_line(f"exit code {code}"), code)
    return code
  distributed.finished()
  log.info(f"Done: {summary['reason']} at step {summary['step']}. Outputs in {Workdir(workdir).root}.")
  return 0
