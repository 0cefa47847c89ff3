"""From the ``data`` config to batches: open a split of the configured source, pack it into windows,
and serve training batches (grain, shuffled, sharded over processes, checkpointable) and evaluation
batches (deterministic, in order, every held-out target counted once over all processes).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from rectify_moe.data.config import as_data_config, validate_data_config
from rectify_moe.data.corpus import local_corpus_builder
from rectify_moe.data.packing import PackedWindows, document_token_lengths
from rectify_moe.data.registered import open_registered_tfds
from rectify_moe.data.tokenizer import PAD_ID, load_tokenizer

# ----------------------------------------------------------------------------------------------
# Documents of a split.
# ----------------------------------------------------------------------------------------------


def open_split(data_cfg: Any, split: str) -> tuple[Sequence[Any], str, str]:
  """Opens one split of the configured source.

  Args:
    data_cfg: the ``data`` section (see :func:`as_data_config`).
    split: split name.

  Returns:
    (random-access documents, text key, identity string for caching).

  Raises:
    ValueError: bad config or missing split (the message lists the available ones).
  """
  cfg = as_data_config(data_cfg)
  validate_data_config(cfg)
  source = cfg.source
  if source == "tfds":
    documents = open_registered_tfds(cfg, split)
    return documents, cfg.tfds_text_key, f"tfds|{cfg.data_dir}|{cfg.tfds_name}"
  builder = local_corpus_builder(cfg)
  available = sorted(builder.info.splits.keys())
  if split not in available:
    raise ValueError(
        f"split {split!r} of data.source={source!r} is empty or missing (available: "
        f"{', '.join(available) or 'none'}); raise data.heldout_fraction or add more documents.")
  return builder.as_data_source(split=split), "text", os.fspath(builder.data_dir)


def make_packed_windows(data_cfg: Any, split: str, *, seq_len: int) -> PackedWindows:
  """Packed windows of one split of the configured source (token lengths cached per process).

  Args:
    data_cfg: the ``data`` section (see :func:`as_data_config`).
    split: split name.
    seq_len: T.

  Returns:
    A :class:`PackedWindows` over the split.
  """
  if int(seq_len) < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 1; set config.model.seq_len (or equivalent).")
  cfg = as_data_config(data_cfg)
  documents, text_key, identity = open_split(cfg, split)
  tokenizer = load_tokenizer(cfg.tokenizer)
  lengths = document_token_lengths(documents, text_key, cache_key=(identity, split, text_key), tokenizer=tokenizer)
  return PackedWindows(documents, seq_len=seq_len, text_key=text_key, token_lengths=lengths, tokenizer=tokenizer)


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


def _rows_of_process(batch: dict[str, np.ndarray], start: int, size: int) -> dict[str, np.ndarray]:
  return {k: v[start:start + size] for k, v in batch.items()}


def make_train_dataset(data_cfg: Any, *, seq_len: int, global_batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The training pipeline as a grain ``IterDataset`` (see :func:`make_train_iterator`)."""
  _check_process(process_index, process_count)
  batch_size = per_process_batch_size(global_batch_size, process_count)
  cfg = as_data_config(data_cfg)
  windows = make_packed_windows(cfg, cfg.train_split, seq_len=seq_len)
  if len(windows) < global_batch_size:
    raise ValueError(
        f"train split {cfg.train_split!r} has {windows.num_tokens} tokens = "
        f"{len(windows)} windows of seq_len={seq_len}, fewer than the global batch of {global_batch_size}; "
        "lower the batch size or seq_len, or add more text.")
  dataset = grain.MapDataset.source(windows)
  # Shuffle before repeat: every epoch is a fresh (seeded) permutation of the windows. The order is one of global
  # batches, whatever the process count: process p takes rows [p*b, (p+1)*b) of each.
  dataset = dataset.shuffle(seed=int(seed)).repeat(None)
  dataset = dataset.batch(global_batch_size, drop_remainder=True)
  if process_count > 1:
    dataset = dataset.map(functools.partial(_rows_of_process, start=process_index * batch_size, size=batch_size))
  read_options = grain.ReadOptions(num_threads=cfg.read_threads,
                                   prefetch_buffer_size=cfg.prefetch_batches)
  iter_dataset = dataset.to_iter_dataset(read_options)
  workers = cfg.worker_count
  if workers > 0:
    if not flags.FLAGS.is_parsed():  # grain workers read absl flags; use their defaults.
      flags.FLAGS.mark_as_parsed()
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter_dataset


def make_train_iterator(data_cfg: Any, *, seq_len: int, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """An endless, checkpointable iterator over this process's training batches.

  Windows of the train split are shuffled with ``seed`` (a new permutation every epoch, deterministic), repeated
  forever and batched into global batches; process ``p`` takes rows ``[p*b, (p+1)*b)`` of each, so the global
  batches (and the iterator state: global batches consumed) do not depend on the process count.
  Save and restore the position with ``it.get_state()`` / ``it.set_state(state)``.

  Args:
    data_cfg: the ``data`` section (see :func:`as_data_config`).
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
  cfg = as_data_config(data_cfg)
  return iter(make_train_dataset(cfg, seq_len=seq_len, global_batch_size=global_batch_size,
                                 seed=seed, process_index=process_index,
                                 process_count=process_count))


# ----------------------------------------------------------------------------------------------
# Evaluation batches.
# ----------------------------------------------------------------------------------------------


class EvalBatches:
  """Deterministic, re-iterable batches over the windows of a held-out split, in order.

  Global batch ``g`` holds windows ``[g*B, (g+1)*B)`` (``B = P * batch_size``), process ``p`` of ``P`` its rows
  ``[p*b, (p+1)*b)``, so the global batches do not depend on the process count; every process yields the same
  number of batches; missing rows are all PAD with ``token_mask=False``, so each target of the split is counted
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
    num_batches = -(-len(windows) // (self.batch_size * process_count))
    if max_batches is not None:
      num_batches = min(num_batches, max(int(max_batches), 0))
    self._num_batches = num_batches

  def __len__(self) -> int:
    return self._num_batches

  def window_indices(self, batch: int) -> np.ndarray:
    """int64[batch_size] window index of each row of ``batch`` (-1 for padding rows)."""
    first = (batch * self.process_count + self.process_index) * self.batch_size
    indices = first + np.arange(self.batch_size, dtype=np.int64)
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
    data_cfg: the ``data`` section (see :func:`as_data_config`).
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
  cfg = as_data_config(data_cfg)
  split = cfg.eval_split
  windows = make_packed_windows(cfg, split, seq_len=seq_len)
  if len(windows) == 0:
    raise ValueError(f"eval split {split!r} has {windows.num_tokens} tokens, too few for one "
                     "target; add documents or raise data.heldout_fraction.")
  return EvalBatches(windows, batch_size=batch_size, max_batches=max_batches,
                     process_index=process_index, process_count=process_count)


def describe_split(data_cfg: Any, split: str) -> dict[str, int]:
  """Size of one split: ``{"documents": ..., "tokens": ...}`` (byte tokenizer: bytes + one EOS per doc)."""
  cfg = as_data_config(data_cfg)
  documents, text_key, identity = open_split(cfg, split)
  lengths = document_token_lengths(documents, text_key, cache_key=(identity, split, text_key),
                                   tokenizer=load_tokenizer(cfg.tokenizer))
  return {"documents": int(len(lengths)), "tokens": int(lengths.sum())}

