"""Packing: random-access fixed-length windows over the concatenated token stream of some documents.

Every document becomes its tokens (``tokenizer.document_tokens``; the byte tokenizer: its UTF-8 bytes as tokens
``b + 3`` followed by ``EOS``; a tokenizer.json: [BOS] + tokens + EOS); the documents are
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

from rectify_moe.data.tokenizer import PAD_ID, ByteTokenizer, as_bytes

# (dataset identity, split, text key, tokenizer identity) -> int64[num_documents] token lengths.
_TOKEN_LENGTHS_CACHE: dict[tuple[str, ...], np.ndarray] = {}


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
                           cache_key: tuple[str, ...] | None = None,
                           read_batch: int = 256, tokenizer: Any = None) -> np.ndarray:
  """Token length of every document (the byte tokenizer: UTF-8 bytes + 1 (EOS)).

  Args:
    documents: random-access documents (feature dicts, str or bytes).
    text_key: feature holding the text in dict examples.
    cache_key: when given, the result is kept in memory for this process and reused (the tokenizer's identity is
      added to it).
    read_batch: records read per call.
    tokenizer: ``data.tokenizer.load_tokenizer(...)``; None = the byte tokenizer.

  Returns:
    int64[num_documents].
  """
  tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
  if cache_key is not None:
    cache_key = (*cache_key, tokenizer.identity)
  if cache_key is not None and cache_key in _TOKEN_LENGTHS_CACHE:
    return _TOKEN_LENGTHS_CACHE[cache_key]
  lengths = np.empty(len(documents), dtype=np.int64)
  for start in range(0, len(documents), read_batch):
    indices = range(start, min(start + read_batch, len(documents)))
    raws = [_document_bytes(example, text_key) for example in _read_many(documents, indices)]
    lengths[start: start + len(raws)] = tokenizer.document_lengths(raws)
  if cache_key is not None:
    _TOKEN_LENGTHS_CACHE[cache_key] = lengths
  return lengths


class PackedWindows:
  """Random access to fixed-length windows of the concatenated token stream of some documents.

  The stream is ``concat(tokenizer.document_tokens(doc) for doc in documents)`` with ``N`` tokens; window
  ``i`` covers stream positions ``[i*T, min(i*T + T + 1, N))``; there are ``ceil((N - 1) / T)``
  windows. Only the documents a window touches are read (a few recent ones are cached).

  Item ``i`` is a dict of numpy arrays:
    inputs: int32[T] tokens ``i*T .. i*T+T-1`` (PAD past the end of the stream).
    targets: int32[T] tokens ``i*T+1 .. i*T+T`` (PAD past the end).
    token_mask: bool[T], True where the target is a real token.
  """

  def __init__(self, documents: Sequence[Any], *, seq_len: int, text_key: str = "text",
               token_lengths: np.ndarray | None = None, cached_documents: int = 8, tokenizer: Any = None):
    """Builds the index.

    Args:
      documents: random-access documents (TFDS data source, list of str/bytes, ...).
      seq_len: T, tokens per window (>= 1).
      text_key: feature holding the text in dict examples.
      token_lengths: int64[num_documents] precomputed by :func:`document_token_lengths`.
      cached_documents: how many tokenized documents to keep for neighbouring windows.
      tokenizer: ``data.tokenizer.load_tokenizer(...)``; None = the byte tokenizer.
    """
    if int(seq_len) < 1:
      raise ValueError(f"seq_len={seq_len} must be >= 1.")
    self.seq_len = int(seq_len)
    self._documents = documents
    self._text_key = text_key
    self.tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    if token_lengths is None:
      token_lengths = document_token_lengths(documents, text_key, tokenizer=self.tokenizer)
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

  def _document_tokens(self, index: int) -> np.ndarray:
    """int32 tokens of document ``index`` (its EOS included)."""
    tokens = self._cache.get(index)
    if tokens is None:
      tokens = self.tokenizer.document_tokens(_document_bytes(self._documents[index], self._text_key))
      expected = self._doc_ends[index] - (self._doc_ends[index - 1] if index else 0)
      if len(tokens) != expected:
        raise RuntimeError(f"document {index} changed since indexing: {len(tokens)} tokens, "
                           f"expected {expected}; delete the prepared dataset and rerun.")
      self._cache[index] = tokens
      if len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
    else:
      self._cache.move_to_end(index)
    return tokens

  def stream_slice(self, start: int, stop: int) -> np.ndarray:
    """int32[stop - start] stream tokens ``[start, stop)``; requires ``0 <= start <= stop <= N``."""
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
      out[filled: filled + hi - lo] = self._document_tokens(index)[lo:hi]
      filled += hi - lo
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
