"""Input files of local corpora: the stdlib file list, ``data.text_files`` patterns, the held-out
split by stable hash, reading UTF-8 text and cutting it at line boundaries (stdlib and numpy only)."""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections.abc import Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------
# Listing files.
# ----------------------------------------------------------------------------------------------

_EXCLUDED_DIR_NAMES = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                                 "__pycache__"})


def _is_excluded_dir(name: str) -> bool:
  """True for folders left out of the stdlib corpus: test folders, site-packages, caches."""
  return name in _EXCLUDED_DIR_NAMES or name.endswith("_test") or name.endswith("_tests")


def stdlib_dir() -> str:
  """Returns the standard library folder of the running Python."""
  return sysconfig.get_paths()["stdlib"]


def list_stdlib_files(root: str | None = None, *, max_files: int = 0) -> list[str]:
  """Lists the standard library ``.py`` files that form the default corpus.

  Args:
    root: the folder to scan; default :func:`stdlib_dir`.
    max_files: keep only the first ``max_files`` paths (0 = all).

  Returns:
    Sorted POSIX-style paths relative to ``root``, leaving out every path with a folder named
    test, tests, idle_test, ``*_test``, ``*_tests``, site-packages, dist-packages or __pycache__.
  """
  root = os.path.abspath(root or stdlib_dir())
  paths = []
  for folder, subfolders, files in os.walk(root):
    subfolders[:] = [name for name in subfolders if not _is_excluded_dir(name)]
    relative_folder = os.path.relpath(folder, root)
    for name in files:
      if name.endswith(".py"):
        relative = name if relative_folder == "." else os.path.join(relative_folder, name)
        paths.append(relative.replace(os.sep, "/"))
  paths.sort()
  return paths[:max_files] if max_files > 0 else paths


def _split_patterns(spec: str) -> list[str]:
  """Splits a comma-separated list of paths/globs, dropping blanks."""
  return [pattern.strip() for pattern in str(spec).split(",") if pattern.strip()]


def _expand_pattern(pattern: str) -> list[str]:
  """Returns the regular files one pattern names: a file, a glob, or every non-hidden file of a folder."""
  expanded = os.path.expanduser(pattern)
  matches = glob.glob(expanded, recursive=True) if glob.has_magic(expanded) else [expanded]
  files = []
  for match in matches:
    if os.path.isfile(match):
      files.append(match)
    elif os.path.isdir(match):
      for folder, subfolders, names in os.walk(match):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        files.extend(os.path.join(folder, name) for name in names if not name.startswith("."))
  return files


def expand_text_files(spec: str) -> list[str]:
  """Expands ``data.text_files`` into files.

  Args:
    spec: comma-separated paths, globs (``**`` recursive) or folders; ``~`` is expanded.

  Returns:
    Sorted, de-duplicated absolute paths of regular files.

  Raises:
    ValueError: the spec is empty, or a pattern matches no file (the message names them).
  """
  patterns = _split_patterns(spec)
  if not patterns:
    raise ValueError(
        "data.source='text_files' but data.text_files is empty; set it to comma-separated files "
        "or globs, e.g. --config.data.text_files='~/corpus/*.txt'.")
  files, unmatched = set(), []
  for pattern in patterns:
    matched = _expand_pattern(pattern)
    if not matched:
      unmatched.append(pattern)
    files.update(os.path.abspath(path) for path in matched)
  if unmatched:
    raise ValueError(
        f"data.text_files: no files matched {', '.join(repr(p) for p in unmatched)} "
        f"(working directory {os.getcwd()}); fix the paths or globs.")
  return sorted(files)


def relative_keys(files: Sequence[str]) -> list[str]:
  """Keys for text files: POSIX paths relative to the common parent folder of all files."""
  parent = os.path.commonpath([os.path.dirname(path) for path in files])
  return [os.path.relpath(path, parent).replace(os.sep, "/") for path in files]


# ----------------------------------------------------------------------------------------------
# Held-out split by stable hash.
# ----------------------------------------------------------------------------------------------


def heldout_score(key: str) -> float:
  """A stable uniform score in [0, 1) from the SHA-1 of ``key`` (independent of Python's hash seed)."""
  digest = hashlib.sha1(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(keys: Sequence[str], heldout_fraction: float) -> list[str]:
  """Assigns each key to "validation" (score < heldout_fraction) or "train".

  When there are at least two keys and ``heldout_fraction > 0`` both splits are made non-empty:
  an empty validation split takes the key with the lowest score, an empty train split the highest.

  Args:
    keys: document keys (relative path, or path + chunk index).
    heldout_fraction: target share of validation documents, in [0, 1).

  Returns:
    One split name per key, in order.
  """
  scores = np.array([heldout_score(key) for key in keys], dtype=np.float64)
  is_heldout = scores < heldout_fraction
  if len(keys) >= 2 and heldout_fraction > 0:
    if not is_heldout.any():
      is_heldout[int(np.argmin(scores))] = True
    if is_heldout.all():
      is_heldout[int(np.argmax(scores))] = False
  return ["validation" if heldout else "train" for heldout in is_heldout]


# ----------------------------------------------------------------------------------------------
# Reading and chunking text.
# ----------------------------------------------------------------------------------------------


def read_text_bytes(path: str) -> bytes:
  """Reads a file that must be UTF-8 text.

  Raises:
    OSError: the file cannot be read.
    UnicodeDecodeError / ValueError: it holds NUL bytes or is not valid UTF-8.
  """
  with open(path, "rb") as handle:
    data = handle.read()
  if b"\x00" in data:
    raise ValueError("contains NUL bytes (binary file)")
  data.decode("utf-8")
  return data


def chunk_at_line_boundaries(data: bytes, chunk_bytes: int) -> list[tuple[int, int]]:
  """Splits ``data`` into consecutive byte ranges ending at newlines.

  Each range ends just after the last ``\\n`` that keeps it within ``chunk_bytes``; a line longer
  than ``chunk_bytes`` forms a range of its own (ending at its newline or at the end of data).

  Args:
    data: the file contents.
    chunk_bytes: the largest range, when lines allow.

  Returns:
    ``[(start, end), ...]`` covering ``data`` exactly, in order, with no empty range.
  """
  ranges, start = [], 0
  while start < len(data):
    limit = start + chunk_bytes
    if limit >= len(data):
      end = len(data)
    else:
      newline = data.rfind(b"\n", start, limit)
      if newline < 0:
        newline = data.find(b"\n", limit)
      end = len(data) if newline < 0 else newline + 1
    ranges.append((start, end))
    start = end
  return ranges
