"""Byte-level tokenizer: ids 0..2 are PAD, BOS, EOS; byte ``b`` is id ``b + 3``; 259 ids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
    return bytes_to_tokens(as_bytes(text), add_eos=add_eos)

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


def as_bytes(text: str | bytes | np.ndarray) -> bytes:
  """Returns ``text`` as UTF-8 bytes (accepts str, bytes, or a 0-d numpy bytes/str array)."""
  if isinstance(text, np.ndarray):
    text = text.item()
  if isinstance(text, str):
    return text.encode("utf-8")
  if isinstance(text, (bytes, bytearray, memoryview)):
    return bytes(text)
  raise TypeError(f"expected text as str or bytes, got {type(text).__name__}")


def bytes_to_tokens(data: bytes, *, add_eos: bool) -> np.ndarray:
  """Returns int32[len(data) + add_eos]: ``byte + 3`` for every byte, then ``EOS`` if asked."""
  tokens = np.empty(len(data) + int(add_eos), dtype=np.int32)
  tokens[: len(data)] = np.frombuffer(data, dtype=np.uint8)
  tokens[: len(data)] += NUM_SPECIAL_TOKENS
  if add_eos:
    tokens[-1] = EOS_ID
  return tokens
