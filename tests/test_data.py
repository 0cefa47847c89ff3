"""Tests for rectify_moe.data: tokenizer, local TFDS corpora, packing, grain iterators, errors.

Every test but ``test_stdlib_corpus_build`` writes to a temporary data_dir; no test touches the
network (an autouse fixture makes every TCP connect and DNS lookup fail).
"""

import hashlib
import json
import math
import os
import socket
import sys
import time

import numpy as np
import pytest

from rectify_moe import data
from rectify_moe.config import fields, schema
from rectify_moe.data import registered

# ----------------------------------------------------------------------------------------------
# Helpers and independent references.
# ----------------------------------------------------------------------------------------------

WORDS = ["alpha", "beta", "gamma", "délta", "ελληνικά", "日本語", "emoji🙂", "zeta", "eta", "theta",
         "iota", "kappa", "lambda", "mu"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Makes every internet connection attempt fail at once (DNS lookups and connects)."""

  def refuse_lookup(*args, **kwargs):
    raise socket.gaierror("network disabled in tests")

  original_connect = socket.socket.connect

  def refuse_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
      raise OSError("network disabled in tests")
    return original_connect(self, address)

  monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
  monkeypatch.setattr(socket.socket, "connect", refuse_connect)


def random_text(rng, num_lines):
  """Random multi-line text of words (including non-ASCII), unique with high probability."""
  lines = []
  for _ in range(num_lines):
    words = rng.choice(WORDS, size=rng.integers(1, 9))
    lines.append(" ".join(words) + f" {rng.integers(1_000_000)}\n")
  return "".join(lines)


def write_corpus(folder, num_files, seed=0, lines=(3, 30)):
  """Writes num_files random text files; returns {relative name: bytes}."""
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  contents = {}
  for index in range(num_files):
    name = f"doc_{index:03d}.txt"
    text = random_text(rng, int(rng.integers(*lines))).encode("utf-8")
    (folder / name).write_bytes(text)
    contents[name] = text
  return contents


def default_cfg():
  """The ``data`` section with its defaults, as configs/default.py builds it."""
  return fields.to_config_dict(schema.DataConfig())


def text_cfg(tmp_path, pattern, **overrides):
  cfg = default_cfg()
  cfg.source = "text_files"
  cfg.text_files = str(pattern)
  cfg.data_dir = str(tmp_path / "tfds")
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def reference_split(keys, fraction):
  """Split by SHA-1, written independently of data.assign_splits (same non-empty guarantee)."""
  scores = [int(hashlib.sha1(k.encode()).hexdigest()[:16], 16) / 2**64 for k in keys]
  heldout = [s < fraction for s in scores]
  if len(keys) >= 2 and fraction > 0:
    if not any(heldout):
      heldout[scores.index(min(scores))] = True
    if all(heldout):
      heldout[scores.index(max(scores))] = False
  return ["validation" if h else "train" for h in heldout]


def reference_stream(texts):
  """Token stream of documents: every byte + 3, EOS (2) after each document."""
  tokens = []
  for text in texts:
    tokens.extend(b + 3 for b in (text if isinstance(text, bytes) else text.encode("utf-8")))
    tokens.append(2)
  return np.array(tokens, dtype=np.int32)


def reference_window(stream, index, seq_len):
  """(inputs, targets, mask) of window `index` from a padded plain-numpy stream."""
  padded = np.concatenate([stream, np.zeros(seq_len + 1, np.int32)])
  start = index * seq_len
  inputs = padded[start: start + seq_len]
  targets = padded[start + 1: start + seq_len + 1]
  mask = start + 1 + np.arange(seq_len) < len(stream)
  return inputs, targets, mask


def split_texts(contents, split, fraction=0.03):
  """Texts of one split of a whole-file corpus, in record (sorted key) order."""
  names = sorted(contents)
  return [contents[n] for n, s in zip(names, reference_split(names, fraction)) if s == split]


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def row_keys(batches):
  """One hashable key per row, in order."""
  return [batch["inputs"][row].tobytes() + batch["targets"][row].tobytes()
          for batch in batches for row in range(batch["inputs"].shape[0])]


# ----------------------------------------------------------------------------------------------
# Tokenizer.
# ----------------------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_ids():
  tokenizer = data.ByteTokenizer()
  assert tokenizer.vocab_size == data.VOCAB_SIZE == 259
  assert (data.PAD_ID, data.BOS_ID, data.EOS_ID) == (0, 1, 2)
  for text in ["", "hello world", "héllo wörld ✓ 日本語 🙂\n\ttabs", "\x00\xff"]:
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [b + 3 for b in text.encode("utf-8")])
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(np.concatenate([[1], ids, [2, 0, 0]])) == text
  np.testing.assert_array_equal(tokenizer.encode("ab", add_eos=True), [100, 101, 2])
  assert tokenizer.decode([3 + 0xC3]) == "\ufffd"  # Truncated UTF-8 sequence.
  assert tokenizer.decode([300, 3 + ord("x"), -1]) == "x"  # Out-of-range ids are skipped.


# ----------------------------------------------------------------------------------------------
# Standard library corpus.
# ----------------------------------------------------------------------------------------------


def test_stdlib_exclusion_rules_on_fake_tree(tmp_path):
  layout = ["a.py", "pkg/b.py", "pkg/notes.txt", "pkg/test_name_is_fine.py", "test/t.py",
            "tests/x.py", "idlelib/ok.py", "idlelib/idle_test/y.py", "lib2to3/tests/data/z.py",
            "foo_test/w.py", "pkg/tests/q.py", "site-packages/s.py", "__pycache__/c.py",
            "zz/deep/er.py"]
  for path in layout:
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / path).write_text("x = 1\n")
  expected = ["a.py", "idlelib/ok.py", "pkg/b.py", "pkg/test_name_is_fine.py", "zz/deep/er.py"]
  assert data.list_stdlib_files(str(tmp_path)) == expected
  assert data.list_stdlib_files(str(tmp_path), max_files=2) == expected[:2]


def test_real_stdlib_file_list():
  paths = data.list_stdlib_files()
  assert len(paths) > 300
  assert paths == sorted(paths) and len(set(paths)) == len(paths)
  assert {"os.py", "json/__init__.py", "asyncio/tasks.py"} <= set(paths)
  for path in paths:
    assert path.endswith(".py")
    folders = path.split("/")[:-1]
    assert not any(f in ("test", "tests", "idle_test", "site-packages") or f.endswith("_test")
                   for f in folders), path
  assert os.path.isdir(os.path.join(data.stdlib_dir(), "test"))  # It exists but is left out.


def test_stdlib_corpus_build():
  """Builds (or re-opens) the real default corpus in the default cache dir."""
  cfg = default_cfg()
  started = time.perf_counter()
  builder = data.local_corpus_builder(cfg)
  seconds = time.perf_counter() - started
  keys = data.list_stdlib_files()
  root = data.stdlib_dir()
  nonempty = [k for k in keys if os.path.getsize(os.path.join(root, k)) > 0]
  expected = dict(zip(nonempty, reference_split(nonempty, cfg.heldout_fraction)))
  sizes = {}
  for split in ("train", "validation"):
    source = builder.as_data_source(split=split)
    paths = [source[i]["path"].decode() for i in range(len(source))]
    assert paths == sorted(paths)  # Record order = sorted relative paths.
    assert all(expected[p] == split for p in paths)
    sizes[split] = data.describe_split(cfg, split)
    assert sizes[split]["documents"] == len(paths)
  assert sizes["train"]["documents"] + sizes["validation"]["documents"] == len(nonempty)
  validation_paths = [k for k in nonempty if expected[k] == "validation"]
  validation_bytes = sum(os.path.getsize(os.path.join(root, k)) for k in validation_paths)
  assert sizes["validation"]["tokens"] == validation_bytes + len(validation_paths)
  print(f"stdlib corpus: open/prepare {seconds:.2f} s, {len(nonempty)} files, {sizes}")
  assert seconds < 60


# ----------------------------------------------------------------------------------------------
# Text-file corpora.
# ----------------------------------------------------------------------------------------------


def test_text_files_splits_order_and_reopen(tmp_path, capsys):
  contents = write_corpus(tmp_path / "corpus", 40)
  cfg = text_cfg(tmp_path, tmp_path / "corpus" / "*.txt", heldout_fraction=0.2)
  builder = data.local_corpus_builder(cfg)
  assert capsys.readouterr().out.count("Preparing dataset") == 1
  names = sorted(contents)
  expected = dict(zip(names, reference_split(names, 0.2)))
  seen = []
  for split in ("train", "validation"):
    source = builder.as_data_source(split=split)
    paths = [source[i]["path"].decode() for i in range(len(source))]
    assert paths and paths == sorted(paths)
    assert all(expected[p] == split for p in paths)
    assert all(source[i]["text"] == contents[p] for i, p in enumerate(paths))
    seen += paths
  assert sorted(seen) == names  # Disjoint and complete.
  again = data.local_corpus_builder(cfg)  # Re-open: no second preparation.
  assert capsys.readouterr().out == ""
  assert again.data_dir == builder.data_dir
  # The same files elsewhere give the same split (the rule uses relative paths only).
  moved = write_corpus(tmp_path / "elsewhere" / "nested", 40)
  assert moved == contents
  other = data.local_corpus_builder(
      text_cfg(tmp_path, tmp_path / "elsewhere" / "**" / "*.txt", heldout_fraction=0.2))
  source = other.as_data_source(split="validation")
  assert sorted(source[i]["path"].decode() for i in range(len(source))) == sorted(
      n for n in names if expected[n] == "validation")


def test_fingerprint_changes_with_files_and_options(tmp_path, capsys):
  write_corpus(tmp_path / "c", 10)
  cfg = text_cfg(tmp_path, f"{tmp_path / 'c'}/doc_00*.txt, {tmp_path / 'c'}/doc_000.txt")
  first = data.local_corpus_builder(cfg)
  with open(tmp_path / "c" / "doc_003.txt", "a") as handle:
    handle.write("one more line\n")
  second = data.local_corpus_builder(cfg)
  assert second.builder_config.name != first.builder_config.name
  texts = []
  for split in ("train", "validation"):
    source = second.as_data_source(split=split)
    texts += [source[i]["text"] for i in range(len(source))]
  assert any(t.endswith(b"one more line\n") for t in texts)
  cfg.heldout_fraction = 0.5
  third = data.local_corpus_builder(cfg)
  assert third.builder_config.name not in (first.builder_config.name, second.builder_config.name)
  assert capsys.readouterr().out.count("Preparing dataset") == 3


def test_large_file_is_chunked_at_lines(tmp_path):
  rng = np.random.default_rng(1)
  text = random_text(rng, 9000).encode("utf-8")  # ~300 KB.
  default_chunk_bytes = schema.DataConfig().chunk_bytes
  assert len(text) > 4 * default_chunk_bytes
  (tmp_path / "big.txt").write_bytes(text)
  builder = data.local_corpus_builder(text_cfg(tmp_path, tmp_path / "big.txt"))
  chunks = {}
  for split in ("train", "validation"):
    source = builder.as_data_source(split=split)
    assert len(source) > 0  # Both splits are non-empty.
    for i in range(len(source)):
      path, index = source[i]["path"].decode().split("#")
      assert path == "big.txt"
      chunks[int(index)] = source[i]["text"]
  assert sorted(chunks) == list(range(len(chunks)))
  assert b"".join(chunks[i] for i in sorted(chunks)) == text
  for i in sorted(chunks)[:-1]:
    assert chunks[i].endswith(b"\n") and len(chunks[i]) <= default_chunk_bytes
  names = [f"big.txt#{i}" for i in sorted(chunks)]
  expected = reference_split(names, 0.03)
  source = builder.as_data_source(split="validation")
  assert sorted(source[i]["path"].decode() for i in range(len(source))) == sorted(
      n for n, s in zip(names, expected) if s == "validation")


def test_chunk_at_line_boundaries():
  payload = b"aa\nbbbb\n" + b"x" * 20 + b"\ncc\ndd"
  ranges = data.chunk_at_line_boundaries(payload, 6)
  pieces = [payload[a:b] for a, b in ranges]
  assert b"".join(pieces) == payload
  assert pieces == [b"aa\n", b"bbbb\n", b"x" * 20 + b"\n", b"cc\ndd"]
  assert data.chunk_at_line_boundaries(b"", 6) == []


# ----------------------------------------------------------------------------------------------
# Packing.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_packing_matches_numpy_reference(seq_len):
  docs = ["hello", "", "wörld ✓\n", "x" * 150, "日本語", "z"]
  stream = reference_stream(docs)
  windows = data.PackedWindows(docs, seq_len=seq_len, cached_documents=2)
  assert windows.num_tokens == len(stream)
  assert len(windows) == -(-(len(stream) - 1) // seq_len)
  for index in range(len(windows)):
    item = windows[index]
    inputs, targets, mask = reference_window(stream, index, seq_len)
    assert item["inputs"].dtype == np.int32 and item["token_mask"].dtype == bool
    np.testing.assert_array_equal(item["inputs"], inputs)
    np.testing.assert_array_equal(item["targets"], targets)
    np.testing.assert_array_equal(item["token_mask"], mask)
  total_mask = sum(int(windows[i]["token_mask"].sum()) for i in range(len(windows)))
  assert total_mask == len(stream) - 1 == windows.num_targets
  with pytest.raises(IndexError):
    windows[len(windows)]


def test_packing_over_tfds_split_matches_reference(tmp_path):
  contents = write_corpus(tmp_path / "corpus", 25, seed=3)
  cfg = text_cfg(tmp_path, tmp_path / "corpus", heldout_fraction=0.2)
  for split in ("train", "validation"):
    stream = reference_stream(split_texts(contents, split, 0.2))
    windows = data.make_packed_windows(cfg, split, seq_len=32)
    assert windows.num_tokens == len(stream)
    for index in range(len(windows)):
      inputs, targets, mask = reference_window(stream, index, 32)
      item = windows[index]
      np.testing.assert_array_equal(item["inputs"], inputs)
      np.testing.assert_array_equal(item["targets"], targets)
      np.testing.assert_array_equal(item["token_mask"], mask)


# ----------------------------------------------------------------------------------------------
# Training iterator.
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def train_corpus(tmp_path):
  """A corpus whose train split is every file (heldout_fraction=0), ~60 windows of 16 tokens."""
  contents = write_corpus(tmp_path / "corpus", 6, seed=7, lines=(2, 5))
  cfg = text_cfg(tmp_path, tmp_path / "corpus" / "*.txt", heldout_fraction=0.0)
  windows = data.make_packed_windows(cfg, "train", seq_len=16)
  assert windows.num_tokens == len(reference_stream([contents[n] for n in sorted(contents)]))
  index_of = {windows[i]["inputs"].tobytes() + windows[i]["targets"].tobytes(): i
              for i in range(len(windows))}
  assert len(index_of) == len(windows)  # Windows are distinguishable by content.
  return cfg, windows, index_of


def test_train_iterator_shapes_and_resume(train_corpus):
  cfg, _, _ = train_corpus
  make = lambda: data.make_train_iterator(cfg, seq_len=16, global_batch_size=4, seed=3)
  iterator = make()
  head = take(iterator, 3)
  for batch in head:
    assert set(batch) == {"inputs", "targets", "token_mask"}
    assert batch["inputs"].shape == batch["targets"].shape == (4, 16)
    assert batch["inputs"].dtype == np.int32 and batch["token_mask"].dtype == bool
  state = iterator.get_state()
  json.dumps(state)  # Checkpointable as JSON.
  expected = take(iterator, 20)  # Crosses an epoch boundary.
  resumed = make()
  resumed.set_state(state)
  for want, got in zip(expected, take(resumed, 20)):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  fresh = take(make(), 23)  # Deterministic from scratch.
  assert row_keys(fresh) == row_keys(head + expected)


def test_epochs_are_permutations_and_seeds_differ(train_corpus):
  cfg, windows, index_of = train_corpus
  count = len(windows)
  batches = -(-2 * count // 4)
  orders = {}
  for seed in (0, 1):
    iterator = data.make_train_iterator(cfg, seq_len=16, global_batch_size=4, seed=seed)
    orders[seed] = [index_of[k] for k in row_keys(take(iterator, batches))]
  for order in orders.values():
    first, second = order[:count], order[count: 2 * count]
    assert sorted(first) == list(range(count)) and sorted(second) == list(range(count))
    assert first != second  # Reshuffled each epoch.
  assert orders[0][:count] != orders[1][:count]


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_take_their_rows_of_the_same_global_batches(train_corpus, process_count):
  """The data order is one of global batches: P processes together see exactly the 1-process batches, and the
  iterator state (global batches consumed) restores onto another process count."""
  cfg, windows, index_of = train_corpus
  steps = -(-2 * len(windows) // 8)  # two epochs
  single = take(data.make_train_iterator(cfg, seq_len=16, global_batch_size=8, seed=0), steps)
  rows = []
  for process_index in range(process_count):
    iterator = data.make_train_iterator(cfg, seq_len=16, global_batch_size=8, seed=0,
                                        process_index=process_index, process_count=process_count)
    batches = take(iterator, steps)
    assert all(b["inputs"].shape == (8 // process_count, 16) for b in batches)
    rows.append(batches)
    if process_index == 0:
      state = iterator.get_state()
  for step in range(steps):
    for key in single[step]:
      np.testing.assert_array_equal(np.concatenate([r[step][key] for r in rows]), single[step][key])
  # Resume on one process from the P-process iterator state: the same stream continues.
  resumed = data.make_train_iterator(cfg, seq_len=16, global_batch_size=8, seed=0)
  resumed.set_state(state)
  reference = data.make_train_iterator(cfg, seq_len=16, global_batch_size=8, seed=0)
  take(reference, steps)
  assert row_keys(take(resumed, 3)) == row_keys(take(reference, 3))


def test_train_errors(train_corpus):
  cfg, windows, _ = train_corpus
  with pytest.raises(ValueError, match="not divisible by process_count=4"):
    data.make_train_iterator(cfg, seq_len=16, global_batch_size=6, seed=0, process_count=4)
  with pytest.raises(ValueError, match="seq_len=0"):
    data.make_train_iterator(cfg, seq_len=0, global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match=r"tokens.*lower the batch size or seq_len"):
    data.make_train_iterator(cfg, seq_len=16, global_batch_size=len(windows) + 1, seed=0)
  with pytest.raises(ValueError, match="'validation' of data.source='text_files' is empty"):
    data.make_eval_batches(cfg, seq_len=16, batch_size=2)


# ----------------------------------------------------------------------------------------------
# Evaluation batches.
# ----------------------------------------------------------------------------------------------


def test_eval_covers_every_heldout_token_once(tmp_path):
  contents = write_corpus(tmp_path / "corpus", 30, seed=5)
  cfg = text_cfg(tmp_path, tmp_path / "corpus" / "*.txt", heldout_fraction=0.25)
  stream = reference_stream(split_texts(contents, "validation", 0.25))
  batches = data.make_eval_batches(cfg, seq_len=16, batch_size=3)
  collected = list(batches)
  num_windows = math.ceil((len(stream) - 1) / 16)
  assert len(collected) == len(batches) == math.ceil(num_windows / 3)
  mask = np.concatenate([b["token_mask"].reshape(-1) for b in collected])
  targets = np.concatenate([b["targets"].reshape(-1) for b in collected])
  inputs = np.concatenate([b["inputs"].reshape(-1) for b in collected])
  np.testing.assert_array_equal(targets[mask], stream[1:])
  np.testing.assert_array_equal(inputs[mask], stream[:-1])
  assert mask.sum() == len(stream) - 1
  assert row_keys(list(batches)) == row_keys(collected)  # Re-iterable, deterministic.

  # Two processes: same number of batches, every target exactly once between them.
  by_window = {}
  lengths = set()
  for process_index in range(2):
    shard = data.make_eval_batches(cfg, seq_len=16, batch_size=3, process_index=process_index,
                                   process_count=2)
    lengths.add(len(shard))
    for number, batch in enumerate(shard):
      for row, window in enumerate(shard.window_indices(number)):
        if window >= 0:
          assert window not in by_window
          by_window[window] = batch["targets"][row][batch["token_mask"][row]]
        else:
          assert not batch["token_mask"][row].any()
  assert len(lengths) == 1
  np.testing.assert_array_equal(np.concatenate([by_window[w] for w in sorted(by_window)]),
                                stream[1:])
  assert len(data.make_eval_batches(cfg, seq_len=16, batch_size=3, max_batches=1)) == 1


# ----------------------------------------------------------------------------------------------
# Configuration and input errors.
# ----------------------------------------------------------------------------------------------


def test_validate_data_config_errors(tmp_path):
  cfg = default_cfg()
  data.validate_data_config(cfg)
  cfg.source = "wikipedia"
  # The choice check is the schema's (fields.from_mapping): it names the value and the choices.
  with pytest.raises(ValueError,
                     match=r"data\.source='wikipedia'; use one of \['stdlib', 'text_files', 'tfds'\]"):
    data.validate_data_config(cfg)
  cfg.source = "text_files"
  with pytest.raises(ValueError, match="data.text_files is empty"):
    data.validate_data_config(cfg)
  cfg.text_files = f"{tmp_path}/nothing_*.txt"
  with pytest.raises(ValueError, match="no files matched .*nothing_"):
    data.validate_data_config(cfg)
  cfg.source, cfg.text_files, cfg.eval_split = "stdlib", "", "test"
  with pytest.raises(ValueError, match="eval_split='test'"):
    data.validate_data_config(cfg)
  cfg.source, cfg.eval_split = "tfds", "validation"
  with pytest.raises(ValueError, match="needs data.tfds_name"):
    data.validate_data_config(cfg)
  cfg.tfds_name, cfg.heldout_fraction = "lm1b", 1.5
  with pytest.raises(ValueError, match="heldout_fraction"):
    data.validate_data_config(cfg)


def test_as_data_config_accepts_typed_configdict_and_dict():
  typed = schema.DataConfig(source="text_files", text_files="a.txt")
  assert data.as_data_config(typed) is typed
  assert data.as_data_config(default_cfg()) == schema.DataConfig()
  assert data.as_data_config({}) == schema.DataConfig()  # Missing keys take the schema defaults.
  assert data.as_data_config({"heldout_fraction": 0.5, "worker_count": 2}) == schema.DataConfig(
      heldout_fraction=0.5, worker_count=2)
  with pytest.raises(fields.ConfigError, match=r"data\.heldout_fraktion.*'data\.heldout_fraction'"):
    data.as_data_config({"heldout_fraktion": 0.1})
  for key, value in [("worker_count", -1), ("chunk_bytes", 0), ("read_threads", -1)]:
    with pytest.raises(ValueError, match=rf"data\.{key}={value} must be >= "):
      data.validate_data_config({key: value})


def test_empty_and_binary_files(tmp_path, capsys):
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="1 empty"):
    data.local_corpus_builder(text_cfg(tmp_path, tmp_path / "empty.txt"))
  (tmp_path / "blob.bin").write_bytes(b"\x89PNG\x00\x01\x02")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  with pytest.raises(ValueError, match="unreadable/binary"):
    data.local_corpus_builder(text_cfg(tmp_path, f"{tmp_path}/blob.bin,{tmp_path}/latin1.txt"))
  contents = write_corpus(tmp_path / "good", 8)
  capsys.readouterr()
  builder = data.local_corpus_builder(text_cfg(tmp_path, f"{tmp_path}/*.*, {tmp_path}/good"))
  err = capsys.readouterr().err
  assert "skipped 2 unreadable/binary" in err and "skipped 1 empty" in err
  paths = []
  for split in ("train", "validation"):
    source = builder.as_data_source(split=split)
    paths += [source[i]["path"].decode() for i in range(len(source))]
  assert sorted(paths) == sorted(f"good/{n}" for n in contents)


def test_single_small_file_needs_smaller_chunks(tmp_path):
  (tmp_path / "one.txt").write_text("line one\nline two\nline three\n" * 20)
  with pytest.raises(ValueError, match="too few for a train/validation split.*chunk_bytes"):
    data.local_corpus_builder(text_cfg(tmp_path, tmp_path / "one.txt"))
  builder = data.local_corpus_builder(text_cfg(tmp_path, tmp_path / "one.txt", chunk_bytes=64))
  assert len(builder.as_data_source(split="validation")) >= 1


def test_is_online_is_false_without_network():
  started = time.perf_counter()
  assert data.is_online(timeout_s=1.0) is False
  assert time.perf_counter() - started < 2


def test_tfds_unknown_name_offline(tmp_path, monkeypatch):
  monkeypatch.setattr(registered, "is_online", lambda *a, **k: False)
  cfg = default_cfg()
  cfg.source, cfg.tfds_name, cfg.data_dir = "tfds", "no_such_dataset_xyz", str(tmp_path)
  started = time.perf_counter()
  with pytest.raises(ValueError, match="unknown TFDS dataset .*no_such_dataset_xyz.*list_builders"):
    data.make_eval_batches(cfg, seq_len=16, batch_size=2)
  assert time.perf_counter() - started < 10


@pytest.mark.parametrize("name", ["tiny_shakespeare", "tiny_shakespeare:1.0.0"])
def test_tfds_not_prepared_offline_fails_fast(tmp_path, monkeypatch, name):
  calls = []
  monkeypatch.setattr(registered, "is_online", lambda *a, **k: calls.append(1) or False)
  cfg = default_cfg()
  cfg.source, cfg.tfds_name, cfg.data_dir = "tfds", name, str(tmp_path)
  started = time.perf_counter()
  with pytest.raises(ValueError, match="not prepared .* offline"):
    data.make_train_iterator(cfg, seq_len=16, global_batch_size=2, seed=0)
  assert calls and time.perf_counter() - started < 10


def test_tfds_prepared_dataset_is_read_offline(tmp_path, monkeypatch):
  """A registered dataset already prepared as array_record is read without any network check."""
  monkeypatch.setattr(registered, "is_online", lambda *a, **k: pytest.fail("network checked"))
  contents = write_corpus(tmp_path / "corpus", 12, seed=11)
  local = data.local_corpus_builder(text_cfg(tmp_path, tmp_path / "corpus", heldout_fraction=0.3))
  # Read the prepared local corpus through the registered-dataset path by its directory.
  monkeypatch.setattr(registered.tfds, "builder",
                      lambda name, **kwargs: data.TextCorpusBuilder(
                          data_dir=str(tmp_path / "tfds"), config=local.builder_config,
                          file_format="array_record"))
  monkeypatch.setattr(registered.tfds, "data_source",
                      lambda name, split, data_dir, download: local.as_data_source(split=split))
  cfg = default_cfg()
  cfg.source, cfg.tfds_name, cfg.data_dir = "tfds", "my_corpus", str(tmp_path / "tfds")
  stream = reference_stream(split_texts(contents, "validation", 0.3))
  batches = list(data.make_eval_batches(cfg, seq_len=8, batch_size=4))
  targets = np.concatenate([b["targets"][b["token_mask"]] for b in batches])
  np.testing.assert_array_equal(targets, stream[1:])
  cfg.eval_split = "test"
  with pytest.raises(ValueError, match="no split 'test'; available: train, validation"):
    data.make_eval_batches(cfg, seq_len=8, batch_size=4)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
