"""Quiet TFDS calls: the local corpus builder and the registered datasets both open TFDS builders."""

from __future__ import annotations

import contextlib
import io
import logging as std_logging
from collections.abc import Iterator

import tensorflow_datasets as tfds


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
  """Silences TFDS progress bars, its stdout lines and absl warnings about custom configs."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top

  was_active = getattr(tqdm_utils, "_active", True)
  absl_logger = std_logging.getLogger("absl")
  old_level = absl_logger.level
  tfds.display_progress_bar(False)
  absl_logger.setLevel(std_logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    absl_logger.setLevel(old_level)
    tfds.display_progress_bar(was_active)
