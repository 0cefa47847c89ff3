"""The ``data`` config section as the data package reads it: one coercion to the typed
:class:`rectify_moe.config.schema.DataConfig`, the data-specific checks, and the prepared-data folder.

The defaults, types, choices and ranges of the fields live only in ``schema.DataConfig`` (checked by
``fields.from_mapping``); this module adds what needs the file system or depends on ``data.source``.
"""

from __future__ import annotations

import os
import typing
from typing import Any

from rectify_moe.config import fields
from rectify_moe.config import schema
from rectify_moe.data import files

VALID_SOURCES = typing.get_args(schema.DataSource)
LOCAL_SPLITS = ("train", "validation")
# Where local corpora are prepared when ``data.data_dir`` is "".
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "rectify_moe", "tfds")


def as_data_config(data_cfg: Any) -> schema.DataConfig:
  """The typed ``data`` section.

  Args:
    data_cfg: a ``schema.DataConfig`` (returned as is), an ml_collections ConfigDict or a dict;
      missing keys take the defaults of ``schema.DataConfig``.

  Raises:
    ConfigError (a ValueError): an unknown key, a value of the wrong type, outside its choices
      (``source``) or outside its range; the one-line message names the field and the fix.
  """
  return fields.from_mapping(schema.DataConfig, data_cfg, "data")


def validate_data_config(data_cfg: Any) -> None:
  """Checks everything about ``data_cfg`` that can be checked without reading data or the network.

  Args:
    data_cfg: the ``data`` section (see :func:`as_data_config`).

  Raises:
    ValueError: one line saying what is wrong and how to fix it (a ``ConfigError`` for the
      checks of the section itself; the text-file patterns raise a plain ValueError).
  """
  cfg = as_data_config(data_cfg)
  if cfg.source in ("stdlib", "text_files"):
    for field in ("train_split", "eval_split"):
      split = getattr(cfg, field)
      if split not in LOCAL_SPLITS:
        raise fields.ConfigError(
            f"data.{field}={split!r} does not exist for data.source={cfg.source!r}; "
            f"use one of {', '.join(LOCAL_SPLITS)}.")
  if cfg.source == "text_files":
    files.expand_text_files(cfg.text_files)  # Raises on empty specs or no matches.
  if cfg.source == "tfds":
    if not cfg.tfds_name.strip():
      raise fields.ConfigError(
          "data.source='tfds' needs data.tfds_name, e.g. --config.data.tfds_name=lm1b "
          "(list names with: python -c 'import tensorflow_datasets as tfds; "
          "print(tfds.list_builders())').")
    if not cfg.tfds_text_key.strip():
      raise fields.ConfigError(
          "data.tfds_text_key is empty; name the feature holding the text, e.g. 'text'.")


def resolve_data_dir(data_cfg: Any) -> str:
  """Returns the absolute folder where local corpora are prepared (``data.data_dir`` or the default)."""
  data_dir = as_data_config(data_cfg).data_dir.strip() or DEFAULT_DATA_DIR
  return os.path.abspath(os.path.expanduser(data_dir))
