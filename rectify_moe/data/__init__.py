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

Packing (``data.tokenizer``, default the byte tokenizer; a tokenizer.json works the same way with its own ids):
every document becomes its UTF-8 bytes (token ``b + 3``) followed by ``EOS``; the documents of
a split are concatenated (in record order) into one stream of ``N`` tokens. Window ``i`` is
``stream[i*T : i*T + T + 1]`` with ``inputs = w[:-1]``, ``targets = w[1:]``; there are
``ceil((N - 1) / T)`` windows, the last one padded with ``PAD`` and ``token_mask=False``. Every stream
position except the first is a target exactly once: a split yields ``N - 1`` mask-True targets.

No TensorFlow is imported; the network is only touched for a registered TFDS dataset that is not
prepared locally, after a short connectivity check.

Every entry point takes the ``data`` section as a ``schema.DataConfig``, an ml_collections ConfigDict
or a dict (missing keys take the defaults of ``schema.DataConfig``) and reads it through
:func:`as_data_config`.

Modules, one concept each:
  tokenizer   ByteTokenizer, PAD/BOS/EOS ids, VOCAB_SIZE; JsonTokenizer (a tokenizer.json), load_tokenizer.
  config      as_data_config, validate_data_config, resolve_data_dir.
  files       stdlib file list, text-file patterns, held-out split by stable hash, line chunking.
  corpus      local corpora as a TFDS builder (TextCorpusBuilder, local_corpus_builder).
  registered  registered TFDS datasets (is_online, open_registered_tfds).
  packing     document token lengths and PackedWindows over the token stream.
  pipeline    open_split, make_packed_windows, training and evaluation batches, describe_split.

The names below are re-exported for ``from rectify_moe import data as data_lib; data_lib.X``. To patch a
function for a test, patch it where it is looked up (e.g. ``rectify_moe.data.registered.is_online``),
not on this package.
"""

from rectify_moe.data.config import VALID_SOURCES, as_data_config, resolve_data_dir, validate_data_config
from rectify_moe.data.corpus import CorpusConfig, DocumentRef, TextCorpusBuilder, local_corpus_builder
from rectify_moe.data.files import (assign_splits, chunk_at_line_boundaries, expand_text_files, heldout_score,
                                    list_stdlib_files, stdlib_dir)
from rectify_moe.data.packing import PackedWindows, document_token_lengths
from rectify_moe.data.pipeline import (EvalBatches, describe_split, make_eval_batches, make_packed_windows,
                                       make_train_dataset, make_train_iterator, open_split, per_process_batch_size)
from rectify_moe.data.registered import is_online, open_registered_tfds
from rectify_moe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer, JsonTokenizer, load_tokenizer

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "VOCAB_SIZE", "VALID_SOURCES", "ByteTokenizer", "CorpusConfig",
    "DocumentRef", "EvalBatches", "PackedWindows", "TextCorpusBuilder", "as_data_config", "assign_splits",
    "chunk_at_line_boundaries", "describe_split", "document_token_lengths", "expand_text_files",
    "heldout_score", "is_online", "JsonTokenizer", "load_tokenizer",
    "list_stdlib_files", "local_corpus_builder", "make_eval_batches",
    "make_packed_windows", "make_train_dataset", "make_train_iterator", "open_registered_tfds", "open_split",
    "per_process_batch_size", "resolve_data_dir", "stdlib_dir", "validate_data_config",
]
