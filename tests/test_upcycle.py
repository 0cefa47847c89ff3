"""Upcycling a dense checkpoint into experts (rectify_moe/upcycle.py, `--config.init_from`).

* Equivalence at step 0, on meshes (1, 1), (2, 4) and (1, 8): the upcycled MoE gives the dense model's logits for
  Top-1 (straight-through) + IR at capacity factor 0.5, Top-2 + IR and Top-1 + IR + FR; vanilla Top-1 at 0.5 differs
  exactly by the dropped tokens' FFN output: equal to a reference that runs the dense model layer by layer and zeroes
  the FFN output of the tokens `routing.route_top_k` drops in each MoE layer.
* A dense run on one mesh upcycled on another; noise off gives identical experts, noise on independent copies; the
  run saves the upcycled model at step 0 and then trains; every error case is one line before anything compiles.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_helpers
from configs import dense as dense_config
from rectify_moe import checkpoints, evaluation, routing, sharding, train_lib, upcycle, variants
from rectify_moe import model as model_lib
from rectify_moe.config import schema
from rectify_moe.config.fields import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D_FF = 64


def _tiny(tmp_path, mesh, *, dense: bool, steps: int):
  config = train_helpers.tiny_config(tmp_path, mesh=mesh, steps=steps)
  config.model.update(dict(num_layers=4, d_ff=D_FF, moe_every=0 if dense else 2))
  config.moe.update(dict(expert_dim=D_FF, group_size=32, router_init_std=0.5))  # a decisive fresh router
  config.train.update(dict(checkpoint_every=steps, learning_rate=1e-2))
  return config


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
  """A dense tiny model trained a few steps on mesh (2, 4)."""
  tmp = tmp_path_factory.mktemp("dense")
  config = _tiny(tmp, (2, 4), dense=True, steps=6)
  workdir = str(tmp / "dense")
  train_lib.train_and_evaluate(config, workdir)
  return config, workdir, tmp


_DENSE = {}


def _upcycled(dense_run, tmp_path, mesh, moe_overrides, **top):
  """(mesh, MoE config, dense params, MoE model state upcycled at step 0) without an optimizer or training."""
  _, workdir, data_tmp = dense_run
  config = _tiny(data_tmp, mesh, dense=False, steps=1)
  config.moe.update(moe_overrides)
  config.init_from = workdir
  for k, v in top.items():
    config[k] = v
  cfg = schema.resolve(config)[0]
  m = sharding.make_mesh(*mesh)
  source = upcycle.check_source(cfg)
  if mesh not in _DENSE:
    _DENSE[mesh] = upcycle.load_dense(source, m)
  with jax.set_mesh(m):
    model = model_lib.TransformerLM(cfg.model, cfg.moe, rngs=nnx.Rngs(cfg.seed))
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, upcycle.upcycled_model(nnx.to_pure_dict(state), _DENSE[mesh], cfg))
  return m, cfg, _DENSE[mesh], state


def _logits(cfg, mesh, model_state, tokens, mask):
  graphdef, _ = model_lib.abstract_model(cfg, mesh)
  with jax.set_mesh(mesh):
    return np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, mask, train=False)[0])(model_state))


def _dense_reference(dense_cfg, dense_params, mesh, tokens, mask, *, routers=None, moe_cfg=None):
  """Dense logits, layer by layer; with `routers` {layer: kernel}, the FFN output of each token that vanilla routing
  (`routing.route_top_k` on the layer's own hidden states, the block's groups) does not accept is zeroed."""
  graphdef, abstract = model_lib.abstract_model(dense_cfg, mesh)
  nnx.replace_by_pure_dict(abstract, dense_params)
  with jax.set_mesh(mesh):
    return np.asarray(jax.jit(lambda s: _reference_forward(nnx.merge(graphdef, s), dense_cfg, tokens, mask, routers,
                                                           moe_cfg))(abstract))


def _reference_forward(model, dense_cfg, tokens, mask, routers, moe_cfg):
  x = jnp.take(model.embed[...], tokens, axis=0)
  for i, block in enumerate(model.blocks):
    x = x + block.attn(block.attn_norm(x))
    h = block.ffn_norm(x)
    out = block.ffn(h)
    if routers and i in routers:
      probs = jax.nn.softmax(h.astype(jnp.float32) @ routers[i], axis=-1).reshape(-1, moe_cfg.group_size,
                                                                                   moe_cfg.num_experts)
      table = routing.route_top_k(probs, top_k=moe_cfg.top_k, capacity=moe_cfg.capacity(False),
                                  priority=moe_cfg.priority, token_mask=mask.reshape(probs.shape[:2]))
      out = out * table.accepted.any(-1).reshape(mask.shape)[..., None]
    x = x + out
  x = model.final_norm(x)
  unembed = model.embed[...].T if dense_cfg.model.tie_embeddings else model.unembed[...]
  return jnp.einsum("btd,dv->btv", x, unembed)


def _batch(cfg):
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 259, (16, 32)).astype(np.int32)
  mask = np.ones(tokens.shape, bool)
  mask[3, 20:] = False
  return tokens, mask


EQUIVALENT = {  # the paper variant with an exact IR buffer at capacity factor 0.5
    "top1_ir": "top1_ir", "top2_ir": "top2_ir", "top1_ir_fr": "top1_ir_fr"}


@pytest.mark.parametrize("mesh", [(1, 1), (2, 4), (1, 8)])
def test_upcycled_moe_reproduces_the_dense_model_at_step_0(dense_run, tmp_path, mesh):
  dense_cfg = schema.parse(dense_run[0])
  for name in EQUIVALENT:
    overrides = dict(variants.overrides(name), capacity_factor=0.5, eval_capacity_factor=0.5)
    m, cfg, dense_params, state = _upcycled(dense_run, tmp_path, mesh, overrides)
    tokens, mask = _batch(cfg)
    got = _logits(cfg, m, state, tokens, mask)
    want = _dense_reference(dense_cfg, dense_params, m, tokens, mask)
    # Padding tokens (the end of row 3) get no MoE output: compare the valid ones.
    np.testing.assert_allclose(got[mask], want[mask], rtol=2e-4, atol=2e-4, err_msg=f"{name} on {mesh}")
  # Vanilla Top-1 at 0.5 drops tokens: it equals the dense model with those tokens' FFN output zeroed.
  overrides = dict(variants.overrides("top1"), capacity_factor=0.5, eval_capacity_factor=0.5)
  m, cfg, dense_params, state = _upcycled(dense_run, tmp_path, mesh, overrides)
  tokens, mask = _batch(cfg)
  got = _logits(cfg, m, state, tokens, mask)
  kernels = {i: np.asarray(state["blocks"][i]["ffn"]["router"]["kernel"][...])
             for i in cfg.model.moe_layer_indices}
  want = _dense_reference(dense_cfg, dense_params, m, tokens, mask, routers=kernels, moe_cfg=cfg.moe)
  np.testing.assert_allclose(got[mask], want[mask], rtol=2e-4, atol=2e-4, err_msg=f"vanilla on {mesh}")
  full = _dense_reference(dense_cfg, dense_params, m, tokens, mask)
  assert np.abs(got - full)[mask].max() > 1e-2  # tokens really dropped: the reference is not the dense model


def test_noise_off_copies_exactly_and_noise_on_gives_independent_experts(dense_run, tmp_path):
  _, _, dense_params, state = _upcycled(dense_run, tmp_path, (2, 4), {})
  w = np.asarray(state["blocks"][1]["ffn"]["w_up"][...])
  dense_w = np.asarray(dense_params["blocks"][1]["ffn"]["w_up"])
  assert w.shape == (8,) + dense_w.shape
  for e in range(8):
    np.testing.assert_array_equal(w[e], dense_w)
  _, _, _, noisy = _upcycled(dense_run, tmp_path, (2, 4), {}, init_noise=0.1)
  wn = np.asarray(noisy["blocks"][1]["ffn"]["w_up"][...])
  diffs = wn - dense_w[None]
  assert not np.allclose(diffs[0], diffs[1])  # each expert its own noise
  np.testing.assert_allclose(diffs.std(), 0.1 * dense_w.std(), rtol=0.05)
  # Experts are sharded on the expert axis; the router is fresh (not a dense parameter).
  assert state["blocks"][1]["ffn"]["w_up"][...].sharding.spec[0] == "expert"


def test_upcycled_run_on_another_mesh_saves_step_0_then_trains(dense_run, tmp_path):
  _, workdir, data_tmp = dense_run
  config = _tiny(data_tmp, (1, 8), dense=False, steps=3)
  config.moe.update(variants.overrides("top1_ir_fr"))
  config.init_from = os.path.join(workdir, "checkpoints", "6")  # a step folder works too
  run = str(tmp_path / "moe")
  summary = train_lib.train_and_evaluate(config, run)
  assert summary["step"] == 3
  assert checkpoints.Checkpointer(run, read_only=True).all_steps() == [0, 3]
  # eval.py --step=0 evaluates the upcycled model: the dense model's held-out loss (IR + FR, exact IR buffer), as
  # the dense run's own final evaluation logged it (the same held-out batches).
  step0 = evaluation.evaluate_checkpoint(None, run, step=0, write=False, log=lambda m: None)["routers"][0]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    dense_eval = [r for r in map(json.loads, f) if r["kind"] == "eval"][-1]
  assert dense_eval["step"] == 6 and step0["tokens"] == dense_eval["tokens"]
  assert step0["loss"] == pytest.approx(dense_eval["loss"], rel=1e-4)
  # A rerun resumes from the checkpoints; init_from no longer matters.
  config.train.steps = 4
  assert train_lib.train_and_evaluate(config, run)["step"] == 4


def _word_tokenizer(folder):
  """A two-word tokenizer.json (only its identity matters here)."""
  from tokenizers import Tokenizer, models
  path = str(folder / "tokenizer.json")
  Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(path)
  with open(folder / "config.json", "w") as f:
    json.dump({"eos_token_id": 1}, f)
  return path


def test_upcycling_errors_are_one_line_before_compiling(dense_run, tmp_path, monkeypatch):
  _, workdir, data_tmp = dense_run
  compiled = []
  monkeypatch.setattr(train_lib, "create_train_state", lambda *a, **k: compiled.append(1))
  moe_run = str(tmp_path / "moe_run")
  base = _tiny(data_tmp, (2, 4), dense=False, steps=1)
  cases = [
      (dict(init_from=str(tmp_path / "nowhere")), "does not exist"),
      (dict(init_from=str(tmp_path)), "holds no checkpoint"),
      (dict(init_from=workdir, model=dict(d_model=64, num_heads=2)), "model.d_model=64 here but 32 in the dense run"),
      (dict(init_from=workdir, model=dict(num_layers=6)), "model.num_layers=6 here but 4"),
      (dict(init_from=workdir, model=dict(vocab_size=300)), "model.vocab_size=300 here but 259"),
      (dict(init_from=workdir, moe=dict(expert_dim=32)), "moe.expert_dim=32 must equal the dense model.d_ff=64"),
      (dict(init_from=os.path.join(workdir, "checkpoints", "5")), "checkpoints/5' does not exist"),
      (dict(init_from=workdir, data=dict(tokenizer=_word_tokenizer(tmp_path))),
       r"data.tokenizer='.*tokenizer.json' here but 'byte' in the dense run"),
  ]
  for overrides, message in cases:
    config = _tiny(data_tmp, (2, 4), dense=False, steps=1)
    for key, value in overrides.items():
      if isinstance(value, dict):
        config[key].update(value)
      else:
        config[key] = value
    with pytest.raises(ConfigError, match=message) as info:
      train_lib.train_and_evaluate(config, moe_run)
    assert "\n" not in str(info.value)
  # An MoE checkpoint given where a dense one is expected.
  moe_source = str(tmp_path / "moe_source")
  os.makedirs(os.path.join(moe_source, "checkpoints", "1"))
  with open(os.path.join(moe_source, "config.json"), "w") as f:
    json.dump(base.to_dict(), f)
  config = _tiny(data_tmp, (2, 4), dense=False, steps=1)
  config.init_from = moe_source
  with pytest.raises(ConfigError, match="is an MoE run"):
    train_lib.train_and_evaluate(config, moe_run)
  assert not compiled


def test_dense_config_is_the_default_model_without_experts():
  cfg = schema.parse(dense_config.get_config())
  assert cfg.model.num_moe_layers == 0
  assert dataclasses.replace(cfg.model, moe_every=2) == schema.parse(__import__("configs.default").default.get_config()).model
