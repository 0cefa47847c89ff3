"""Multi-process (multi-host) start-up: when and how `jax.distributed.initialize()` is called."""

from __future__ import annotations

import os
from typing import Any

import jax

from rectify_moe.config import schema


def maybe_initialize(config: Any) -> None:
  """Starts JAX's multi-controller runtime when asked ("on") or when a cluster launcher is detected ("auto").

  "auto" initialises when JAX_COORDINATOR_ADDRESS is set, or under SLURM / Open MPI with more than one
  task, or on a multi-host TPU slice (TPU_WORKER_HOSTNAMES lists several hosts). jax.distributed picks the
  coordinator, process count and index from those environments.
  """
  mode = schema.parse(config).train.distributed
  env = os.environ
  detected = bool(env.get("JAX_COORDINATOR_ADDRESS")) or int(env.get("SLURM_NTASKS", "1")) > 1 or int(
      env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", "")
  if mode == "on" or (mode == "auto" and detected):
    jax.distributed.initialize()
