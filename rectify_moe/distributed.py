"""Multi-process (multi-host) runs: start-up, agreement between processes, and failing fast.

- `maybe_initialize(config)`: calls `jax.distributed.initialize()` with the coordinator, the process count and this
  process's id from `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` (or `train.num_processes`,
  `train.process_id`), or lets JAX detect SLURM / Open MPI / a TPU slice. Then `start_failure_watch()`.
- `any_process(flag)`: True on every process when the flag is True on any (the agreed stop on SIGTERM / SIGINT).
- `barrier(name)`: all processes wait for each other.
- `fail_job(message)`: ends this process at once and tells the others (their failure watch ends them within about
  a second), instead of leaving them blocked in a collective until JAX's timeouts (minutes).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Any, Optional

import jax
import numpy as np

from rectify_moe import log
from rectify_moe.config import schema
from rectify_moe.config.fields import ConfigError

FAILED_KEY = "rectify_moe/failed"
HEARTBEAT_TIMEOUT_S = 10   # JAX's own detection of a vanished process (default 100 s)
SHUTDOWN_TIMEOUT_S = 30    # how long a finished process waits for the others at exit (default 300 s)
_state = {"watching": False, "done": False, "thread": None}
POLL_MS = 1_000


def _int_env(name: str) -> Optional[int]:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"{name}={value!r} is not an integer; set it to a number (or unset it).") from None


def cluster_detected() -> bool:
  env = os.environ
  return int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 or \
      "," in env.get("TPU_WORKER_HOSTNAMES", "")


def settings(config: Any) -> Optional[dict[str, Any]]:
  """The arguments of `jax.distributed.initialize`, or None for a single-process run.

  Raises:
    ConfigError: the coordinator is set without the process count and id (and no cluster is detected), or they are
      out of range.
  """
  train = schema.parse(config).train
  coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS", "").strip() or None
  count = _int_env("JAX_NUM_PROCESSES") or (train.num_processes or None)
  index = _int_env("JAX_PROCESS_ID")
  if index is None and train.process_id >= 0:
    index = train.process_id
  wanted = train.distributed == "on" or (train.distributed == "auto" and (
      coordinator is not None or cluster_detected() or (count or 1) > 1))
  if not wanted:
    return None
  if (count is None) != (index is None) or (coordinator is not None and count is None and not cluster_detected()):
    raise ConfigError("A multi-process run needs the coordinator, the process count and this process's id: set "
                      "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or "
                      "--config.train.num_processes / --config.train.process_id), or start it with "
                      "python -m rectify_moe.launch.")
  if count is not None and not 0 <= index < count:
    raise ConfigError(f"JAX_PROCESS_ID={index} must be in [0, JAX_NUM_PROCESSES={count}) (or train.process_id / "
                      "train.num_processes).")
  if count is not None and coordinator is None:
    raise ConfigError(f"{count} processes are asked for (JAX_NUM_PROCESSES or train.num_processes) but "
                      "JAX_COORDINATOR_ADDRESS is not set; set it to process 0's host:port (e.g. 127.0.0.1:12345).")
  return dict(coordinator_address=coordinator, num_processes=count, process_id=index)


def maybe_initialize(config: Any) -> None:
  """Starts JAX's multi-controller runtime when asked ("on") or when a multi-process launch is detected ("auto")."""
  args = settings(config)
  if args is None or _state["watching"]:
    return
  if not jax.distributed.is_initialized():
    jax.distributed.initialize(**{k: v for k, v in args.items() if v is not None},
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
                               shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
  start_failure_watch()


def _client():
  from jax._src import distributed as jax_distributed  # the coordination-service client (no public accessor)
  return getattr(jax_distributed.global_state, "client", None)


def start_failure_watch() -> None:
  """A daemon thread that ends this process when another one reports a failure or the coordinator vanishes."""
  client = _client()
  if client is None or jax.process_count() == 1 or _state["watching"]:
    return
  _state["watching"] = True

  def watch():
    while not _state["done"]:
      try:
        message = client.blocking_key_value_get(FAILED_KEY, POLL_MS)
      except Exception as e:  # noqa: BLE001 - a timeout, or the coordinator is gone
        if _state["done"]:
          return
        if "DEADLINE" in str(e).upper() or "TIMEOUT" in str(e).upper() or "timed out" in str(e):
          continue
        message = f"lost the coordinator ({log.one_line(e, 160)})"
      if _state["done"]:
        return
      log.error(f"Process {jax.process_index()}: ending the job: {message}")
      sys.stdout.flush(), sys.stderr.flush()
      os._exit(1)

  thread = threading.Thread(target=watch, name="rectify_moe-failure-watch", daemon=True)
  _state["thread"] = thread
  thread.start()
  atexit.register(finished)  # runs before JAX's shutdown (registered earlier) and before daemon threads are killed


def finished() -> None:
  """This process is done (normally): the failure watch stops (a daemon thread killed inside the coordination
  client's C++ call at interpreter exit would abort the process)."""
  _state["done"] = True
  thread = _state["thread"]
  if thread is not None and thread is not threading.current_thread():
    thread.join(timeout=2 * POLL_MS / 1000 + 1)


def fail_job(message: str, code: int = 1) -> None:
  """Tells every other process that this one failed (their watch ends them), then exits at once with `code`."""
  _state["done"] = True
  client = _client()
  if client is not None and jax.process_count() > 1:
    try:
      client.key_value_set(FAILED_KEY, f"process {jax.process_index()} failed: {message}")
    except Exception:  # noqa: BLE001 - another process reported first
      pass
  sys.stdout.flush(), sys.stderr.flush()
  os._exit(code)


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on at least one (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))))


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
