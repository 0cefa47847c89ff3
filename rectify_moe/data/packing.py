"""Packing: random-access fixed-length windows over the concatenated token stream of some documents.

Every document becomes its UTF-8 bytes (token ``b + 3``) followed by ``EOS``; the documents are
concatenated (in record order) into one stream of ``N`` tokens. Window ``i`` is
``stream[i*T : i*T + T + 1]`` with ``inputs = w[:-1]``, ``targets = w[1:]``; there are
``ceil((N - 1) / T)`` windows, the last one padded with ``PAD`` and ``token_mask=False``. Every stream
position except the first is a target exactly once: a split yields ``N - 1`` mask-True targets.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rectify_moe.data.tokenizer import EOS_ID, NUM_SPECIAL_TOKENS, PAD_ID, as_bytes

# (dataset identity, split, text key) -> int64[num_documents] token lengths (bytes + EOS).
_TOKEN_LENGTHS_CACHE: dict[tuple[str, str, str], np.ndarray] = {}


def _document_bytes(example: Any, text_key: str) -> bytes:
  """Returns the UTF-8 text of one example (a feature dict, str or bytes)."""
  if isinstance(example, Mapping):
    if text_key not in example:
      raise ValueError(f"examples have no feature {text_key!r} (features: "
                       f"{', '.join(sorted(example))}); set data.tfds_text_key.")
    example = example[text_key]
  return as_bytes(example)


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
