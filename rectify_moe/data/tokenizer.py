"""Tokenizers of the pipeline (``data.tokenizer``): the byte tokenizer, or a Hugging Face ``tokenizer.json``.

Both turn one document's UTF-8 bytes into its tokens with ``document_tokens`` (what packing concatenates):
* ``ByteTokenizer`` (``'byte'``, the default): ids 0..2 are PAD, BOS, EOS; byte ``b`` is id ``b + 3``; 259 ids; a
  document is its bytes + 3, then EOS.
* ``JsonTokenizer`` (``'hf:DIR'`` or a ``tokenizer.json`` path, read with the ``tokenizers`` package): a document is
  [BOS] + its tokens + [EOS], the ids from the model's ``config.json`` next to the file (``bos_token_id``,
  ``eos_token_id``); BOS only when ``tokenizer_config.json`` says ``add_bos_token`` (without it: when the tokenizer's
  own post-processor adds one, as Llama's does and Qwen2's does not). Without a config.json the EOS is the
  tokenizer's ``</s>``, ``<|endoftext|>``, ``<|end_of_text|>`` or ``<eos>``.
``load_tokenizer(spec)`` builds either (cached per process); ``identity`` keys every cache of token lengths.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Optional

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
  identity = "byte"

  def document_tokens(self, raw: bytes) -> np.ndarray:
    """int32[len(raw) + 1]: the bytes + 3, then EOS."""
    return bytes_to_tokens(raw, add_eos=True)

  def document_lengths(self, raws: Sequence[bytes]) -> list[int]:
    return [len(raw) + 1 for raw in raws]

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


EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


class JsonTokenizer:
  """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` package); BOS/EOS as the model's config says."""

  pad_id = PAD_ID  # padding positions are masked; any valid id serves

  def __init__(self, path: str):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel (only needed for this tokenizer)
    from rectify_moe.config.fields import ConfigError  # pylint: disable=import-outside-toplevel
    if not os.path.isfile(path):
      raise ConfigError(f"data.tokenizer: {path} is missing; give a tokenizer.json file or 'hf:DIR' of a folder "
                        "holding one.")
    try:
      self._tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers package raises its own exception types
      raise ConfigError(f"data.tokenizer: cannot read {path}: {str(e).splitlines()[0]}") from None
    folder = os.path.dirname(path)
    model_config = _read_json(os.path.join(folder, "config.json"))
    tokenizer_config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    self.bos_id = _first_id(model_config.get("bos_token_id"))
    self.eos_id = _first_id(model_config.get("eos_token_id"))
    if self.eos_id is None:
      self.eos_id = next((i for i in map(self._tokenizer.token_to_id, EOS_NAMES) if i is not None), None)
    if self.eos_id is None:
      raise ConfigError(f"data.tokenizer: no EOS id for {path}: put a config.json with eos_token_id next to it.")
    add_bos = tokenizer_config.get("add_bos_token")
    if add_bos is None:  # what the tokenizer's own post-processor does
      add_bos = self.bos_id is not None and self.bos_id in self._tokenizer.encode("", add_special_tokens=True).ids
    self.add_bos = bool(add_bos) and self.bos_id is not None
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    stat = os.stat(path)
    self.identity = f"json|{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{self.bos_id}|{self.eos_id}|" \
                    f"{self.add_bos}"

  def encode(self, text: str | bytes, *, add_eos: bool = False) -> np.ndarray:
    """int32 ids of ``text`` (no BOS; EOS appended with add_eos)."""
    ids = self._tokenizer.encode(as_bytes(text).decode("utf-8", errors="replace"), add_special_tokens=False).ids
    return np.asarray(ids + [self.eos_id] * add_eos, np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

  def document_tokens(self, raw: bytes) -> np.ndarray:
    """int32: [BOS] + the document's tokens + [EOS]."""
    return np.asarray([self.bos_id] * self.add_bos + list(self.encode(raw)) + [self.eos_id], np.int32)

  def document_lengths(self, raws: Sequence[bytes]) -> list[int]:
    texts = [raw.decode("utf-8", errors="replace") for raw in raws]
    encoded = self._tokenizer.encode_batch(texts, add_special_tokens=False)
    return [len(e.ids) + 1 + int(self.add_bos) for e in encoded]


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _first_id(value) -> Optional[int]:
  if isinstance(value, list):
    value = value[0] if value else None
  return value if isinstance(value, int) else None


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str = "") -> ByteTokenizer | JsonTokenizer:
  """The tokenizer of ``data.tokenizer``: '' or 'byte', 'hf:DIR' (DIR/tokenizer.json) or a tokenizer.json path."""
  spec = spec.strip()
  if spec in ("", "byte"):
    return ByteTokenizer()
  path = spec[3:] if spec.startswith("hf:") else spec
  path = os.path.abspath(os.path.expanduser(path))
  if spec.startswith("hf:") or os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  return JsonTokenizer(path)
