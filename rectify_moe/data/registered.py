"""Registered TFDS datasets (``data.source="tfds"``), read with ``tfds.data_source`` (array_record).

Prepared data is read without touching the network. A dataset that is not prepared is downloaded
only after a short connectivity check (:func:`is_online`), so an offline machine fails at once with a
message saying how to prepare the data elsewhere. Tests patch ``registered.is_online``: this module
is where it is looked up.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import threading
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from rectify_moe import log
from rectify_moe.data._tfds import quiet_tfds
from rectify_moe.data.config import as_data_config

CONNECTIVITY_HOST = "storage.googleapis.com"


def is_online(host: str = CONNECTIVITY_HOST, port: int = 443, timeout_s: float = 3.0) -> bool:
  """Whether a TCP connection to ``host:port`` opens within ``timeout_s`` (DNS included).

  The attempt runs in a daemon thread, so a slow name lookup cannot hold the caller longer.
  """
  outcome = []

  def attempt() -> None:
    try:
      with socket.create_connection((host, port), timeout=timeout_s):
        outcome.append(True)
    except OSError:
      outcome.append(False)

  thread = threading.Thread(target=attempt, name="rectify_moe-connectivity-check", daemon=True)
  thread.start()
  thread.join(timeout_s)
  return bool(outcome and outcome[0])


_LIST_NAMES_HINT = ("list names with: python -c 'import tensorflow_datasets as tfds; "
                    "print(tfds.list_builders())' or see https://www.tensorflow.org/datasets/catalog")


def _offline_message(name: str, where: str) -> str:
  return (f"TFDS dataset {name!r} is not prepared in {where} and this machine is offline (no "
          f"connection to {CONNECTIVITY_HOST}:443 within 3 s); prepare it where there is internet "
          f"(tfds build {name.split(':')[0]} --data_dir=DIR --file_format=array_record) and set "
          "data.data_dir=DIR, or use data.source='stdlib' or 'text_files'.")


def _registered_builder(name: str, data_dir: str | None) -> Any:
  """Returns ``tfds.builder(name)`` reading array_record, with clear errors for unknown names."""
  if re.match(r"^[\w.-]+:[A-Za-z_]", name) and not is_online():
    # Namespaced (community) names "namespace:dataset" are resolved over the network;
    # "dataset:1.0.0" is a version, not a namespace.
    raise ValueError(_offline_message(name, data_dir or "the TFDS data dir"))
  try:
    with quiet_tfds():
      return tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError:
    base = name.split(":")[0].split("/")[0]
    close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False), n=3)
    suggestion = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(
        f"unknown TFDS dataset data.tfds_name={name!r}{suggestion}: not registered in "
        f"tensorflow_datasets {tfds.__version__} and not prepared in "
        f"{data_dir or 'the TFDS data dir'}; {_LIST_NAMES_HINT}.") from None


def open_registered_tfds(data_cfg: Any, split: str) -> Sequence[Any]:
  """Opens one split of a registered TFDS dataset as a random-access array_record source.

  Prepared data is used as is. Otherwise the dataset is downloaded and prepared, but only when
  ``data.tfds_download`` is on and :func:`is_online` says the network answers; when offline this
  fails at once instead of letting TFDS retry for minutes.

  Args:
    data_cfg: the ``data`` section with ``tfds_name`` (``DataConfig``, ConfigDict or dict);
      ``data_dir`` "" means TFDS's default folder.
    split: a split name (TFDS slicing such as "train[:10%]" works too).

  Returns:
    The TFDS data source (``len()`` and ``[i]`` give decoded example dicts).

  Raises:
    ValueError: unknown name, offline and not prepared, missing split, or not array_record.
  """
  cfg = as_data_config(data_cfg)
  name = cfg.tfds_name.strip()
  if not name:
    raise ValueError("data.source='tfds' needs data.tfds_name, e.g. lm1b; " + _LIST_NAMES_HINT + ".")
  configured_dir = cfg.data_dir.strip()
  data_dir = os.path.abspath(os.path.expanduser(configured_dir)) if configured_dir else None
  builder = _registered_builder(name, data_dir)
  with quiet_tfds():
    prepared = builder.is_prepared()
  if not prepared:
    if not cfg.tfds_download:
      raise ValueError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and "
                       "data.tfds_download=False; prepare it or enable downloads.")
    if not is_online():
      raise ValueError(_offline_message(name, os.path.dirname(os.path.dirname(builder.data_dir))))
    log.info(f"Downloading and preparing TFDS dataset {name} (one-time) in {builder.data_dir}")
  available = sorted(builder.info.splits.keys()) if prepared else []
  base_split = split.split("[")[0].split("+")[0]
  if prepared and base_split not in available:
    raise ValueError(f"TFDS dataset {name!r} has no split {split!r}; available: "
                     f"{', '.join(available)}; set data.train_split/data.eval_split.")
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=not prepared)
  except (ValueError, NotImplementedError) as error:
    if "array_record" in str(error).lower() or "file format" in str(error).lower():
      raise ValueError(
          f"TFDS dataset {name!r} in {builder.data_dir} is not stored as array_record, which "
          f"random access needs; re-prepare it with --file_format=array_record ({error}).") from None
    raise
