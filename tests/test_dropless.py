"""Dropless dispatch (rectify_moe/dropless.py): equal to the capacity path when nothing is dropped.

At capacity factor E/k the capacity path drops nothing (C = S), so it computes the same function as the dropless
path: values and gradients agree on meshes (1, 1), (2, 4) and (1, 8). On CPU the sharded meshes run the emulated
ragged exchange (all_to_all of worst-case blocks), so the sharded dropless results against the one-device capacity
result are also the test of that exchange; `emulated_ragged_all_to_all` is checked against a numpy model of
`jax.lax.ragged_all_to_all` as well. One jitted program per mesh (both dispatches, two configs).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rectify_moe import dropless, moe, sharding
from rectify_moe.config.fields import ConfigError
from rectify_moe.config.schema import MoEConfig

D, F, B, T, S, E = 8, 16, 8, 16, 8, 8
TOL = dict(rtol=2e-5, atol=2e-5)
CFGS = (MoEConfig(num_experts=E, expert_dim=F, group_size=S, top_k=2, capacity_factor=E / 2),
        MoEConfig(num_experts=E, expert_dim=F, group_size=S, top_k=1, capacity_factor=float(E),
                  straight_through=True, activation="gelu", dispatch="index"))
_CACHE = {}


def _params(cfg, seed=0):
  rng = np.random.RandomState(seed)
  p = {"router": {"kernel": rng.randn(D, E).astype(np.float32)},
       "w_up": (rng.randn(E, D, F) / np.sqrt(D)).astype(np.float32),
       "w_down": (rng.randn(E, F, D) / np.sqrt(F)).astype(np.float32)}
  if cfg.activation == "swiglu":
    p["w_gate"] = (rng.randn(E, D, F) / np.sqrt(D)).astype(np.float32)
  return p


def _run(mesh_shape):
  """{(config index, dispatch): (loss, y, grads)} for both configs, capacity and dropless, on one mesh."""
  if mesh_shape in _CACHE:
    return _CACHE[mesh_shape]
  rng = np.random.RandomState(1)
  x = rng.randn(B, T, D).astype(np.float32)
  cot = rng.randn(B, T, D).astype(np.float32)
  mask = rng.rand(B, T) > 0.25
  mesh = sharding.make_mesh(*mesh_shape)
  cfgs = [(i, name, c if name == "capacity" else dataclasses.replace(c, dispatch="dropless"))
          for i, c in enumerate(CFGS) for name in ("capacity", "dropless")]
  graphdefs, states = [], []
  with jax.set_mesh(mesh):
    for i, _, cfg in cfgs:
      graphdef, state = nnx.split(moe.MoEBlock(cfg, d_model=D, rngs=nnx.Rngs(0)))
      nnx.replace_by_pure_dict(state, _params(CFGS[i]))
      graphdefs.append(graphdef)
      states.append(state)

    def loss_fn(state, x, graphdef):
      y, metrics = nnx.merge(graphdef, state)(x, mask)
      return jnp.sum(y * cot) + 0.1 * metrics["losses"]["aux_loss"], (y, metrics["counts"])

    def all_cfgs(states, x):
      return [jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(s, x, g) for s, g in zip(states, graphdefs)]

    # LLVM -O0 (as tests/test_moe.py): the same XLA program, about half the compile time.
    outs = jax.device_get(jax.jit(all_cfgs, compiler_options={"xla_backend_optimization_level": 0})(states, x))
  result = {}
  for (i, name, _), ((loss, (y, counts)), (g_state, g_x)) in zip(cfgs, outs):
    result[(i, name)] = dict(loss=float(loss), y=np.asarray(y), counts=counts, gx=np.asarray(g_x),
                             grads=jax.tree.map(np.asarray, nnx.to_pure_dict(g_state)))
  _CACHE[mesh_shape] = result
  return result


@pytest.mark.parametrize("mesh_shape", [(1, 1), (2, 4), (1, 8)])
def test_dropless_equals_capacity_path_without_drops(mesh_shape):
  got, single = _run(mesh_shape), _run((1, 1))
  for i in range(len(CFGS)):
    cap = single[(i, "capacity")]
    assert float(cap["counts"]["dropped_choices"]) == 0  # the capacity path really drops nothing here
    for name in ("capacity", "dropless"):
      r = got[(i, name)]
      np.testing.assert_allclose(r["y"], cap["y"], **TOL)
      np.testing.assert_allclose(r["loss"], cap["loss"], **TOL)
      np.testing.assert_allclose(r["gx"], cap["gx"], **TOL)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), r["grads"], cap["grads"])
    dl = got[(i, "dropless")]["counts"]
    assert float(dl["slots"]) == float(dl["filled_slots"]) == CFGS[i].top_k * float(dl["tokens"])


def _numpy_ragged_all_to_all(operands, outputs, input_offsets, send_sizes, output_offsets):
  """The documented semantics, shard by shard: sender i's rows for j land in j's output at i's offset."""
  outputs = [o.copy() for o in outputs]
  n = len(operands)
  for i in range(n):
    for j in range(n):
      a, size, o = input_offsets[i][j], send_sizes[i][j], output_offsets[i][j]
      outputs[j][o:o + size] = operands[i][a:a + size]
  return outputs


def test_emulated_exchange_matches_ragged_all_to_all_semantics():
  n, rows, width, capacity = 4, 6, 3, 24
  rng = np.random.RandomState(0)
  operands = rng.randn(n, rows, width).astype(np.float32)
  sizes = np.stack([rng.multinomial(rng.randint(0, rows + 1), np.ones(n) / n) for _ in range(n)])  # [i, j]
  input_offsets = np.cumsum(sizes, axis=1) - sizes
  arrival = np.cumsum(sizes, axis=0) - sizes
  output_offsets = arrival  # [i, j]: where i's rows start at j
  outputs = np.full((n, capacity, width), -1.0, np.float32)
  expected = _numpy_ragged_all_to_all(list(operands), list(outputs), input_offsets, sizes, output_offsets)
  mesh = jax.make_mesh((n,), ("x",), devices=jax.devices()[:n])

  def body(op, out, a, s, o, r):
    return dropless.emulated_ragged_all_to_all(op[0], out[0], a[0], s[0], o[0], r[0], axis_name="x")[None]

  fn = jax.shard_map(body, mesh=mesh, in_specs=(P("x"),) * 6, out_specs=P("x"))
  args = (operands, outputs, input_offsets.astype(np.int32), sizes.astype(np.int32),
          output_offsets.astype(np.int32), sizes.T.astype(np.int32))
  got = fn(*[jax.device_put(a, jax.NamedSharding(mesh, P("x"))) for a in args])
  np.testing.assert_array_equal(np.asarray(got), np.stack(expected))


def test_ragged_all_to_all_program_traces_forward_and_backward(monkeypatch):
  """The GPU/TPU exchange cannot run on XLA:CPU; lowering (no compile) checks its shapes, types and transpose."""
  monkeypatch.setattr(dropless, "EXCHANGE", "ragged")
  cfg = dataclasses.replace(CFGS[0], dispatch="dropless")
  mesh = sharding.make_mesh(2, 4)
  x = np.ones((B, T, D), np.float32)
  with jax.set_mesh(mesh):
    graphdef, state = nnx.split(moe.MoEBlock(cfg, d_model=D, rngs=nnx.Rngs(0)))
    loss = lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x)[0])
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).as_text()
  assert text.count("ragged_all_to_all") >= 4  # two exchanges forward, their transposes backward


@pytest.mark.parametrize("overrides, field", [
    (dict(ir_mode="all"), "moe.ir_mode"),
    (dict(fill_in=True), "moe.fill_in"),
    (dict(gating_dropout=0.1), "moe.gating_dropout"),
])
def test_bad_dropless_configs_give_one_line_errors(overrides, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as err:
    MoEConfig(num_experts=E, top_k=1, group_size=S, dispatch="dropless", **overrides).validate()
  assert "\n" not in str(err.value) and "moe.dispatch" in str(err.value)


def test_reference_config_turns_off_rectification():
  cfg = MoEConfig(num_experts=E, top_k=2, group_size=S, fill_in=True, ir_mode="ignore_kth", capacity_factor=0.5)
  ref = dropless.reference_config(cfg)
  assert (ref.dispatch, ref.fill_in, ref.ir_mode, ref.top_k, ref.router) == ("dropless", False, None, 2, "top_k")
  ref.validate()
