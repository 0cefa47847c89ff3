"""One logging path for the library: progress and results to stdout, warnings and errors to stderr.

Only process 0 of a multi-process run writes progress (the other processes compute the same global numbers); errors
are written by every process. The streams are looked up when a line is written, so pytest's capture and
redirections see them. `quiet()` silences progress (e.g. for library use in notebooks).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

_state = {"quiet": False}


def _is_main_process() -> bool:
  if "jax" not in sys.modules:  # numpy-only tools never start a JAX backend just to log
    return True
  import jax
  return jax.process_index() == 0


def info(message: str) -> None:
  """A progress or result line (process 0 only)."""
  if not _state["quiet"] and _is_main_process():
    print(message, file=sys.stdout, flush=True)


def warning(message: str) -> None:
  """'WARNING: message' on stderr (process 0 only)."""
  if _is_main_process():
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def error(message: str) -> None:
  """'error: message' on stderr, from every process (each may fail on its own)."""
  print(f"error: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
  """Silences `info` inside the block when enabled."""
  previous = _state["quiet"]
  _state["quiet"] = enabled or previous
  try:
    yield
  finally:
    _state["quiet"] = previous


def one_line(error_or_text: BaseException | str, limit: int = 300) -> str:
  """An exception's message on one line, cut at `limit` characters."""
  text = " ".join(str(error_or_text).split())
  return text if len(text) <= limit else text[:limit] + "..."
