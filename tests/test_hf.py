"""Hugging Face Llama-family folders (rectify_moe/hf): import, tokenizer, evaluation, export, upcycling, errors.

Every checkpoint is written by the test: random float32 tensors saved with safetensors' numpy API, a config.json,
and a tokenizer.json trained here with the `tokenizers` package. The reference is an independent numpy forward pass
of the family, written from its definition (RMSNorm, rotate-half RoPE on q and k, grouped-query attention with
repeated K/V heads, SwiGLU MLP, tied or untied head) over the Hugging Face tensors as stored ([out, in]).
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import train_helpers
from rectify_moe import data as data_lib
from rectify_moe import evaluation, sharding, upcycle, variants
from rectify_moe import model as model_lib
from rectify_moe.config import schema
from rectify_moe.config.fields import ConfigError
from rectify_moe.hf import config as hf_config
from rectify_moe.hf import export as hf_export
from rectify_moe.hf import weights as hf_weights

VOCAB, D, HEADS, LAYERS, FF = 300, 32, 4, 2, 48
# name -> (architecture, num_key_value_heads, tie_word_embeddings, attention_bias (Llama: q, k, v and o))
CASES = {
    "qwen2_gqa_tied": ("Qwen2ForCausalLM", 2, True, False),  # Qwen2: q/k/v biases, no output bias
    "llama_mha_untied": ("LlamaForCausalLM", 4, False, False),
    "llama_gqa_untied_bias": ("LlamaForCausalLM", 1, False, True),
}


# ---------------------------------------------------------------------------------------------------------
# The checkpoints.
# ---------------------------------------------------------------------------------------------------------
def _hf_config(arch, kv, tied, bias):
  out = dict(architectures=[arch], model_type={"Qwen2ForCausalLM": "qwen2"}.get(arch, "llama"), vocab_size=VOCAB,
             hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=kv,
             intermediate_size=FF, rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=tied, hidden_act="silu",
             max_position_embeddings=128, rope_scaling=None, bos_token_id=1, eos_token_id=2, torch_dtype="float32")
  if arch == "LlamaForCausalLM":
    out["attention_bias"] = bias
  return out


def _tensors(cfg, seed):
  rng = np.random.default_rng(seed)
  dh = cfg["hidden_size"] // cfg["num_attention_heads"]
  q, kv = cfg["num_attention_heads"] * dh, cfg["num_key_value_heads"] * dh
  w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
  out = {"model.embed_tokens.weight": w(VOCAB, D), "model.norm.weight": 1 + 0.1 * w(D)}
  qkv_bias = cfg["architectures"][0] == "Qwen2ForCausalLM" or cfg.get("attention_bias")
  for i in range(LAYERS):
    p = f"model.layers.{i}."
    out.update({p + "input_layernorm.weight": 1 + 0.1 * w(D), p + "post_attention_layernorm.weight": 1 + 0.1 * w(D),
                p + "self_attn.q_proj.weight": w(q, D), p + "self_attn.k_proj.weight": w(kv, D),
                p + "self_attn.v_proj.weight": w(kv, D), p + "self_attn.o_proj.weight": w(D, q),
                p + "mlp.gate_proj.weight": w(FF, D), p + "mlp.up_proj.weight": w(FF, D),
                p + "mlp.down_proj.weight": w(D, FF)})
    if qkv_bias:
      out.update({p + "self_attn.q_proj.bias": w(q), p + "self_attn.k_proj.bias": w(kv),
                  p + "self_attn.v_proj.bias": w(kv)})
    if cfg.get("attention_bias"):
      out[p + "self_attn.o_proj.bias"] = w(D)
  if not cfg["tie_word_embeddings"]:
    out["lm_head.weight"] = w(VOCAB, D)
  return out


def _tokenizer_json(path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB - 20, special_tokens=["<unk>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  text = open(train_helpers.write_corpus(os.path.join(os.path.dirname(path), "corpus_for_bpe"))[:-5] + "doc0.txt")
  tok.train_from_iterator(text.read().splitlines(), trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  tok.save(path)


def write_checkpoint(folder, name, *, seed=0, sharded=False):
  cfg = _hf_config(*CASES[name])
  tensors = _tensors(cfg, seed)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)
  if sharded:  # two shards and an index
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in parts.items():
      save_file({n: tensors[n] for n in part}, os.path.join(folder, file))
    with open(os.path.join(folder, hf_weights.INDEX), "w") as f:
      json.dump({"weight_map": {n: file for file, part in parts.items() for n in part}}, f)
  else:
    save_file(tensors, os.path.join(folder, "model.safetensors"))
  _tokenizer_json(os.path.join(folder, "tokenizer.json"))
  return cfg, tensors


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  return {name: (str(root / name), *write_checkpoint(str(root / name), name, seed=i, sharded=i == 2))
          for i, name in enumerate(CASES)}


# ---------------------------------------------------------------------------------------------------------
# The independent numpy forward pass.
# ---------------------------------------------------------------------------------------------------------
def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, theta):  # x [T, H, Dh], rotate-half convention
  t, _, dh = x.shape
  inv = 1.0 / theta ** (np.arange(0, dh, 2) / dh)
  ang = np.arange(t)[:, None] * inv[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
  rot = np.concatenate([-x[..., dh // 2:], x[..., :dh // 2]], -1)
  return x * cos + rot * sin


def reference_logits(cfg, t, tokens):
  """float64 logits [B, T, V] of the Llama family from the Hugging Face tensors."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  heads, kv, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
  dh = cfg["hidden_size"] // heads
  lin = lambda x, name: x @ t[name + ".weight"].T + t.get(name + ".bias", 0.0)
  out = []
  for row in tokens:
    x = t["model.embed_tokens.weight"][row]
    seq = len(row)
    for i in range(cfg["num_hidden_layers"]):
      p = f"model.layers.{i}."
      h = _rms(x, t[p + "input_layernorm.weight"], eps)
      q = _rope(lin(h, p + "self_attn.q_proj").reshape(seq, heads, dh), cfg["rope_theta"])
      k = _rope(lin(h, p + "self_attn.k_proj").reshape(seq, kv, dh), cfg["rope_theta"])
      v = lin(h, p + "self_attn.v_proj").reshape(seq, kv, dh)
      k, v = np.repeat(k, heads // kv, axis=1), np.repeat(v, heads // kv, axis=1)
      # Shape: [H, T, T] = einsum("qhd,khd->hqk")
      s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(dh)
      s = np.where(np.tril(np.ones((seq, seq), bool)), s, -np.inf)
      a = np.exp(s - s.max(-1, keepdims=True))
      a /= a.sum(-1, keepdims=True)
      # Shape: [T, H, Dh] = einsum("hqk,khd->qhd")
      x = x + lin(np.einsum("hqk,khd->qhd", a, v).reshape(seq, heads * dh), p + "self_attn.o_proj")
      h = _rms(x, t[p + "post_attention_layernorm.weight"], eps)
      x = x + (_mixtral_moe(cfg, t, p, h, lin) if "num_local_experts" in cfg else _swiglu(h, p + "mlp", lin))
    head = t["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else t["lm_head.weight"]
    out.append(_rms(x, t["model.norm.weight"], eps) @ head.T)
  return np.stack(out)


def _swiglu(h, prefix, lin, names=("gate_proj", "up_proj", "down_proj")):
  g = lin(h, f"{prefix}.{names[0]}")
  return lin(g / (1 + np.exp(-g)) * lin(h, f"{prefix}.{names[1]}"), f"{prefix}.{names[2]}")


def _mixtral_moe(cfg, t, p, h, lin):
  """Mixtral's sparse MoE block: softmax router, top-k, weights renormalised over the k, no capacity."""
  probs = lin(h, p + "block_sparse_moe.gate")
  probs = np.exp(probs - probs.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  k = cfg["num_experts_per_tok"]
  top = np.argsort(-probs, -1)[:, :k]
  weights = np.take_along_axis(probs, top, -1)
  weights /= weights.sum(-1, keepdims=True)
  out = np.zeros_like(h)
  for e in range(cfg["num_local_experts"]):
    y = _swiglu(h, f"{p}block_sparse_moe.experts.{e}", lin, ("w1", "w3", "w2"))
    out += ((top == e) * weights).sum(-1, keepdims=True) * y
  return out


# ---------------------------------------------------------------------------------------------------------
# Our side.
# ---------------------------------------------------------------------------------------------------------
def _dense_cfg(folder, **model):
  cfg = schema.parse(dict(init_from="hf:" + folder, model=dict(moe_every=0, **model)))
  return schema.resolve(cfg)[0]


def _import(folder, mesh_shape):
  cfg = _dense_cfg(folder)
  mesh = sharding.make_mesh(*mesh_shape)
  return cfg, mesh, hf_weights.load(folder, cfg.model, mesh)


def _logits(cfg, mesh, params, tokens):
  graphdef, state = model_lib.abstract_model(cfg, mesh)
  nnx.replace_by_pure_dict(state, params)
  with jax.set_mesh(mesh):
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False)[0])(state, tokens))


TOKENS = np.random.default_rng(0).integers(0, VOCAB, (8, 16)).astype(np.int32)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mesh_shape", [(1, 1), (2, 4)])
def test_imported_logits_equal_the_numpy_reference(checkpoints, name, mesh_shape):
  folder, hf, tensors = checkpoints[name]
  cfg, mesh, params = _import(folder, mesh_shape)
  assert cfg.model.kv_heads == hf["num_key_value_heads"] and cfg.model.tie_embeddings == hf["tie_word_embeddings"]
  assert cfg.data.tokenizer == "hf:" + folder  # the folder's tokenizer by default
  assert params["embed"].sharding.mesh.shape == mesh.shape
  got = _logits(cfg, mesh, params, TOKENS)
  want = reference_logits(hf, tensors, TOKENS)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bfloat16_parameters_load_and_stay_close(checkpoints):
  folder, hf, tensors = checkpoints["llama_mha_untied"]
  cfg = _dense_cfg(folder, param_dtype="bfloat16")
  mesh = sharding.make_mesh(1, 1)
  params = hf_weights.load(folder, cfg.model, mesh)
  assert params["blocks"][0]["attn"]["wq"].dtype == jnp.bfloat16
  assert params["blocks"][0]["attn_norm"]["scale"].dtype == jnp.float32  # norms stay float32
  got = _logits(cfg, mesh, params, TOKENS[:2])
  np.testing.assert_allclose(got, reference_logits(hf, tensors, TOKENS[:2]), atol=0.1)


def test_export_then_import_gives_identical_parameters(checkpoints, tmp_path):
  folder, hf, _ = checkpoints["qwen2_gqa_tied"]
  cfg, mesh, params = _import(folder, (2, 4))
  out = str(tmp_path / "exported")
  written = hf_export.export(params, cfg.model, out, source_dir=folder, max_shard_bytes=20_000)
  assert hf_weights.INDEX in written and "tokenizer.json" in written  # sharded, tokenizer carried over
  exported = hf_config.read(out)
  assert exported["architectures"] == ["Qwen2ForCausalLM"] and exported["bos_token_id"] == hf["bos_token_id"]
  again = _dense_cfg(out)
  assert again.model == cfg.model
  params2 = hf_weights.load(out, again.model, mesh)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
  # An MoE model is refused with one line.
  with pytest.raises(ConfigError, match="no Hugging Face counterpart") as e:
    hf_export.export(params, dataclasses.replace(cfg.model, moe_every=2), str(tmp_path / "moe"))
  assert "\n" not in str(e.value)


def test_upcycling_an_imported_model_at_step_0_reproduces_its_logits_under_top1_ir(checkpoints, tmp_path):
  folder, hf, tensors = checkpoints["qwen2_gqa_tied"]
  config = schema.default_config()
  config.init_from = "hf:" + folder
  config.model.moe_every = 2
  config.moe.update(dict(variants.overrides("top1_ir"), num_experts=8, expert_dim=FF, group_size=32,
                         router_init_std=0.5, capacity_factor=0.5, eval_capacity_factor=0.5))
  cfg = schema.resolve(config)[0]
  assert cfg.model.d_model == D and cfg.model.num_moe_layers == 1
  source = upcycle.check_source(cfg)
  mesh = sharding.make_mesh(2, 4)
  dense = upcycle.load_dense(source, mesh)
  with jax.set_mesh(mesh):
    model = model_lib.TransformerLM(cfg.model, cfg.moe, rngs=nnx.Rngs(cfg.seed))
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, upcycle.upcycled_model(nnx.to_pure_dict(state), dense, cfg))
  tokens = np.random.default_rng(1).integers(0, VOCAB, (16, 32)).astype(np.int32)
  with jax.set_mesh(mesh):
    got = np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, train=False)[0])(state))
  np.testing.assert_allclose(got, reference_logits(hf, tensors, tokens), rtol=2e-4, atol=2e-4)
  # With model.moe_every=2 the experts of layer 1 are copies of its dense FFN.
  w = np.asarray(state["blocks"][1]["ffn"]["w_up"][...])
  np.testing.assert_array_equal(w[3], tensors["model.layers.1.mlp.up_proj.weight"].T)


def test_an_upcycled_vanilla_top2_moe_exports_as_mixtral_and_rectify_routers_are_refused(checkpoints, tmp_path):
  folder = checkpoints["llama_mha_untied"][0]
  config = schema.default_config()
  config.update(dict(init_from="hf:" + folder, init_noise=0.2))
  config.model.moe_every = 1
  config.moe.update(dict(variants.overrides("top2"), num_experts=8, expert_dim=FF, group_size=32,
                         router_init_std=0.5, eval_capacity_factor=4.0))  # C = S: dropless, as Mixtral
  cfg = schema.resolve(config)[0]
  mesh = sharding.make_mesh(2, 4)
  dense = upcycle.load_dense(upcycle.check_source(cfg), mesh)
  with jax.set_mesh(mesh):
    model = model_lib.TransformerLM(cfg.model, cfg.moe, rngs=nnx.Rngs(cfg.seed))
  graphdef, state = nnx.split(model)
  params = upcycle.upcycled_model(nnx.to_pure_dict(state), dense, cfg)
  out = str(tmp_path / "mixtral")
  hf_export.export(params, cfg.model, out, moe=cfg.moe)
  hf = hf_config.read(out)
  assert hf["architectures"] == ["MixtralForCausalLM"] and hf["num_experts_per_tok"] == 2
  assert hf["intermediate_size"] == cfg.moe.expert_dim and hf["num_local_experts"] == 8
  from safetensors.numpy import load_file
  tensors = load_file(os.path.join(out, "model.safetensors"))
  tokens = np.random.default_rng(2).integers(0, VOCAB, (16, 32)).astype(np.int32)
  got = _logits(cfg, mesh, params, tokens)
  want = reference_logits(hf, tensors, tokens)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  assert np.abs(want - reference_logits(hf_config.read(folder), checkpoints["llama_mha_untied"][2], tokens)).max() \
      > 1e-2  # the noisy experts and the routing matter
  ir = dataclasses.replace(cfg.moe, **variants.overrides("top1_ir"))
  with pytest.raises(ConfigError, match=r"moe.ir_mode='all'.*MixtralForCausalLM") as e:
    hf_export.export(params, cfg.model, str(tmp_path / "ir"), moe=ir)
  assert "\n" not in str(e.value)


def test_tokenizer_json_packs_documents_with_bos_and_eos_and_eval_matches_reference(checkpoints, tmp_path):
  folder, hf, tensors = checkpoints["llama_mha_untied"]
  tok = data_lib.load_tokenizer("hf:" + folder)
  assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)  # the post-processor adds <s>, config.json's ids
  ids = tok.encode("the router sends")
  assert tok.decode(ids) == "the router sends" and len(ids) < len("the router sends")
  docs = ["the router sends every token", "to its best expert"]
  windows = data_lib.PackedWindows(docs, seq_len=8, tokenizer=tok)
  stream = np.concatenate([[1, *tok.encode(d), 2] for d in docs])
  assert windows.num_tokens == len(stream)
  np.testing.assert_array_equal(windows.stream_slice(0, len(stream)), stream)
  n = min(len(stream), 16) - 8
  np.testing.assert_array_equal(windows[1]["inputs"][:n], stream[8: 8 + n])
  # eval.py --init_from=hf:DIR on text files: the held-out loss of the numpy reference on the same windows.
  config = train_helpers.tiny_config(tmp_path, mesh=(2, 4))
  config.train.update(dict(seq_len=16, eval_batch_size=8))
  out = str(tmp_path / "eval_out")
  results = evaluation.evaluate_checkpoint(config, None, init_from="hf:" + folder, eval_batches=1,
                                           output_dir=out, plots=False, log=lambda m: None)
  row = results["routers"][0]
  assert os.path.isfile(os.path.join(out, "results.json"))
  cfg = schema.resolve(dict(config.to_dict(), init_from="hf:" + folder))[0]
  batch = next(iter(data_lib.make_eval_batches(cfg.data, seq_len=16, batch_size=8, max_batches=1)))
  assert batch["inputs"].max() >= 259  # the BPE ids, not bytes
  logits = reference_logits(hf, tensors, batch["inputs"])
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
      logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  assert row["tokens"] == batch["token_mask"].sum()
  assert row["loss"] == pytest.approx(nll[batch["token_mask"]].mean(), rel=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Errors: one line each, naming the field or file.
# ---------------------------------------------------------------------------------------------------------
def _broken(checkpoints, tmp_path, edit_config=None, edit_files=None):
  folder = str(tmp_path / "broken")
  shutil.copytree(checkpoints["llama_mha_untied"][0], folder)
  if edit_config:
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    edit_config(cfg)
    json.dump(cfg, open(path, "w"))
  if edit_files:
    edit_files(folder)
  return folder


def _load_everything(folder):
  cfg = schema.parse(dict(init_from="hf:" + folder, model=dict(moe_every=0)))
  cfg = upcycle.check_source(schema.resolve(cfg)[0]).config
  hf_weights.load(folder, cfg.model, sharding.make_mesh(1, 1))


def _save(folder, tensors):
  os.remove(os.path.join(folder, "model.safetensors"))
  save_file(tensors, os.path.join(folder, "model.safetensors"))


def test_every_error_is_one_line(checkpoints, tmp_path):
  _, _, tensors = checkpoints["llama_mha_untied"]
  wrong_dtype = dict(tensors, **{"model.norm.weight": np.ones(D, np.int32)})
  wrong_shape = dict(tensors, **{"model.layers.0.mlp.up_proj.weight": np.ones((FF + 1, D), np.float32)})
  missing = {k: v for k, v in tensors.items() if k != "lm_head.weight"}

  def split_index(folder):
    os.rename(os.path.join(folder, "model.safetensors"), os.path.join(folder, "model-00001-of-00002.safetensors"))
    json.dump({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                              "lm_head.weight": "model-00002-of-00002.safetensors"}},
              open(os.path.join(folder, hf_weights.INDEX), "w"))

  cases = [
      (dict(edit_files=lambda f: os.remove(os.path.join(f, "config.json"))), "config.json is missing"),
      (dict(edit_files=lambda f: os.remove(os.path.join(f, "model.safetensors"))), "holds no *.safetensors"),
      (dict(edit_config=lambda c: c.update(architectures=["GPT2LMHeadModel"])),
       "architectures=['GPT2LMHeadModel'] is outside the Llama family"),
      (dict(edit_config=lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": 8.0})), "rope_scaling="),
      (dict(edit_config=lambda c: c.update(architectures=["MistralForCausalLM"], sliding_window=4096)),
       "sliding_window=4096"),
      (dict(edit_config=lambda c: c.update(hidden_act="gelu")), "hidden_act='gelu'"),
      (dict(edit_config=lambda c: c.pop("hidden_size")), "'hidden_size' is missing"),
      (dict(edit_files=lambda f: _save(f, wrong_dtype)), "'model.norm.weight' has dtype I32"),
      (dict(edit_files=lambda f: _save(f, wrong_shape)), "has shape (49, 32), but config.json gives (48, 32)"),
      (dict(edit_files=lambda f: _save(f, missing)), "'lm_head.weight' is missing (config.json says tie_word"),
      (dict(edit_files=split_index), "names shard 'model-00002-of-00002.safetensors', which is missing"),
  ]
  for kwargs, message in cases:
    folder = _broken(checkpoints, tmp_path, **kwargs)
    with pytest.raises(ConfigError) as e:
      _load_everything(folder)
    assert message in str(e.value) and "\n" not in str(e.value), (message, str(e.value))
    shutil.rmtree(folder)
  with pytest.raises(ConfigError, match="no such directory"):
    upcycle.check_source(schema.parse(dict(init_from="hf:" + str(tmp_path / "nowhere"))))
  with pytest.raises(ConfigError, match="tokenizer.json is missing"):
    data_lib.load_tokenizer("hf:" + str(tmp_path))


def test_train_py_upcycles_an_imported_model_with_its_tokenizer(checkpoints, tmp_path):
  from rectify_moe import train_lib
  folder = checkpoints["qwen2_gqa_tied"][0]
  config = train_helpers.tiny_config(tmp_path, mesh=(2, 4), steps=1)
  config.init_from = "hf:" + folder
  config.moe.update(dict(variants.overrides("top1_ir"), expert_dim=FF))
  run = str(tmp_path / "run")
  summary = train_lib.train_and_evaluate(config, run)
  assert summary["step"] == 1 and np.isfinite(summary["train"]["loss"])
  saved = json.load(open(os.path.join(run, "config.json")))
  assert saved["model"]["num_kv_heads"] == 2 and saved["model"]["qkv_bias"] and saved["data"]["tokenizer"] == \
      "hf:" + folder


def test_a_study_can_start_from_an_imported_model(checkpoints):
  from rectify_moe.study import config as study_config
  from rectify_moe.study import runner
  folder = checkpoints["qwen2_gqa_tied"][0]
  study = study_config.default_study()
  study.dense_from = "hf:" + folder
  study = runner.imported(study_config.parse(study))
  assert study.run.model.kv_heads == 2 and study.run.data.tokenizer == "hf:" + folder
  config = runner.run_config(study, runner.plan(study)[0], study.dense_from)
  cfg = schema.resolve(config)[0]
  assert cfg.init_from == "hf:" + folder and cfg.moe.expert_dim == FF and cfg.model.num_moe_layers == 1
  upcycle.check_source(cfg)  # the runs upcycle the imported model
  with pytest.raises(ConfigError, match="study.dense_from='runs/x'"):
    study_config.parse(dict(dense_from="runs/x")).validate()
