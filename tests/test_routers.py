"""The router protocol and registry (rectify_moe/routers), and the auxiliary-loss-free expert bias.

* The registry: every router is found by name; unknown names and capabilities a router lacks fail in one line.
* The protocol: a router written in this file, registered for one test, trains through the unchanged block, model
  and trainer (the plug-in promise).
* Expert bias (DeepSeek-V3): selection by probs + bias against the numpy loop reference of `route_top_k` (gates and
  combine weights stay unbiased), the update `b += rate * sign(mean(load) - load)` by hand, and in a real training
  run on mesh (2, 4): after every step the checkpointed bias equals the numpy update from the step's logged demand,
  it is the same on every device, and it is never trained.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import routing_reference as ref
import train_helpers
from test_routing import _table_to_dict, assert_tables_match, make_probs
from rectify_moe import checkpoints, moe, routers, routing, sharding, train_lib
from rectify_moe.config import schema
from rectify_moe.config.fields import ConfigError
from rectify_moe.config.schema import MoEConfig
from rectify_moe.routers import base, top_k


# ---------------------------------------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------------------------------------
def test_registry_names_every_router_module():
  assert routers.names() == ("top_k", "stablemoe", "hash", "expert_choice", "base_layer")
  for name in routers.names():
    assert issubclass(routers.get(name), base.Router)
    MoEConfig(router=name).validate()


def test_unknown_router_names_the_closest():
  with pytest.raises(ConfigError, match=r"moe.router='stablemo' is not a router\. Did you mean 'stablemoe'\?"):
    MoEConfig(router="stablemo").validate()


@pytest.mark.parametrize("router", ["stablemoe", "hash"])
@pytest.mark.parametrize("field, value", [("top_k", 2), ("fill_in", True), ("ir_mode", "all"),
                                          ("gating_dropout", 0.1), ("expert_bias_update_rate", 0.01)])
def test_greedy_routers_reject_rectification_and_bias(router, field, value):
  with pytest.raises(ConfigError, match=f"moe.router='{router}'|moe.expert_bias_update_rate"):
    MoEConfig(router=router, num_experts=8, **{field: value}).validate()


def test_describe_names_the_router_and_its_rectifications():
  assert moe.describe(MoEConfig(top_k=2, fill_in=True, ir_mode="ignore_kth")) == "Top-2+IR(ignore_kth)+FR"
  assert moe.describe(MoEConfig(expert_bias_update_rate=1e-3)) == "Top-1+bias"
  assert moe.describe(MoEConfig(router="stablemoe")) == "StableMoE"
  assert moe.describe(MoEConfig(router="hash")) == "Hash"


# ---------------------------------------------------------------------------------------------------------
# The protocol: a new router is a module and a registry entry, nothing else.
# ---------------------------------------------------------------------------------------------------------
class RoundRobinRouter(base.Router):
  """Token at position s goes to expert s mod E (weight 1); a per-expert counter of tokens seen is its state."""

  def __init__(self, cfg, *, d_model, vocab_size, rngs):
    super().__init__(cfg, d_model=d_model, vocab_size=vocab_size, rngs=rngs)
    self.seen = base.RouterState(jnp.zeros((cfg.num_experts,), jnp.float32))

  def route(self, x, ctx):
    groups, tokens = ctx.token_mask.shape
    choice = jnp.broadcast_to(jnp.arange(tokens) % self.cfg.num_experts, (groups, tokens))
    onehot = jax.nn.one_hot(choice, self.cfg.num_experts, dtype=jnp.float32)
    table = routing.route_top_k(onehot, top_k=1, capacity=ctx.capacity, combine="probs", token_mask=ctx.token_mask)
    return base.output(onehot, table)

  def after_step(self, metrics):
    self.seen[...] = self.seen[...] + metrics["counts"]["expert_demand"]


def test_a_new_router_trains_without_touching_block_model_or_trainer(tmp_path, monkeypatch):
  monkeypatch.setitem(routers.REGISTRY, "round_robin", RoundRobinRouter)
  config = train_helpers.tiny_config(tmp_path, steps=3)
  config.moe.update(dict(router="round_robin", fill_in=False, ir_mode=None))
  workdir = str(tmp_path / "run")
  summary = train_lib.train_and_evaluate(config, workdir)
  assert summary["step"] == 3 and np.isfinite(summary["train"]["loss"])
  ckpt = checkpoints.Checkpointer(workdir, read_only=True)
  seen = ckpt.manager.restore(3)["model"]["blocks"]["1"]["ffn"]["router"]["seen"]
  ckpt.close()
  tokens_per_step = config.train.batch_size * config.train.seq_len
  # Position s -> expert s mod E over 3 steps of full batches (the tiny corpus fills every window).
  np.testing.assert_array_equal(np.asarray(seen), np.full(8, 3 * tokens_per_step / 8))


# ---------------------------------------------------------------------------------------------------------
# Expert bias: selection, update, training.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("priority", ref.PRIORITIES)
@pytest.mark.parametrize("fill_in", [False, True])
def test_selection_bias_ranks_by_probs_plus_bias_and_gates_stay_unbiased(priority, fill_in):
  probs, mask = make_probs(7, 8, 9, 6)
  bias = (np.arange(6)[::-1] - 2.5).astype(np.float32) / 16  # large enough to reorder many choices
  kw = dict(top_k=2, capacity=3, priority=priority, fill_in=fill_in)
  got = _table_to_dict(routing.route_top_k(jnp.asarray(probs), token_mask=jnp.asarray(mask),
                                           selection_bias=jnp.asarray(bias), **kw))
  want = ref.route_top_k(probs, token_mask=mask, selection_bias=bias, **kw)
  assert_tables_match(got, want, ctx=f"bias {kw}")
  plain = ref.route_top_k(probs, token_mask=mask, **kw)
  assert (want["expert_index"] != plain["expert_index"]).any()  # the bias really changes the choices
  # Gates are the unbiased probabilities of the chosen experts.
  np.testing.assert_allclose(got["gate"], np.take_along_axis(probs, got["expert_index"], -1), rtol=1e-6)


def test_expert_bias_update_by_hand():
  bias = jnp.asarray([0.0, 0.5, -0.25, 0.0], jnp.float32)
  load = jnp.asarray([10.0, 2.0, 4.0, 4.0])  # mean 5: under-loaded experts gain, over-loaded lose
  np.testing.assert_allclose(top_k.expert_bias_update(bias, load, 0.125), [-0.125, 0.625, -0.125, 0.125])
  np.testing.assert_array_equal(top_k.expert_bias_update(bias, jnp.full(4, 3.0), 0.1), bias)  # balanced


def test_expert_bias_is_router_state_only_when_enabled():
  with jax.set_mesh(sharding.make_mesh(1, 1)):
    plain = moe.MoEBlock(MoEConfig(num_experts=4, expert_dim=8), d_model=8, rngs=nnx.Rngs(0))
    biased = moe.MoEBlock(MoEConfig(num_experts=4, expert_dim=8, expert_bias_update_rate=0.01), d_model=8,
                          rngs=nnx.Rngs(0))
  assert "expert_bias" not in nnx.to_pure_dict(nnx.state(plain))["router"]
  assert isinstance(biased.router.expert_bias, base.RouterState)
  assert not nnx.state(biased, nnx.Param).get("router", {}).get("expert_bias")


def test_expert_bias_training_follows_the_numpy_update_on_every_device(tmp_path):
  rate, steps = 0.05, 5
  config = train_helpers.tiny_config(tmp_path, mesh=(2, 4), steps=steps)
  config.moe.update(dict(expert_bias_update_rate=rate, fill_in=False, ir_mode=None))
  config.train.update(dict(aux_loss_weight=0.0, checkpoint_every=1, keep_checkpoints=100))
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "loads", "loads.jsonl")) as f:
    demand = {r["step"]: np.asarray(r["demand"][0], np.float64) for r in map(json.loads, f)}

  mesh = sharding.make_mesh(2, 4)
  _, state, shardings = train_lib.create_train_state(config, mesh)
  ckpt = checkpoints.Checkpointer(workdir, keep=100)
  want = np.zeros(8)
  try:
    for step in range(1, steps + 1):
      restored, _ = ckpt.restore(step, state, shardings)
      bias = restored[0]["blocks"][1]["ffn"]["router"]["expert_bias"][...]
      # Replicated: every device holds the same values.
      assert bias.sharding.is_fully_replicated
      shards = [np.asarray(s.data) for s in bias.addressable_shards]
      assert len(shards) == 8 and all(np.array_equal(s, shards[0]) for s in shards)
      want = want + rate * np.sign(demand[step].mean() - demand[step])  # the numpy reference update
      np.testing.assert_allclose(shards[0], want, atol=1e-6, err_msg=f"step {step}")
  finally:
    ckpt.close()
  assert np.abs(want).max() > 0  # the loads were unbalanced: the bias moved


def test_schema_has_the_bias_field_with_its_default_off():
  assert schema.MoEConfig().expert_bias_update_rate == 0.0
  with pytest.raises(ConfigError, match=r"moe.expert_bias_update_rate=-0.1 must be >= 0"):
    MoEConfig(expert_bias_update_rate=-0.1).validate()
