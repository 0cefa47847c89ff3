"""Data pipeline: byte tokenizer, local TFDS corpora, registered TFDS datasets, packed grain batches.

Sources (``data.source``):

* ``"stdlib"`` (offline default): the ``.py`` files of the Python standard library
  (``sysconfig.get_paths()['stdlib']``) outside test folders and ``site-packages``.
* ``"text_files"``: user text files, ``data.text_files`` = comma-separated paths, globs or folders.
* ``"tfds"``: a registered TFDS dataset ``data.tfds_name`` read with ``tfds.data_source`` (array_record).

The first two are written once by :class:`TextCorpusBuilder` (a TFDS ``GeneratorBasedBuilder``,
``file_format="array_record"``) under ``data.data_dir`` (default ``~/.cache/rectify_moe/tfds``). Its
config name carries a fingerprint of the input files (paths, sizes, mtimes) and of the options that
shape the examples, so a stale prepared dataset is never reused. Documents go to ``validation`` when a
stable SHA-1 score of their key is below ``data.heldout_fraction``, else to ``train``.

Packing: every document becomes its UTF-8 bytes (token ``b + 3``) followed by ``EOS``; the documents of
a split are concatenated (in record order) into one stream of ``N`` tokens. Window ``i`` is
``stream[i*T : i*T + T + 1]`` with ``inputs = w[:-1]``, ``targets = w[1:]``; there are
``ceil((N - 1) / T)`` windows, the last one padded with ``PAD`` and ``token_mask=False``. Every stream
position except the first is a target exactly once: a split yields ``N - 1`` mask-True targets.

No TensorFlow is imported; the network is only touched for a registered TFDS dataset that is not
prepared locally, after a short connectivity check.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import difflib
import glob
import hashlib
import io
import json
import logging as std_logging
import os
import re
import socket
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from absl import logging

# ----------------------------------------------------------------------------------------------
# Tokenizer.
# ----------------------------------------------------------------------------------------------

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
NUM_SPECIAL_TOKENS = 3
VOCAB_SIZE = 256 + NUM_SPECIAL_TOKENS


class ByteTokenizer:
  """Byte-level tokenizer: ids 0..2 are PAD, BOS, EOS; byte ``b`` is id ``b + 3``; 259 ids."""

  pad_id = PAD_ID
  bos_id = BOS_ID
  eos_id = EOS_ID
  vocab_size = VOCAB_SIZE

  def encode(self, text: str | bytes, *, add_eos: bool = False) -> np.ndarray:
    """Encodes text as UTF-8 bytes.

    Args:
      text: a string (encoded as UTF-8) or raw bytes.
      add_eos: append ``EOS`` after the bytes.

    Returns:
      int32[len(utf8 bytes) (+1 with add_eos)] token ids in ``[3, 259)`` (plus a final 2).
    """
    return _bytes_to_tokens(_as_bytes(text), add_eos=add_eos)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Decodes ids to text, skipping special and out-of-range ids; invalid UTF-8 becomes U+FFFD.

    Args:
      ids: int[n] token ids (any integer dtype, any 1-D sequence).

    Returns:
      The decoded string.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    byte_ids = ids[(ids >= NUM_SPECIAL_TOKENS) & (ids < VOCAB_SIZE)] - NUM_SPECIAL_TOKENS
    return byte_ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _as_bytes(text: str | bytes | np.ndarray) -> bytes:
  """Returns ``text`` as UTF-8 bytes (accepts str, bytes, or a 0-d numpy bytes/str array)."""
  if isinstance(text, np.ndarray):
    text = text.item()
  if isinstance(text, str):
    return text.encode("utf-8")
  if isinstance(text, (bytes, bytearray, memoryview)):
    return bytes(text)
  raise TypeError(f"expected text as str or bytes, got {type(text).__name__}")


def _bytes_to_tokens(data: bytes, *, add_eos: bool) -> np.ndarray:
  """Returns int32[len(data) + add_eos]: ``byte + 3`` for every byte, then ``EOS`` if asked."""
  tokens = np.empty(len(data) + int(add_eos), dtype=np.int32)
  tokens[: len(data)] = np.frombuffer(data, dtype=np.uint8)
  tokens[: len(data)] += NUM_SPECIAL_TOKENS
  if add_eos:
    tokens[-1] = EOS_ID
  return tokens


# ----------------------------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------------------------

VALID_SOURCES = ("stdlib", "text_files", "tfds")
LOCAL_SPLITS = ("train", "validation")
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "rectify_moe", "tfds")
DEFAULT_CHUNK_BYTES = 64 * 1024

# Bump when the way local corpora are written changes (it is part of the fingerprint).
_CORPUS_FORMAT = 1


def default_data_config() -> ml_collections.ConfigDict:
  """Returns the ``data`` section of a training config with its defaults.

  Fields:
    source: "stdlib" | "text_files" | "tfds".
    text_files: comma-separated files, globs (``**`` allowed) or folders; ``~`` is expanded.
    tfds_name: registered TFDS name, e.g. "lm1b" or "tiny_shakespeare:1.0.0".
    tfds_text_key: feature holding the text in each TFDS example.
    train_split, eval_split: split names (local corpora have "train" and "validation").
    data_dir: where datasets are prepared; "" = ``~/.cache/rectify_moe/tfds`` for local corpora and
      TFDS's own default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``) for ``source="tfds"``.
    heldout_fraction: share of documents (by stable hash) in the "validation" split of local corpora.
    worker_count: grain worker processes for training batches (0 = read in the trainer process).
    stdlib_max_files: use only the first N sorted stdlib files (0 = all); for quick tests.
    chunk_bytes: text files larger than this are split into chunks of at most this size at line
      boundaries (a single longer line stays whole).
    tfds_download: allow downloading a registered TFDS dataset that is not prepared locally.
    read_threads: grain prefetch threads for training batches.
    prefetch_batches: grain prefetch buffer, in batches.
  """
  cfg = ml_collections.ConfigDict()
  cfg.source = "stdlib"
  cfg.text_files = ""
  cfg.tfds_name = ""
  cfg.tfds_text_key = "text"
  cfg.train_split = "train"
  cfg.eval_split = "validation"
  cfg.data_dir = ""
  cfg.heldout_fraction = 0.03
  cfg.worker_count = 0
  cfg.stdlib_max_files = 0
  cfg.chunk_bytes = DEFAULT_CHUNK_BYTES
  cfg.tfds_download = True
  cfg.read_threads = 2
  cfg.prefetch_batches = 4
  return cfg


def _option(data_cfg: Any, key: str) -> Any:
  """Returns ``data_cfg.key``, falling back to :func:`default_data_config` for missing keys."""
  if isinstance(data_cfg, Mapping) or hasattr(data_cfg, "get"):
    value = data_cfg.get(key, None)
    if value is not None:
      return value
  elif hasattr(data_cfg, key):
    return getattr(data_cfg, key)
  return default_data_config()[key]


def validate_data_config(data_cfg: Any) -> None:
  """Checks everything about ``data_cfg`` that can be checked without reading data or the network.

  Args:
    data_cfg: the ``data`` section (a ConfigDict or mapping; missing keys take their defaults).

  Raises:
    ValueError: one line saying what is wrong and how to fix it.
  """
  source = _option(data_cfg, "source")
  if source not in VALID_SOURCES:
    raise ValueError(
        f"data.source={source!r} is not valid; use one of {', '.join(VALID_SOURCES)} "
        "(stdlib = offline default corpus).")
  fraction = float(_option(data_cfg, "heldout_fraction"))
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"data.heldout_fraction={fraction} must be in [0, 1), e.g. 0.03.")
  if int(_option(data_cfg, "worker_count")) < 0:
    raise ValueError("data.worker_count must be >= 0 (0 = no grain worker processes).")
  if int(_option(data_cfg, "stdlib_max_files")) < 0:
    raise ValueError("data.stdlib_max_files must be >= 0 (0 = all standard library files).")
  for field in ("read_threads", "prefetch_batches"):
    if int(_option(data_cfg, field)) < 0:
      raise ValueError(f"data.{field} must be >= 0 (0 = read batches on demand).")
  if int(_option(data_cfg, "chunk_bytes")) < 1:
    raise ValueError("data.chunk_bytes must be >= 1, e.g. 65536.")
  if source in ("stdlib", "text_files"):
    for field in ("train_split", "eval_split"):
      split = _option(data_cfg, field)
      if split not in LOCAL_SPLITS:
        raise ValueError(
            f"data.{field}={split!r} does not exist for data.source={source!r}; "
            f"use one of {', '.join(LOCAL_SPLITS)}.")
  if source == "text_files":
    expand_text_files(_option(data_cfg, "text_files"))  # Raises on empty specs or no matches.
  if source == "tfds":
    if not str(_option(data_cfg, "tfds_name")).strip():
      raise ValueError(
          "data.source='tfds' needs data.tfds_name, e.g. --config.data.tfds_name=lm1b "
          "(list names with: python -c 'import tensorflow_datasets as tfds; "
          "print(tfds.list_builders())').")
    if not str(_option(data_cfg, "tfds_text_key")).strip():
      raise ValueError("data.tfds_text_key is empty; name the feature holding the text, e.g. 'text'.")


def resolve_data_dir(data_cfg: Any) -> str:
  """Returns the absolute folder where local corpora are prepared (``data.data_dir`` or the default)."""
  data_dir = str(_option(data_cfg, "data_dir")).strip() or DEFAULT_DATA_DIR
  return os.path.abspath(os.path.expanduser(data_dir))


# ----------------------------------------------------------------------------------------------
# Input files.
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


def _relative_keys(files: Sequence[str]) -> list[str]:
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
# Documents of a local corpus.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DocumentRef:
  """One example of a local corpus: bytes ``[start, end)`` of ``file``, stored under ``key``."""

  key: str
  file: str
  start: int
  end: int
  split: str


def _read_text_bytes(path: str) -> bytes:
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


def _collect_documents(source: str, files: Sequence[str], keys: Sequence[str], *,
                       heldout_fraction: float, chunk_bytes: int) -> list[DocumentRef]:
  """Reads and checks every file and cuts it into documents with their splits.

  Stdlib files are whole documents; text files longer than ``chunk_bytes`` are cut at line
  boundaries and their chunks keyed ``"{key}#{index}"``. Empty files are skipped; unreadable,
  binary or non-UTF-8 files are skipped with a warning.

  Raises:
    ValueError: no file holds usable text, or (text files) fewer than two documents result.
  """
  pieces, empty, unreadable = [], [], []
  for path, key in zip(files, keys):
    try:
      data = _read_text_bytes(path)
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError.
      unreadable.append(f"{path} ({type(error).__name__}: {error})")
      continue
    if not data:
      empty.append(path)
      continue
    if source == "text_files" and len(data) > chunk_bytes:
      ranges = chunk_at_line_boundaries(data, chunk_bytes)
      pieces.extend((f"{key}#{index}", path, start, end)
                    for index, (start, end) in enumerate(ranges))
    else:
      pieces.append((key, path, 0, len(data)))
  if not pieces:
    problems = []
    if empty:
      problems.append(f"{len(empty)} empty ({', '.join(empty[:3])})")
    if unreadable:
      problems.append(f"{len(unreadable)} unreadable/binary ({'; '.join(unreadable[:3])})")
    raise ValueError(
        f"data.source={source!r}: none of the {len(files)} files holds UTF-8 text: "
        f"{', '.join(problems)}; point data.text_files at non-empty text files.")
  if unreadable:
    logging.warning("Skipped %d unreadable, binary or non-UTF-8 files, e.g. %s",
                    len(unreadable), unreadable[0])
    if source == "text_files":
      print(f"WARNING: skipped {len(unreadable)} unreadable/binary/non-UTF-8 files, "
            f"e.g. {unreadable[0]}", file=sys.stderr)
  if empty and source == "text_files":
    print(f"WARNING: skipped {len(empty)} empty files, e.g. {empty[0]}", file=sys.stderr)
  if source == "text_files" and len(pieces) < 2 and heldout_fraction > 0:
    raise ValueError(
        f"data.text_files gives only {len(pieces)} document ({pieces[0][1]}, {pieces[0][3]} bytes), "
        "too few for a train/validation split; add files or lower data.chunk_bytes "
        f"(now {chunk_bytes}) so the file is cut into several chunks.")
  splits = assign_splits([piece[0] for piece in pieces], heldout_fraction)
  return [DocumentRef(key, path, start, end, split)
          for (key, path, start, end), split in zip(pieces, splits)]


# ----------------------------------------------------------------------------------------------
# The local TFDS builder.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class CorpusConfig(tfds.core.BuilderConfig):
  """Builder config of a local corpus; ``name`` is ``"{source}_{fingerprint}"``.

  Attributes:
    source: "stdlib" or "text_files".
    num_files: how many input files were listed.
  """

  source: str = "stdlib"
  num_files: int = 0


class TextCorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes a local text corpus as array_record with features ``{"text": Text, "path": Text}``.

  Records keep the document order (sorted keys); prepare it with ``documents`` (a list of
  :class:`DocumentRef`); re-opening a prepared config needs none.
  """

  name = "rectify_text_corpus"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Local text corpus (stdlib or user text files)."}

  def __init__(self, *, documents: Sequence[DocumentRef] | None = None, **kwargs: Any):
    self._documents = documents
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Local text corpus for rectify_moe (one example per file or file chunk).",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                             "path": tfds.features.Text()}),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager  # Nothing is downloaded.
    if self._documents is None:
      raise RuntimeError("TextCorpusBuilder needs `documents` to prepare a corpus.")
    by_split = {split: [doc for doc in self._documents if doc.split == split] for split in LOCAL_SPLITS}
    return {split: self._generate_examples(docs) for split, docs in by_split.items() if docs}

  def _generate_examples(self, documents: Sequence[DocumentRef]) -> Iterator[tuple[int, dict]]:
    for index, doc in enumerate(documents):
      with open(doc.file, "rb") as handle:
        handle.seek(doc.start)
        text = handle.read(doc.end - doc.start).decode("utf-8")
      yield index, {"text": text, "path": doc.key}


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
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


def _local_input_files(data_cfg: Any) -> tuple[list[str], list[str]]:
  """Returns (absolute files, keys) of a local corpus, in key order."""
  source = _option(data_cfg, "source")
  if source == "stdlib":
    root = stdlib_dir()
    keys = list_stdlib_files(root, max_files=int(_option(data_cfg, "stdlib_max_files")))
    if not keys:
      raise ValueError(f"no .py files found in the standard library folder {root}; "
                       "use data.source='text_files' instead.")
    return [os.path.join(root, key) for key in keys], keys
  files = expand_text_files(_option(data_cfg, "text_files"))
  keys = _relative_keys(files)
  order = sorted(range(len(files)), key=lambda i: keys[i])
  return [files[i] for i in order], [keys[i] for i in order]


def _corpus_fingerprint(source: str, files: Sequence[str], keys: Sequence[str],
                        options: Mapping[str, Any]) -> str:
  """SHA-1 over the file keys, paths, sizes and mtimes and the options that shape the examples."""
  entries = []
  for path, key in zip(files, keys):
    try:
      stat = os.stat(path)
      entries.append([key, path, stat.st_size, stat.st_mtime_ns])
    except OSError:
      entries.append([key, path, -1, -1])
  payload = json.dumps({"format": _CORPUS_FORMAT, "source": source, "options": dict(options),
                        "files": entries}, sort_keys=True)
  return hashlib.sha1(payload.encode("utf-8")).hexdigest()


def local_corpus_builder(data_cfg: Any) -> TextCorpusBuilder:
  """Opens the local corpus of ``data_cfg`` (stdlib or text files), preparing it once if needed.

  Args:
    data_cfg: the ``data`` section; ``source`` must be "stdlib" or "text_files".

  Returns:
    A prepared builder; read splits with ``builder.as_data_source(split)``.

  Raises:
    ValueError: bad config, no usable files, too few documents.
  """
  validate_data_config(data_cfg)
  source = _option(data_cfg, "source")
  if source not in ("stdlib", "text_files"):
    raise ValueError(f"local_corpus_builder needs data.source 'stdlib' or 'text_files', got {source!r}.")
  files, keys = _local_input_files(data_cfg)
  heldout_fraction = float(_option(data_cfg, "heldout_fraction"))
  chunk_bytes = int(_option(data_cfg, "chunk_bytes"))
  options = {"heldout_fraction": heldout_fraction}
  if source == "text_files":
    options["chunk_bytes"] = chunk_bytes
  fingerprint = _corpus_fingerprint(source, files, keys, options)
  config = CorpusConfig(name=f"{source}_{fingerprint[:12]}", source=source, num_files=len(files),
                        description=f"{source}: {len(files)} files, options {options}")
  data_dir = resolve_data_dir(data_cfg)
  with _quiet_tfds():
    builder = TextCorpusBuilder(data_dir=data_dir, config=config, file_format="array_record")
    prepared = builder.is_prepared()
  if prepared:
    return builder
  documents = _collect_documents(source, files, keys, heldout_fraction=heldout_fraction,
                                 chunk_bytes=chunk_bytes)
  lock_path = os.path.join(data_dir, f"{TextCorpusBuilder.name}.{config.name}.lock")
  with _exclusive_file_lock(lock_path):
    with _quiet_tfds():
      builder = TextCorpusBuilder(data_dir=data_dir, config=config, file_format="array_record",
                                  documents=documents)
      if builder.is_prepared():  # Another process prepared it while we waited for the lock.
        return builder
    print(f"Preparing dataset {TextCorpusBuilder.name}/{config.name} (one-time, {len(files)} "
          f"files, {len(documents)} documents) in {data_dir}", flush=True)
    started = time.perf_counter()
    with _quiet_tfds():
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  logging.info("Prepared %s in %.1f s", builder.data_dir, time.perf_counter() - started)
  return builder


@contextlib.contextmanager
def _exclusive_file_lock(path: str) -> Iterator[None]:
  """Holds an exclusive ``flock`` on ``path`` (no-op where fcntl is missing)."""
  try:
    import fcntl  # pylint: disable=g-import-not-at-top
  except ImportError:
    yield
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# Registered TFDS datasets.
# ----------------------------------------------------------------------------------------------

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
    with _quiet_tfds():
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
    data_cfg: the ``data`` section with ``tfds_name``; ``data_dir`` "" means TFDS's default folder.
    split: a split name (TFDS slicing such as "train[:10%]" works too).

  Returns:
    The TFDS data source (``len()`` and ``[i]`` give decoded example dicts).

  Raises:
    ValueError: unknown name, offline and not prepared, missing split, or not array_record.
  """
  name = str(_option(data_cfg, "tfds_name")).strip()
  if not name:
    raise ValueError("data.source='tfds' needs data.tfds_name, e.g. lm1b; " + _LIST_NAMES_HINT + ".")
  configured_dir = str(_option(data_cfg, "data_dir")).strip()
  data_dir = os.path.abspath(os.path.expanduser(configured_dir)) if configured_dir else None
  builder = _registered_builder(name, data_dir)
  with _quiet_tfds():
    prepared = builder.is_prepared()
  if not prepared:
    if not _option(data_cfg, "tfds_download"):
      raise ValueError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and "
                       "data.tfds_download=False; prepare it or enable downloads.")
    if not is_online():
      raise ValueError(_offline_message(name, os.path.dirname(os.path.dirname(builder.data_dir))))
    print(f"Downloading and preparing TFDS dataset {name} (one-time) in {builder.data_dir}",
          flush=True)
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


# ----------------------------------------------------------------------------------------------
# Documents of a split and their token-length index.
# ----------------------------------------------------------------------------------------------

# (dataset identity, split, text key) -> int64[num_documents] token lengths (bytes + EOS).
_TOKEN_LENGTHS_CACHE: dict[tuple[str, str, str], np.ndarray] = {}


def open_split(data_cfg: Any, split: str) -> tuple[Sequence[Any], str, str]:
  """Opens one split of the configured source.

  Args:
    data_cfg: the ``data`` section.
    split: split name.

  Returns:
    (random-access documents, text key, identity string for caching).

  Raises:
    ValueError: bad config or missing split (the message lists the available ones).
  """
  validate_data_config(data_cfg)
  source = _option(data_cfg, "source")
  if source == "tfds":
    documents = open_registered_tfds(data_cfg, split)
    text_key = str(_option(data_cfg, "tfds_text_key"))
    identity = f"tfds|{_option(data_cfg, 'data_dir')}|{_option(data_cfg, 'tfds_name')}"
    return documents, text_key, identity
  builder = local_corpus_builder(data_cfg)
  available = sorted(builder.info.splits.keys())
  if split not in available:
    raise ValueError(
        f"split {split!r} of data.source={source!r} is empty or missing (available: "
        f"{', '.join(available) or 'none'}); raise data.heldout_fraction or add more documents.")
  return builder.as_data_source(split=split), "text", os.fspath(builder.data_dir)


def _document_bytes(example: Any, text_key: str) -> bytes:
  """Returns the UTF-8 text of one example (a feature dict, str or bytes)."""
  if isinstance(example, Mapping):
    if text_key not in example:
      raise ValueError(f"examples have no feature {text_key!r} (features: "
                       f"{', '.join(sorted(example))}); set data.tfds_text_key.")
    example = example[text_key]
  return _as_bytes(example)


def _read_many(documents: Sequence[Any], indices: Sequence[int]) -> list[Any]:
  """Reads several records, in one call when the source supports ``__getitems__``."""
  if hasattr(documents, "__getitems__"):
    return list(documents.__getitems__(list(indices)))
  return [documents[i] for i in indices]


def document_token_lengths(documents: Sequence[Any], text_key: str = "text", *,
                           cache_key: tuple[str, str, str] | None = None,
                           read_batch: int = 256) -> np.ndarray:
  """Token length of every document: UTF-8 bytes + 1 (EOS).

  Args:
    documents: random-access documents (feature dicts, str or bytes).
    text_key: feature holding the text in dict examples.
    cache_key: when given, the result is kept in memory for this process and reused.
    read_batch: records read per call.

  Returns:
    int64[num_documents].
  """
  if cache_key is not None and cache_key in _TOKEN_LENGTHS_CACHE:
    return _TOKEN_LENGTHS_CACHE[cache_key]
  lengths = np.empty(len(documents), dtype=np.int64)
  for start in range(0, len(documents), read_batch):
    indices = range(start, min(start + read_batch, len(documents)))
    for index, example in zip(indices, _read_many(documents, indices)):
      lengths[index] = len(_document_bytes(example, text_key)) + 1
  if cache_key is not None:
    _TOKEN_LENGTHS_CACHE[cache_key] = lengths
  return lengths


# ----------------------------------------------------------------------------------------------
# Packed windows.
# ----------------------------------------------------------------------------------------------


class PackedWindows:
  """Random access to fixed-length windows of the concatenated token stream of some documents.

  The stream is ``concat(bytes(doc) + 3, [EOS] for doc in documents)`` with ``N`` tokens; window
  ``i`` covers stream positions ``[i*T, min(i*T + T + 1, N))``; there are ``ceil((N - 1) / T)``
  windows. Only the documents a window touches are read (a few recent ones are cached).

  Item ``i`` is a dict of numpy arrays:
    inputs: int32[T] tokens ``i*T .. i*T+T-1`` (PAD past the end of the stream).
    targets: int32[T] tokens ``i*T+1 .. i*T+T`` (PAD past the end).
    token_mask: bool[T], True where the target is a real token.
  """

  def __init__(self, documents: Sequence[Any], *, seq_len: int, text_key: str = "text",
               token_lengths: np.ndarray | None = None, cached_documents: int = 8):
    """Builds the index.

    Args:
      documents: random-access documents (TFDS data source, list of str/bytes, ...).
      seq_len: T, tokens per window (>= 1).
      text_key: feature holding the text in dict examples.
      token_lengths: int64[num_documents] precomputed by :func:`document_token_lengths`.
      cached_documents: how many tokenized documents to keep for neighbouring windows.
    """
    if int(seq_len) < 1:
      raise ValueError(f"seq_len={seq_len} must be >= 1.")
    self.seq_len = int(seq_len)
    self._documents = documents
    self._text_key = text_key
    if token_lengths is None:
      token_lengths = document_token_lengths(documents, text_key)
    self._doc_ends = np.cumsum(np.asarray(token_lengths, dtype=np.int64), dtype=np.int64)
    self.num_tokens = int(self._doc_ends[-1]) if len(self._doc_ends) else 0
    self._num_windows = -(-(self.num_tokens - 1) // self.seq_len) if self.num_tokens > 1 else 0
    self._cache_size = max(int(cached_documents), 1)
    self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

  @property
  def num_documents(self) -> int:
    return len(self._doc_ends)

  @property
  def num_targets(self) -> int:
    """Mask-True targets over all windows: ``N - 1`` (every stream token but the first)."""
    return max(self.num_tokens - 1, 0)

  def __len__(self) -> int:
    return self._num_windows

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_cache"] = collections.OrderedDict()
    return state

  def _document_raw(self, index: int) -> bytes:
    """UTF-8 bytes of document ``index`` (its tokens are these bytes + 3, then EOS)."""
    raw = self._cache.get(index)
    if raw is None:
      raw = _document_bytes(self._documents[index], self._text_key)
      expected = self._doc_ends[index] - (self._doc_ends[index - 1] if index else 0)
      if len(raw) + 1 != expected:
        raise RuntimeError(f"document {index} changed since indexing: {len(raw) + 1} tokens, "
                           f"expected {expected}; delete the prepared dataset and rerun.")
      self._cache[index] = raw
      if len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
    else:
      self._cache.move_to_end(index)
    return raw

  def stream_slice(self, start: int, stop: int) -> np.ndarray:
    """int32[stop - start] stream tokens ``[start, stop)``; requires ``0 <= start <= stop <= N``.

    Only the needed bytes of each touched document are converted (tokens map 1:1 to bytes).
    """
    if not 0 <= start <= stop <= self.num_tokens:
      raise IndexError(f"stream slice [{start}, {stop}) outside [0, {self.num_tokens}]")
    out = np.empty((stop - start,), np.int32)
    if start == stop:
      return out
    first = int(np.searchsorted(self._doc_ends, start, side="right"))
    last = int(np.searchsorted(self._doc_ends, stop - 1, side="right"))
    filled = 0
    for index in range(first, last + 1):
      doc_start = int(self._doc_ends[index - 1]) if index else 0
      lo = max(start, doc_start) - doc_start
      hi = min(stop, int(self._doc_ends[index])) - doc_start
      raw = self._document_raw(index)
      part = np.frombuffer(raw, np.uint8, count=max(min(hi, len(raw)) - lo, 0), offset=lo)
      out[filled: filled + len(part)] = part
      out[filled: filled + len(part)] += NUM_SPECIAL_TOKENS
      filled += len(part)
      if hi > len(raw):  # The slice reaches this document's EOS.
        out[filled] = EOS_ID
        filled += 1
    assert filled == len(out), (filled, len(out))
    return out

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self._num_windows:
      raise IndexError(f"window {index} out of range [0, {self._num_windows})")
    start = index * self.seq_len
    stop = min(start + self.seq_len + 1, self.num_tokens)
    window = np.full((self.seq_len + 1,), PAD_ID, dtype=np.int32)
    window[: stop - start] = self.stream_slice(start, stop)
    return {
        "inputs": window[:-1].copy(),
        "targets": window[1:].copy(),
        "token_mask": np.arange(self.seq_len) < (stop - start - 1),
    }


def make_packed_windows(data_cfg: Any, split: str, *, seq_len: int) -> PackedWindows:
  """Packed windows of one split of the configured source (token lengths cached per process).

  Args:
    data_cfg: the ``data`` section.
    split: split name.
    seq_len: T.

  Returns:
    A :class:`PackedWindows` over the split.
  """
  if int(seq_len) < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 1; set config.model.seq_len (or equivalent).")
  documents, text_key, identity = open_split(data_cfg, split)
  lengths = document_token_lengths(documents, text_key, cache_key=(identity, split, text_key))
  return PackedWindows(documents, seq_len=seq_len, text_key=text_key, token_lengths=lengths)


# ----------------------------------------------------------------------------------------------
# Training batches.
# ----------------------------------------------------------------------------------------------


def _check_process(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
  """``global_batch_size // process_count``, or ValueError when it does not divide evenly."""
  if global_batch_size < 1:
    raise ValueError(f"global batch size {global_batch_size} must be >= 1.")
  if global_batch_size % process_count:
    raise ValueError(
        f"global batch size {global_batch_size} is not divisible by process_count={process_count}; "
        f"use a multiple of {process_count}.")
  return global_batch_size // process_count


def make_train_dataset(data_cfg: Any, *, seq_len: int, global_batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The training pipeline as a grain ``IterDataset`` (see :func:`make_train_iterator`)."""
  _check_process(process_index, process_count)
  batch_size = per_process_batch_size(global_batch_size, process_count)
  windows = make_packed_windows(data_cfg, _option(data_cfg, "train_split"), seq_len=seq_len)
  shard_size = len(range(process_index, len(windows), process_count))
  if shard_size < batch_size:
    raise ValueError(
        f"train split {_option(data_cfg, 'train_split')!r} has {windows.num_tokens} tokens = "
        f"{len(windows)} windows of seq_len={seq_len}; process {process_index} of {process_count} "
        f"gets {shard_size}, fewer than its batch of {batch_size}; lower the batch size or seq_len, "
        "or add more text.")
  dataset = grain.MapDataset.source(windows)
  if process_count > 1:
    dataset = dataset[process_index::process_count]
  # Shuffle before repeat: every epoch is a fresh (seeded) permutation of this process's windows.
  dataset = dataset.shuffle(seed=int(seed)).repeat(None)
  dataset = dataset.batch(batch_size, drop_remainder=True)
  read_options = grain.ReadOptions(num_threads=int(_option(data_cfg, "read_threads")),
                                   prefetch_buffer_size=int(_option(data_cfg, "prefetch_batches")))
  iter_dataset = dataset.to_iter_dataset(read_options)
  workers = int(_option(data_cfg, "worker_count"))
  if workers > 0:
    if not flags.FLAGS.is_parsed():  # grain workers read absl flags; use their defaults.
      flags.FLAGS.mark_as_parsed()
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter_dataset


def make_train_iterator(data_cfg: Any, *, seq_len: int, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """An endless, checkpointable iterator over this process's training batches.

  Windows of the train split are split across processes (``windows[process_index::process_count]``),
  shuffled with ``seed`` (a new permutation every epoch, deterministic), repeated forever and batched.
  Save and restore the position with ``it.get_state()`` / ``it.set_state(state)``.

  Args:
    data_cfg: the ``data`` section.
    seq_len: T, tokens per row.
    global_batch_size: rows per step over all processes.
    seed: shuffle seed.
    process_index: this process.
    process_count: number of processes.

  Returns:
    A grain ``DatasetIterator`` of dicts ``{inputs int32[b,T], targets int32[b,T],
    token_mask bool[b,T]}`` with ``b = global_batch_size // process_count``.

  Raises:
    ValueError: bad config, indivisible batch, ``seq_len < 1``, or too little data for one batch.
  """
  return iter(make_train_dataset(data_cfg, seq_len=seq_len, global_batch_size=global_batch_size,
                                 seed=seed, process_index=process_index,
                                 process_count=process_count))


# ----------------------------------------------------------------------------------------------
# Evaluation batches.
# ----------------------------------------------------------------------------------------------


class EvalBatches:
  """Deterministic, re-iterable batches over the windows of a held-out split, in order.

  Process ``p`` of ``P`` takes windows ``p, p + P, ...``; every process yields the same number of
  batches; missing rows are all PAD with ``token_mask=False``, so each target of the split is counted
  exactly once over all processes.
  """

  def __init__(self, windows: PackedWindows, *, batch_size: int, max_batches: int | None = None,
               process_index: int = 0, process_count: int = 1):
    if batch_size < 1:
      raise ValueError(f"eval batch size {batch_size} must be >= 1.")
    _check_process(process_index, process_count)
    self.windows = windows
    self.batch_size = int(batch_size)
    self.process_index = process_index
    self.process_count = process_count
    windows_per_process = -(-len(windows) // process_count)
    num_batches = -(-windows_per_process // self.batch_size)
    if max_batches is not None:
      num_batches = min(num_batches, max(int(max_batches), 0))
    self._num_batches = num_batches

  def __len__(self) -> int:
    return self._num_batches

  def window_indices(self, batch: int) -> np.ndarray:
    """int64[batch_size] window index of each row of ``batch`` (-1 for padding rows)."""
    local = batch * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
    indices = local * self.process_count + self.process_index
    return np.where(indices < len(self.windows), indices, -1)

  def _batch(self, batch: int) -> dict[str, np.ndarray]:
    seq_len = self.windows.seq_len
    out = {"inputs": np.full((self.batch_size, seq_len), PAD_ID, np.int32),
           "targets": np.full((self.batch_size, seq_len), PAD_ID, np.int32),
           "token_mask": np.zeros((self.batch_size, seq_len), bool)}
    for row, index in enumerate(self.window_indices(batch)):
      if index >= 0:
        for name, value in self.windows[int(index)].items():
          out[name][row] = value
    return out

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    for batch in range(self._num_batches):
      yield self._batch(batch)


def make_eval_batches(data_cfg: Any, *, seq_len: int, batch_size: int,
                      max_batches: int | None = None, process_index: int = 0,
                      process_count: int = 1) -> EvalBatches:
  """Batches over the held-out split (``data.eval_split``), deterministic and in order.

  Args:
    data_cfg: the ``data`` section.
    seq_len: T.
    batch_size: rows per batch on this process.
    max_batches: stop after this many batches (None = the whole split).
    process_index: this process.
    process_count: number of processes.

  Returns:
    A re-iterable :class:`EvalBatches` (``len()`` = batches) of dicts
    ``{inputs int32[b,T], targets int32[b,T], token_mask bool[b,T]}``.

  Raises:
    ValueError: bad config, missing or empty split, ``seq_len < 1``.
  """
  split = _option(data_cfg, "eval_split")
  windows = make_packed_windows(data_cfg, split, seq_len=seq_len)
  if len(windows) == 0:
    raise ValueError(f"eval split {split!r} has {windows.num_tokens} tokens, too few for one "
                     "target; add documents or raise data.heldout_fraction.")
  return EvalBatches(windows, batch_size=batch_size, max_batches=max_batches,
                     process_index=process_index, process_count=process_count)


def describe_split(data_cfg: Any, split: str) -> dict[str, int]:
  """Size of one split: ``{"documents": ..., "tokens": ...}`` (tokens = bytes + one EOS per doc)."""
  documents, text_key, identity = open_split(data_cfg, split)
  lengths = document_token_lengths(documents, text_key, cache_key=(identity, split, text_key))
  return {"documents": int(len(lengths)), "tokens": int(lengths.sum())}


__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "VOCAB_SIZE", "VALID_SOURCES", "ByteTokenizer", "CorpusConfig",
    "DocumentRef", "EvalBatches", "PackedWindows", "TextCorpusBuilder", "assign_splits",
    "chunk_at_line_boundaries", "default_data_config", "describe_split", "document_token_lengths",
    "expand_text_files", "heldout_score", "is_online", "list_stdlib_files", "local_corpus_builder",
    "make_eval_batches", "make_packed_windows", "make_train_dataset", "make_train_iterator",
    "open_registered_tfds", "open_split", "per_process_batch_size", "resolve_data_dir",
    "stdlib_dir", "validate_data_config",
]
