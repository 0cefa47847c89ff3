"""Local corpora (``data.source`` "stdlib" or "text_files") written once as a TFDS array_record dataset.

:func:`local_corpus_builder` lists the input files, fingerprints them (keys, paths, sizes, mtimes) and
the options that shape the examples, and opens :class:`TextCorpusBuilder` under the config name
``"{source}_{fingerprint[:12]}"``; a stale prepared dataset is therefore never reused. When it is not
prepared yet, the documents are collected (files cut at line boundaries, each assigned a split by
stable hash) and written under an exclusive file lock, so concurrent processes prepare it once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds

from rectify_moe import log
from rectify_moe.config import schema
from rectify_moe.data import files as files_lib
from rectify_moe.data._tfds import quiet_tfds
from rectify_moe.data.config import LOCAL_SPLITS, as_data_config, resolve_data_dir, validate_data_config

# Bump when the way local corpora are written changes (it is part of the fingerprint).
_CORPUS_FORMAT = 1


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
      data = files_lib.read_text_bytes(path)
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError.
      unreadable.append(f"{path} ({type(error).__name__}: {error})")
      continue
    if not data:
      empty.append(path)
      continue
    if source == "text_files" and len(data) > chunk_bytes:
      ranges = files_lib.chunk_at_line_boundaries(data, chunk_bytes)
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
    log.warning(f"skipped {len(unreadable)} unreadable/binary/non-UTF-8 files, e.g. {unreadable[0]}")
  if empty and source == "text_files":  # Empty stdlib files (__init__.py) are normal.
    log.warning(f"skipped {len(empty)} empty files, e.g. {empty[0]}")
  if source == "text_files" and len(pieces) < 2 and heldout_fraction > 0:
    raise ValueError(
        f"data.text_files gives only {len(pieces)} document ({pieces[0][1]}, {pieces[0][3]} bytes), "
        "too few for a train/validation split; add files or lower data.chunk_bytes "
        f"(now {chunk_bytes}) so the file is cut into several chunks.")
  splits = files_lib.assign_splits([piece[0] for piece in pieces], heldout_fraction)
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


def _local_input_files(cfg: schema.DataConfig) -> tuple[list[str], list[str]]:
  """Returns (absolute files, keys) of a local corpus, in key order."""
  if cfg.source == "stdlib":
    root = files_lib.stdlib_dir()
    keys = files_lib.list_stdlib_files(root, max_files=cfg.stdlib_max_files)
    if not keys:
      raise ValueError(f"no .py files found in the standard library folder {root}; "
                       "use data.source='text_files' instead.")
    return [os.path.join(root, key) for key in keys], keys
  files = files_lib.expand_text_files(cfg.text_files)
  keys = files_lib.relative_keys(files)
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


def local_corpus_builder(data_cfg: Any) -> TextCorpusBuilder:
  """Opens the local corpus of ``data_cfg`` (stdlib or text files), preparing it once if needed.

  Args:
    data_cfg: the ``data`` section (``DataConfig``, ConfigDict or dict); ``source`` must be "stdlib"
      or "text_files".

  Returns:
    A prepared builder; read splits with ``builder.as_data_source(split)``.

  Raises:
    ValueError: bad config, no usable files, too few documents.
  """
  cfg = as_data_config(data_cfg)
  validate_data_config(cfg)
  source = cfg.source
  if source not in ("stdlib", "text_files"):
    raise ValueError(f"local_corpus_builder needs data.source 'stdlib' or 'text_files', got {source!r}.")
  files, keys = _local_input_files(cfg)
  options = {"heldout_fraction": cfg.heldout_fraction}
  if source == "text_files":
    options["chunk_bytes"] = cfg.chunk_bytes
  fingerprint = _corpus_fingerprint(source, files, keys, options)
  config = CorpusConfig(name=f"{source}_{fingerprint[:12]}", source=source, num_files=len(files),
                        description=f"{source}: {len(files)} files, options {options}")
  data_dir = resolve_data_dir(cfg)
  with quiet_tfds():
    builder = TextCorpusBuilder(data_dir=data_dir, config=config, file_format="array_record")
    prepared = builder.is_prepared()
  if prepared:
    return builder
  documents = _collect_documents(source, files, keys, heldout_fraction=cfg.heldout_fraction,
                                 chunk_bytes=cfg.chunk_bytes)
  lock_path = os.path.join(data_dir, f"{TextCorpusBuilder.name}.{config.name}.lock")
  with _exclusive_file_lock(lock_path):
    with quiet_tfds():
      builder = TextCorpusBuilder(data_dir=data_dir, config=config, file_format="array_record",
                                  documents=documents)
      if builder.is_prepared():  # Another process prepared it while we waited for the lock.
        return builder
    log.info(f"Preparing dataset {TextCorpusBuilder.name}/{config.name} (one-time, {len(files)} "
             f"files, {len(documents)} documents) in {data_dir}")
    started = time.perf_counter()
    with quiet_tfds():
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  log.info(f"Prepared {builder.data_dir} in {time.perf_counter() - started:.1f} s")
  return builder
