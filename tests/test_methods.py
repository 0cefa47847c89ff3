"""StableMoE, Gating Dropout (and Gate-Expert-Drop) and hash layers against independent references.

Semantics are from /work/shared/specs/other_methods.md (A: StableMoE, B: Gating Dropout, D.1: hash
layers). The numpy references (float64, loops over tokens) are in ``methods_reference.py``.

* StableMoE: the balance and distillation losses and their gradients; stage-1 / stage-2 / eval routing of
  the StableMoE router and of the sharded block; the optimizer freeze (`freeze_after`) on a toy chain and in a
  real training run (checkpoints every step, switch at step 3).
* Gating Dropout: the drop rate of `gating_dropout_decision` under the trainer's keys; the dropped step's
  output against a per-device local-only reference; Gate-Expert-Drop's zero output; no all-to-all in the
  compiled dropped branch; evaluation ignores p.
* Hash layers: the tables (random balanced, frequency-balanced), routing by token id only.
* One short training run per method lowers the loss.

Models are tiny; the block tests jit several configs into one program where possible to save compiles.
"""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import methods_reference as ref
import train_helpers
from configs import gate_expert_drop as gate_expert_drop_config
from configs import gating_dropout as gating_dropout_config
from configs import hash as hash_config
from configs import stablemoe as stablemoe_config
from rectify_moe import checkpoints, moe, sharding, train_lib
from rectify_moe import metrics as metrics_lib
from rectify_moe.config import schema
from rectify_moe.config.schema import MoEConfig
from rectify_moe.routers import hash_layers as hash_routing
from rectify_moe.routers import stablemoe
from rectify_moe.routers.base import RouteContext

TOL = dict(rtol=2e-5, atol=2e-5)        # float32 code vs float64 reference
MESH = (2, 4)
D, F, E, S = 12, 16, 8, 8                # width, expert width, experts, group size
B, T = 8, 16                             # batch, sequence: one row (two groups) per device on MESH
V = 20                                   # vocabulary of the block tests


def _rng(seed):
  return np.random.RandomState(seed)


def _expert_params(seed, d=D, f=F, e=E):
  r = _rng(seed)
  return {"w_gate": (r.randn(e, d, f) / np.sqrt(d)).astype(np.float32),
          "w_up": (r.randn(e, d, f) / np.sqrt(d)).astype(np.float32),
          "w_down": (r.randn(e, f, d) / np.sqrt(f)).astype(np.float32)}


def _inputs(seed):
  r = _rng(seed)
  x = r.randn(B, T, D).astype(np.float32)
  mask = r.rand(B, T) > 0.25
  mask[2] = True
  ids = r.randint(0, V, size=(B, T)).astype(np.int32)
  return x, mask, ids


_MESHES = {}


def _mesh(shape=MESH):
  if shape not in _MESHES:
    _MESHES[shape] = sharding.make_mesh(*shape)
  return _MESHES[shape]


ROUTER_PARAMS = {"router_kernel": "kernel", "distill_embed": "distill_embed", "distill_centroids": "distill_centroids"}


def _block_params(params):
  """The block's pure dict from flat test parameters (router parameters under "router")."""
  out = {k: v for k, v in params.items() if k not in ROUTER_PARAMS}
  router = {ROUTER_PARAMS[k]: v for k, v in params.items() if k in ROUTER_PARAMS}
  if router:
    out["router"] = router
  return out


def _blocks(cfgs, params, hash_table=None):
  """(graphdefs, states) of MoEBlocks with the given parameters (a pure dict, shared by all cfgs)."""
  graphdefs, states = [], []
  prepared = None if hash_table is None else {"table": hash_table}
  with jax.set_mesh(_mesh()):
    for cfg in cfgs:
      graphdef, state = nnx.split(moe.MoEBlock(cfg, d_model=D, rngs=nnx.Rngs(0), vocab_size=V, prepared=prepared))
      nnx.replace_by_pure_dict(state, _block_params({k: np.asarray(v) for k, v in params.items()}))
      graphdefs.append(graphdef)
      states.append(state)
  return graphdefs, states


def _summary(out):
  """(y, flat metrics) of a block call: losses, counts and rates in one dict."""
  y, block_metrics = out
  return y, metrics_lib.block_summary(block_metrics)


def _router(cfg, router_params):
  """The router of cfg holding `router_params` (flat test names or its own; traced values welcome)."""
  return moe.router_from_arrays(cfg, _block_params(router_params).get("router", router_params), d_model=D,
                                vocab_size=V)


def _np(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


# =================================================================================================
# StableMoE: losses.
# =================================================================================================
def test_stablemoe_balance_loss_matches_token_loop_with_mask_and_global_counts():
  r = _rng(0)
  groups, tokens = 3, 10
  scores = r.randn(groups, tokens, 5).astype(np.float32) * 2
  assign = scores.argmax(-1).astype(np.int32)
  mask = r.rand(groups, tokens) > 0.3
  flat = lambda a: a.reshape(groups * tokens, *a.shape[2:])
  # Local counts (this shard is the whole batch).
  counts = np.bincount(assign[mask], minlength=5).astype(np.float32)
  got = stablemoe.balance_loss_sum(jnp.asarray(scores), jnp.asarray(assign), jnp.asarray(mask),
                                   jnp.asarray(counts), jnp.asarray(float(mask.sum())))
  want = ref.stablemoe_balance_loss(flat(scores), flat(assign), flat(mask))
  np.testing.assert_allclose(float(got), want, **TOL)
  # One shard's part, with |A_i| and the token total of a larger routed batch.
  g_counts, g_tokens = counts + np.array([7, 0, 3, 1, 9], np.float32), float(mask.sum()) + 20
  got = stablemoe.balance_loss_sum(jnp.asarray(scores), jnp.asarray(assign), jnp.asarray(mask),
                                   jnp.asarray(g_counts), jnp.asarray(g_tokens))
  want = ref.stablemoe_balance_loss(flat(scores), flat(assign), flat(mask), counts=g_counts, tokens=g_tokens)
  np.testing.assert_allclose(float(got), want, **TOL)
  assert abs(want) > 1e-3


def test_stablemoe_balance_loss_is_zero_when_every_expert_gets_n_bar():
  r = _rng(1)
  n, e = 12, 4
  assign = np.repeat(np.arange(e), n // e)[r.permutation(n)].astype(np.int32)
  scores = r.randn(1, n, e).astype(np.float32)
  scores[0, np.arange(n), assign] += 10.0  # argmax = assign
  mask = np.ones((1, n), bool)
  counts = np.bincount(assign, minlength=e).astype(np.float32)
  assert (counts == n / e).all()
  loss, grad = jax.value_and_grad(stablemoe.balance_loss_sum)(
      jnp.asarray(scores), jnp.asarray(assign[None]), jnp.asarray(mask), jnp.asarray(counts),
      jnp.asarray(float(n)))
  assert float(loss) == 0.0
  assert not np.any(np.asarray(grad))


def test_stablemoe_balance_loss_gradient_sign_follows_the_load():
  """dL_bal/ds_{t,a_t} > 0 (scores pushed down) for overloaded experts, < 0 for underloaded, 0 elsewhere."""
  r = _rng(2)
  n, e = 16, 4
  assign = np.array([0] * 8 + [1] * 5 + [2] * 2 + [3] * 1, np.int32)  # n_bar = 4
  scores = r.randn(1, n, e).astype(np.float32)
  scores[0, np.arange(n), assign] += 6.0
  mask = np.ones((1, n), bool)
  mask[0, 3] = False  # a padding token of expert 0: no gradient, not counted
  counts = np.bincount(assign[mask[0]], minlength=e).astype(np.float32)
  grad = np.asarray(jax.grad(stablemoe.balance_loss_sum)(
      jnp.asarray(scores), jnp.asarray(assign[None]), jnp.asarray(mask), jnp.asarray(counts),
      jnp.asarray(float(mask.sum()))))[0]
  want = ref.stablemoe_balance_grad(scores[0], assign, mask[0])
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
  n_bar = mask.sum() / e
  for t in range(n):
    g = grad[t, assign[t]]
    if not mask[0, t]:
      assert g == 0.0
    elif counts[assign[t]] > n_bar:
      assert g > 0, (t, assign[t])
    elif counts[assign[t]] < n_bar:
      assert g < 0, (t, assign[t])
  off = grad.copy()
  off[np.arange(n), assign] = 0.0
  assert not off.any()  # only the token's own assignment gets gradient


def test_stablemoe_distill_loss_matches_log_softmax_loop():
  r = _rng(3)
  distill_scores = r.randn(2, 9, 6).astype(np.float32) * 3
  teacher = r.randint(0, 6, size=(2, 9)).astype(np.int32)
  mask = r.rand(2, 9) > 0.3
  got = stablemoe.distill_loss_sum(jnp.asarray(distill_scores), jnp.asarray(teacher), jnp.asarray(mask))
  want = ref.stablemoe_distill_loss(distill_scores.reshape(18, 6), teacher.reshape(18), mask.reshape(18))
  np.testing.assert_allclose(float(got), want, **TOL)


# =================================================================================================
# StableMoE: the router (stage 1, stage 2, eval) and loss gradients.
# =================================================================================================
SMOE_SWITCH = 5


def _smoe_cfg(**kw):
  base = dict(router="stablemoe", num_experts=E, expert_dim=F, group_size=S, top_k=1, capacity_factor=8.0,
              eval_capacity_factor=8.0, stablemoe_switch_step=SMOE_SWITCH, stablemoe_routing_dim=6)
  return MoEConfig(**{**base, **kw})


def _smoe_router_params(seed):
  r = _rng(seed)
  return {"router_kernel": (r.randn(D, E) * 0.5).astype(np.float32),
          "distill_embed": r.randn(V, 6).astype(np.float32),
          "distill_centroids": r.randn(E, 6).astype(np.float32)}


def _route(cfg, params, xg, mask, ids, *, train, step):
  """(probs, table, losses) of the StableMoE router on one shard (its per-device losses are global here)."""
  ctx = RouteContext(token_mask=jnp.asarray(mask), token_ids=jnp.asarray(ids), step=jnp.asarray(step, jnp.int32),
                     train=train, capacity=cfg.capacity(train))
  out = _router(cfg, params).route(jnp.asarray(xg), ctx)
  return out.probs, out.table, out.losses


def test_stablemoe_router_stage1_stage2_and_eval_routing_and_gate():
  cfg = _smoe_cfg()
  params = _smoe_router_params(10)
  r = _rng(11)
  xg = r.randn(4, S, D).astype(np.float32)
  mask = r.rand(4, S) > 0.2
  ids = r.randint(0, V, size=(4, S)).astype(np.int32)
  scores = xg.astype(np.float64) @ params["router_kernel"].astype(np.float64)           # [G, S, E]
  distilled = params["distill_embed"][ids].astype(np.float64) @ params["distill_centroids"].T
  a_main, a_dist = scores.argmax(-1), distilled.argmax(-1)
  assert (a_main != a_dist)[mask].mean() > 0.5  # the two routers really disagree
  n_valid = mask.sum()
  flat = lambda a: a.reshape(-1, *a.shape[2:])

  cases = [("stage 1", True, 0, False), ("stage 1 (last step)", True, SMOE_SWITCH - 1, False),
           ("stage 2 (switch step)", True, SMOE_SWITCH, True), ("stage 2 (later)", True, 1000, True),
           ("eval (step 0)", False, 0, True)]
  for name, train, step, distilled_routing in cases:
    _, table, losses = _route(cfg, params, xg, mask, ids, train=train, step=step)
    chosen = a_dist if distilled_routing else a_main
    got_index = np.asarray(table.expert_index)[..., 0]
    np.testing.assert_array_equal(got_index[mask], chosen[mask], err_msg=name)
    # Combine weight: sigmoid of the ORIGINAL score of the chosen expert; padding gets 0.
    gate = ref.sigmoid(np.take_along_axis(scores, chosen[..., None], -1)[..., 0]) * mask
    np.testing.assert_allclose(np.asarray(table.combine_weight)[..., 0], gate, **TOL, err_msg=name)
    assert (np.asarray(table.slot)[..., 0][mask] >= 0).all()  # ample capacity: every valid token placed
    if train and not distilled_routing:
      bal = ref.stablemoe_balance_loss(flat(scores), flat(a_main), flat(mask)) / n_valid
      dis = ref.stablemoe_distill_loss(flat(distilled), flat(a_main), flat(mask)) / n_valid
      np.testing.assert_allclose(float(losses["aux_loss"]), bal, **TOL, err_msg=name)
      np.testing.assert_allclose(float(losses["distill_loss"]), cfg.stablemoe_distill_weight * dis, **TOL,
                                 err_msg=name)
      assert abs(bal) > 1e-4 and dis > 1e-2
    else:  # no balance or distillation loss in stage 2 / evaluation
      assert float(losses["aux_loss"]) == 0.0 and float(losses["distill_loss"]) == 0.0, name


def test_stablemoe_loss_gradients_reach_only_their_parameters():
  """The distillation loss trains only D and E_hat (not the router kernel or the hidden states); the
  balance loss trains only the main scores' inputs (kernel, hidden), never D or E_hat."""
  cfg = _smoe_cfg()
  params = _smoe_router_params(12)
  r = _rng(13)
  xg = r.randn(2, S, D).astype(np.float32)
  mask = r.rand(2, S) > 0.2
  ids = r.randint(0, V // 2, size=(2, S)).astype(np.int32)   # ids >= V/2 never appear

  def loss(p, x, key):
    _, _, losses = _route(cfg, p, x, mask, ids, train=True, step=0)
    return losses[key]

  g_dis, gx_dis = jax.grad(loss, argnums=(0, 1))(params, xg, "distill_loss")
  g_bal, gx_bal = jax.grad(loss, argnums=(0, 1))(params, xg, "aux_loss")
  assert not np.asarray(g_dis["router_kernel"]).any() and not np.asarray(gx_dis).any()
  assert not np.asarray(g_bal["distill_embed"]).any() and not np.asarray(g_bal["distill_centroids"]).any()
  assert np.asarray(g_bal["router_kernel"]).any() and np.asarray(gx_bal).any()
  # The distillation gradients against the token loop.
  teacher = (xg.astype(np.float64) @ params["router_kernel"]).argmax(-1)
  scale = cfg.stablemoe_distill_weight / mask.sum()
  want_embed, want_cent = ref.stablemoe_distill_grads(params["distill_embed"], params["distill_centroids"],
                                                      ids.reshape(-1), teacher.reshape(-1), mask.reshape(-1),
                                                      scale)
  np.testing.assert_allclose(np.asarray(g_dis["distill_embed"]), want_embed, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_dis["distill_centroids"]), want_cent, rtol=1e-4, atol=1e-6)
  assert not np.asarray(g_dis["distill_embed"])[V // 2:].any()


def test_stablemoe_block_on_mesh_matches_reference_in_both_stages_and_eval():
  cfg = _smoe_cfg()
  params = {**_expert_params(20), **_smoe_router_params(21)}
  x, mask, ids = _inputs(22)
  (graphdef,), (state,) = _blocks([cfg], params)

  @jax.jit
  def run(state, x, mask, ids, step):
    block = nnx.merge(graphdef, state)
    return (_summary(block(x, mask, train=True, token_ids=ids, step=step)),
            _summary(block(x, mask, train=False, token_ids=ids, step=jnp.zeros((), jnp.int32))))

  with jax.set_mesh(_mesh()):
    out = {step: _np(run(state, x, mask, ids, jnp.asarray(step, jnp.int32)))
           for step in (0, SMOE_SWITCH - 1, SMOE_SWITCH)}
  kernel, embed, cent = params["router_kernel"], params["distill_embed"], params["distill_centroids"]
  y1, a1 = ref.stablemoe_block(x, mask, ids, kernel, embed, cent, params, use_distilled=False)
  y2, a2 = ref.stablemoe_block(x, mask, ids, kernel, embed, cent, params, use_distilled=True)
  assert (a1 != a2)[mask].mean() > 0.5
  n_valid = mask.sum()
  scores = x.reshape(-1, D).astype(np.float64) @ kernel
  distilled = embed[ids.reshape(-1)].astype(np.float64) @ cent.T
  bal = ref.stablemoe_balance_loss(scores, a1.reshape(-1), mask.reshape(-1)) / n_valid   # GLOBAL |A_i|
  dis = ref.stablemoe_distill_loss(distilled, a1.reshape(-1), mask.reshape(-1)) / n_valid
  for step in (0, SMOE_SWITCH - 1):
    (y, m), (y_eval, m_eval) = out[step]
    np.testing.assert_allclose(y, y1, **TOL, err_msg=f"stage 1, step {step}")
    np.testing.assert_allclose(m["aux_loss"], bal, **TOL)
    np.testing.assert_allclose(m["distill_loss"], cfg.stablemoe_distill_weight * dis, **TOL)
    np.testing.assert_allclose(y_eval, y2, **TOL, err_msg="eval routes by the distilled router")
    assert m_eval["aux_loss"] == 0.0 and m_eval["distill_loss"] == 0.0
  (y, m), _ = out[SMOE_SWITCH]
  np.testing.assert_allclose(y, y2, **TOL, err_msg="stage 2")
  assert m["aux_loss"] == 0.0 and m["distill_loss"] == 0.0


# =================================================================================================
# StableMoE: the optimizer freeze.
# =================================================================================================
def test_freeze_after_zeroes_exactly_the_frozen_leaves_from_the_switch_count():
  switch = 3
  r = _rng(30)
  params = {"dense": {"kernel": jnp.asarray(r.randn(4, 3), jnp.float32)},
            "ffn": {"distill_embed": jnp.asarray(r.randn(5, 2), jnp.float32),
                    "distill_centroids": jnp.asarray(r.randn(3, 2), jnp.float32),
                    "router_kernel": jnp.asarray(r.randn(4, 3), jnp.float32)}}
  frozen = {"distill_embed", "distill_centroids"}
  base = lambda: optax.adamw(0.1, weight_decay=0.1)
  tx = optax.chain(base(), stablemoe.freeze_after(switch, stablemoe.is_distilled_param))
  plain = base()
  state, plain_state = tx.init(params), plain.init(params)
  p, p_plain = params, params
  frozen_snapshot = None
  for count in range(7):
    grads = jax.tree.map(lambda a: jnp.asarray(r.randn(*a.shape), jnp.float32), params)
    updates, state = tx.update(grads, state, p)
    want, plain_state = plain.update(grads, plain_state, p_plain)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
      name = path[-1].key
      w = np.asarray(dict(jax.tree_util.tree_leaves_with_path(want))[path])
      if name in frozen and count >= switch:
        assert not np.asarray(u).any(), (count, name)
      else:
        np.testing.assert_array_equal(np.asarray(u), w, err_msg=f"{count} {name}")
        assert np.asarray(u).any()
    p = optax.apply_updates(p, updates)
    p_plain = optax.apply_updates(p_plain, want)
    if count == switch - 1:
      frozen_snapshot = jax.tree.map(np.asarray, p["ffn"])
  for name in frozen:
    np.testing.assert_array_equal(np.asarray(p["ffn"][name]), frozen_snapshot[name])
  np.testing.assert_array_equal(np.asarray(p["dense"]["kernel"]), np.asarray(p_plain["dense"]["kernel"]))


def test_is_distilled_param_on_key_paths():
  gk, dk = jax.tree_util.GetAttrKey, jax.tree_util.DictKey
  assert stablemoe.is_distilled_param((dk("blocks"), jax.tree_util.SequenceKey(1), dk("ffn"), dk("distill_embed")))
  assert stablemoe.is_distilled_param((gk("ffn"), gk("distill_centroids")))
  assert not stablemoe.is_distilled_param((dk("ffn"), dk("router_kernel")))
  assert not stablemoe.is_distilled_param((dk("embed"),))


# =================================================================================================
# Gating Dropout.
# =================================================================================================
def test_gating_dropout_decision_rate_under_trainer_keys():
  """Over 2000 steps of the trainer's keys (fold_in(step_rng(seed, step), layer)), the dropped fraction is
  p within 4 binomial standard deviations; layers draw independently; p = 0 never drops."""
  n = 2000
  steps = jnp.arange(n)

  def decisions(seed, layer, rate):
    keys = jax.vmap(lambda s: jax.random.fold_in(train_lib.step_rng(seed, s), layer))(steps)
    return np.asarray(jax.vmap(lambda k: moe.gating_dropout_decision(k, rate))(keys))

  for rate in (0.1, 0.2, 0.5):
    drops = decisions(0, 1, rate)
    sigma = math.sqrt(n * rate * (1 - rate))
    assert abs(drops.sum() - n * rate) <= 4 * sigma, (rate, drops.sum())
  a, b = decisions(0, 1, 0.5), decisions(0, 3, 0.5)
  both = (a & b).sum()
  assert abs(both - n * 0.25) <= 4 * math.sqrt(n * 0.25 * 0.75), both   # independent layers
  assert not decisions(0, 1, 0.0).any()
  assert (decisions(1, 1, 0.5) != a).any()  # the seed matters


GD_P = 0.3
_GD_BASE = dict(num_experts=E, expert_dim=F, group_size=S, top_k=1, capacity_factor=0.5, router="top_k")
GD_CFGS = {
    # (config, twin without gating dropout)
    "one_position": dict(gating_dropout_weight="one", priority="position", straight_through=True),
    "prob_bpr": dict(gating_dropout_weight="prob", priority="bpr", combine="probs"),
    "expert_drop": dict(gating_dropout_mode="gate_expert_drop", priority="bpr", straight_through=True),
}


def _gd_cfgs():
  names = list(GD_CFGS)
  with_gd = [MoEConfig(**_GD_BASE, gating_dropout=GD_P, **GD_CFGS[n]) for n in names]
  without = [MoEConfig(**_GD_BASE, **GD_CFGS[n]) for n in names]
  return names, with_gd + without


def _gd_params(seed):
  return {**_expert_params(seed), "router_kernel": (_rng(seed + 1).randn(D, E) * 0.5).astype(np.float32)}


def _rng_keys(rate):
  """A key whose decision drops and one that keeps (found by scanning)."""
  drop = keep = None
  for i in range(200):
    key = jax.random.key(i)
    if bool(moe.gating_dropout_decision(key, rate)):
      drop = key if drop is None else drop
    else:
      keep = key if keep is None else keep
    if drop is not None and keep is not None:
      return drop, keep
  raise AssertionError("no dropping key found")


_GD_CACHE = {}


def _gd_run(rng, train):
  """Outputs and metrics of all GD configs (first half with p, second half with p = 0) in one program."""
  key = (train,)
  if key not in _GD_CACHE:
    names, cfgs = _gd_cfgs()
    graphdefs, states = _blocks(cfgs, _gd_params(40))

    @jax.jit
    def run(states, x, mask, rng):
      return [_summary(nnx.merge(g, s)(x, mask, train=train, rng=rng)) for g, s in zip(graphdefs, states)]

    _GD_CACHE[key] = (names, states, run)
  names, states, run = _GD_CACHE[key]
  x, mask, _ = _inputs(41)
  with jax.set_mesh(_mesh()):
    outs = _np(run(states, x, mask, rng))
  k = len(names)
  return {n: (outs[i], outs[k + i]) for i, n in enumerate(names)}, x, mask


def test_gating_dropout_dropped_step_keeps_every_token_on_its_device():
  drop_key, keep_key = _rng_keys(GD_P)
  results, x, mask = _gd_run(drop_key, train=True)
  params = _gd_params(40)
  for name, weight_mode, priority in (("one_position", "one", "position"), ("prob_bpr", "prob", "bpr")):
    (y, m), (y_routed, _) = results[name]
    want, stats = ref.local_only_block(x, mask, params["router_kernel"], params, mesh_shape=MESH,
                                       num_experts=E, group_size=S, capacity_factor=0.5, priority=priority,
                                       weight_mode=weight_mode)
    # The data exercise the mechanism: local choices differ from the global ones, local buffers overflow.
    assert stats["off_global"] > 10 and stats["overflow"] > 0 and stats["placed"] > 20, stats
    np.testing.assert_allclose(y, want, **TOL, err_msg=name)
    assert not np.allclose(y, y_routed, atol=1e-3)
    assert m["gating_dropped"] == 1.0
    assert m["aux_loss"] == 0.0 and m["z_loss"] == 0.0, name  # no gate ran on a dropped step
    # Its metrics describe the local step that ran: no all-to-all rows, overflow of the local buffers dropped.
    assert m["a2a_rows_per_token"] == 0.0, name
    np.testing.assert_allclose(m["drop_rate"], stats["overflow"] / m["tokens"], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(m["expert_load"].sum(), stats["placed"], err_msg=name)
    np.testing.assert_allclose(m["expert_demand"].sum(), m["tokens"], err_msg=name)
  (y, m), (y_routed, m_routed) = results["expert_drop"]
  assert m["a2a_rows_per_token"] == 0.0 and m["expert_load"].sum() == 0 and m["drop_rate"] == 1.0
  assert m_routed["a2a_rows_per_token"] > 0
  assert not y.any(), "Gate-Expert-Drop: the MoE output is zero on a dropped step"
  assert np.abs(y_routed).max() > 0.1
  assert m["gating_dropped"] == 1.0 and m["aux_loss"] == 0.0

  # A step that keeps the gate routes exactly like the block without gating dropout.
  results, _, _ = _gd_run(keep_key, train=True)
  for name, ((y, m), (y0, m0)) in results.items():
    np.testing.assert_allclose(y, y0, rtol=1e-6, atol=1e-6, err_msg=name)
    assert m["gating_dropped"] == 0.0
    np.testing.assert_allclose(m["aux_loss"], m0["aux_loss"], rtol=1e-6, err_msg=name)
    assert m0["aux_loss"] > 0


def test_gating_dropout_is_off_in_evaluation_for_any_rng():
  drop_key, keep_key = _rng_keys(GD_P)
  for key in (drop_key, keep_key, jax.random.key(12345)):
    results, _, _ = _gd_run(key, train=False)
    for name, ((y, m), (y0, m0)) in results.items():
      np.testing.assert_array_equal(y, y0, err_msg=name)
      assert m["gating_dropped"] == 0.0
      assert np.abs(y).max() > 0.1


@pytest.mark.parametrize("mode", ["gate_drop", "gate_expert_drop"])
def test_compiled_dropped_branch_has_no_all_to_all(mode):
  """Compile the block's forward pass on mesh (2, 4) with gating dropout and parse the HLO text.

  Parsing (methods_reference.hlo_computations): computations are the unindented "%name (...) -> ... {"
  headers up to the next unindented "}". A computation's callees come from the call attributes of its
  instructions (calls=, to_apply=, body=, condition=, branch_computations=, ...), followed transitively.
  all-to-all ops are instructions whose opcode is "all-to-all(" (or "all-to-all-start("). lax.cond turns
  the bool into an index, so branch 0 is the routed (false) branch and branch 1 the dropped (true) one.
  """
  cfg = MoEConfig(**_GD_BASE, gating_dropout=GD_P, gating_dropout_mode=mode)
  (graphdef,), (state,) = _blocks([cfg], _gd_params(40))
  x, mask, _ = _inputs(41)

  def forward(state, x, mask, rng):
    return nnx.merge(graphdef, state)(x, mask, train=True, rng=rng)[0]

  with jax.set_mesh(_mesh()):
    text = jax.jit(forward).lower(state, x, mask, jax.random.key(0)).compile().as_text()
  comps = ref.hlo_computations(text)
  assert len(comps) > 3
  total = ref.count_all_to_all(comps, comps)
  assert total >= 2, "the routed path must dispatch and return with all-to-all"
  conds = [c for c in ref.conditionals(comps) if ref.count_all_to_all(
      comps, set().union(*[ref.closure(comps, b) for b in ref.conditional_branches(c, comps)]))]
  assert len(conds) == 1, conds
  branches = ref.conditional_branches(conds[0], comps)
  assert len(branches) == 2, conds[0]
  routed, dropped = (ref.closure(comps, b) for b in branches)
  assert ref.count_all_to_all(comps, dropped) == 0
  assert ref.count_all_to_all(comps, routed) == total  # every all-to-all lives in the routed branch
  assert not set(branches) & (routed & dropped)


# =================================================================================================
# Hash layers.
# =================================================================================================
@pytest.mark.parametrize("vocab, experts", [(259, 8), (100, 7), (5, 8)])
def test_random_hash_table_is_balanced_and_seeded(vocab, experts):
  table = hash_routing.random_balanced_table(vocab, experts, seed=0)
  assert table.shape == (vocab,) and table.dtype == np.int32
  assert table.min() >= 0 and table.max() < experts
  owned = np.bincount(table, minlength=experts)
  assert set(owned) <= {vocab // experts, -(-vocab // experts)}, owned
  np.testing.assert_array_equal(table, hash_routing.random_balanced_table(vocab, experts, seed=0))
  np.testing.assert_array_equal(table, hash_routing.build_table("random", vocab, experts, seed=0))
  if vocab > experts:
    assert (table != hash_routing.random_balanced_table(vocab, experts, seed=1)).any()


def test_frequency_balanced_hash_table_on_zipf_counts():
  """Greedy (most frequent first, to the lightest expert): at any time max load - min load <= the largest
  single-token count (the token just added went to the then-lightest expert), so in particular
  max load - mean load <= max count. The table is a deterministic function of the counts."""
  r = _rng(50)
  vocab, experts = 259, 8
  counts = np.floor(20000.0 / np.arange(1, vocab + 1) ** 1.1).astype(np.int64)
  counts[-30:] = 0
  counts = counts[r.permutation(vocab)]
  table = hash_routing.frequency_balanced_table(counts, experts)
  np.testing.assert_array_equal(table, ref.greedy_balanced_table(counts, experts))
  np.testing.assert_array_equal(table, hash_routing.frequency_balanced_table(counts.copy(), experts))
  np.testing.assert_array_equal(table, hash_routing.build_table("balanced", vocab, experts, token_counts=counts))
  loads = np.bincount(table, weights=counts, minlength=experts)
  assert loads.max() - loads.min() <= counts.max()
  assert loads.max() - loads.mean() <= counts.max()
  # Ids never seen in training (count 0) are spread over the experts, not piled onto the lightest one.
  unseen = np.bincount(table[counts == 0], minlength=experts)
  assert unseen.max() - unseen.min() <= 1
  # Much better than the random table on the same skewed counts.
  random_loads = np.bincount(hash_routing.random_balanced_table(vocab, experts), weights=counts, minlength=experts)
  assert loads.max() - loads.mean() < random_loads.max() - random_loads.mean()
  # With no frequency information at all (all counts equal), the ids are spread evenly.
  flat = hash_routing.frequency_balanced_table(np.zeros(vocab, np.int64), experts)
  assert set(np.bincount(flat, minlength=experts)) <= {vocab // experts, -(-vocab // experts)}
  np.testing.assert_array_equal(flat, ref.greedy_balanced_table(np.zeros(vocab), experts))
  with pytest.raises(ValueError, match="token counts"):
    hash_routing.build_table("balanced", vocab, experts)
  with pytest.raises(ValueError, match="expected vocab_size"):
    hash_routing.build_table("balanced", vocab + 1, experts, token_counts=counts)
  with pytest.raises(ValueError, match="Unknown"):
    hash_routing.build_table("bigram", vocab, experts)


def test_hash_routing_is_a_function_of_the_token_id_only():
  cfg = MoEConfig(router="hash", num_experts=E, expert_dim=F, group_size=S, top_k=1, capacity_factor=8.0,
                      eval_capacity_factor=8.0)
  table = hash_routing.random_balanced_table(V, E, seed=3)
  params = _expert_params(60)
  r = _rng(61)
  emb = r.randn(V, D).astype(np.float32)
  _, mask, ids = _inputs(62)
  x_ctx = emb[ids]                                          # hidden state = f(token id)
  x_rand = r.randn(B, T, D).astype(np.float32)              # arbitrary hidden states
  (graphdef,), (state,) = _blocks([cfg], params, hash_table=table)

  @jax.jit
  def run(state, x, mask, ids):
    block = nnx.merge(graphdef, state)
    return block(x, mask, train=True, token_ids=ids)[0], block(x, mask, train=False, token_ids=ids)[0]

  with jax.set_mesh(_mesh()):
    y_ctx, y_ctx_eval = _np(run(state, x_ctx, mask, ids))
    y_rand, _ = _np(run(state, x_rand, mask, ids))
  np.testing.assert_allclose(y_rand, ref.hash_block(x_rand, mask, ids, table, params), **TOL)
  np.testing.assert_allclose(y_ctx, ref.hash_block(x_ctx, mask, ids, table, params), **TOL)
  np.testing.assert_array_equal(y_ctx, y_ctx_eval)
  # Same id (and same input) -> same output anywhere in the batch, whatever the context.
  for v in np.unique(ids[mask]):
    rows = y_ctx[mask & (ids == v)]
    np.testing.assert_allclose(rows, np.broadcast_to(rows[0], rows.shape), rtol=1e-6, atol=1e-6)
  # The routing table of the router is table[token_id], weight 1; it has no loss.
  xg = x_rand.reshape(-1, S, D)
  ctx = RouteContext(token_mask=jnp.asarray(mask.reshape(-1, S)), token_ids=jnp.asarray(ids.reshape(-1, S)),
                     step=jnp.zeros((), jnp.int32), train=True, capacity=cfg.capacity(True))
  out = _router(cfg, {"table": table}).route(jnp.asarray(xg), ctx)
  np.testing.assert_array_equal(np.asarray(out.table.expert_index)[..., 0], table[ids.reshape(-1, S)])
  np.testing.assert_array_equal(np.asarray(out.table.combine_weight)[..., 0],
                                mask.reshape(-1, S).astype(np.float32))
  assert out.losses == {} and out.token_loss_sums == {}


# =================================================================================================
# Training runs.
# =================================================================================================
METHOD_CONFIGS = {
    "stablemoe": stablemoe_config,
    "gating_dropout": gating_dropout_config,
    "gate_expert_drop": gate_expert_drop_config,
    "hash_random": hash_config,
    "hash_balanced": hash_config,
}
TINY_MOE_SIZES = ("num_experts", "expert_dim", "group_size")
STABLEMOE_SWITCH = 3


def _method_config(tmp_path, method, steps):
  """tiny_config + the method's MoE fields (and aux weight), keeping the tiny sizes."""
  config = train_helpers.tiny_config(tmp_path, steps=steps)
  src = METHOD_CONFIGS[method].get_config()
  config.moe.update({k: v for k, v in src.moe.to_dict().items() if k not in TINY_MOE_SIZES})
  config.train.aux_loss_weight = src.train.aux_loss_weight
  config.train.z_loss_weight = src.train.z_loss_weight
  config.train.log_every = 1
  if method == "hash_balanced":
    config.moe.hash_table = "balanced"
  if method == "stablemoe":
    config.moe.stablemoe_switch_step = STABLEMOE_SWITCH
  return config


def _train_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in (json.loads(line) for line in f if line.strip()) if r["kind"] == "train"]


def _model_params(config, workdir, steps):
  """{step: {path: np.ndarray}} of the model half of the checkpoints at `steps` (step 0: the init)."""
  mesh = sharding.make_mesh(*train_lib.validate_config(config))
  _, state, shardings = train_lib.create_train_state(config, mesh)
  flat = lambda s: {jax.tree_util.keystr(p): np.asarray(v)
                    for p, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(s)[0])}
  out = {}
  ckpt = checkpoints.Checkpointer(workdir, keep=100)
  try:
    for step in steps:
      out[step] = flat(state) if step == 0 else flat(ckpt.restore(step, state, shardings)[0])
  finally:
    ckpt.close()
  return out


def _find(params, name):
  keys = [k for k in params if name in k]
  assert len(keys) == 1, (name, keys)
  return params[keys[0]]


STABLEMOE_STEPS = 9


@pytest.fixture(scope="module")
def stablemoe_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("stablemoe")
  config = _method_config(tmp, "stablemoe", STABLEMOE_STEPS)
  config.train.update(dict(checkpoint_every=1, keep_checkpoints=100))
  workdir = str(tmp / "run")
  summary = train_lib.train_and_evaluate(config, workdir)
  assert summary["step"] == STABLEMOE_STEPS
  return config, workdir


def test_stablemoe_training_freezes_the_distilled_router_after_the_switch(stablemoe_run):
  config, workdir = stablemoe_run
  steps = list(range(0, STABLEMOE_STEPS + 1))
  params = _model_params(config, workdir, steps)
  embed = {s: _find(params[s], "distill_embed") for s in steps}
  cent = {s: _find(params[s], "distill_centroids") for s in steps}
  kernel = {s: _find(params[s], "['router']['kernel']") for s in steps}
  assign = {s: np.argmax(embed[s].astype(np.float64) @ cent[s].T.astype(np.float64), axis=-1) for s in steps}
  # Before the switch the distilled router trains (update 0 has learning rate 0 in the warmup).
  for s in range(1, STABLEMOE_SWITCH):
    assert not np.array_equal(embed[s], embed[s + 1]) and not np.array_equal(cent[s], cent[s + 1]), s
  assert (assign[0] != assign[STABLEMOE_SWITCH]).any(), "stage 1 should move some token assignments"
  # From the switch on (updates number >= switch): bit-identical parameters and token assignments.
  for s in range(STABLEMOE_SWITCH + 1, STABLEMOE_STEPS + 1):
    np.testing.assert_array_equal(embed[s], embed[STABLEMOE_SWITCH], err_msg=f"distill_embed at step {s}")
    np.testing.assert_array_equal(cent[s], cent[STABLEMOE_SWITCH], err_msg=f"distill_centroids at step {s}")
    np.testing.assert_array_equal(assign[s], assign[STABLEMOE_SWITCH])
  # The gate (router kernel) keeps learning in stage 2.
  assert not np.array_equal(kernel[STABLEMOE_SWITCH], kernel[STABLEMOE_STEPS])
  # Logged losses: balance and distillation terms only in stage 1 (logged step k = update k - 1).
  for line in _train_lines(workdir):
    if line["step"] - 1 < STABLEMOE_SWITCH:
      assert line["distill_loss"] > 0 and line["aux_loss"] != 0, line
    else:
      assert line["distill_loss"] == 0 and line["aux_loss"] == 0, line


def test_stablemoe_training_lowers_the_loss(stablemoe_run):
  _, workdir = stablemoe_run
  lines = _train_lines(workdir)
  assert lines[-1]["ce"] < lines[0]["ce"] - 0.5, (lines[0]["ce"], lines[-1]["ce"])


@pytest.mark.parametrize("method", ["gating_dropout", "gate_expert_drop", "hash_random", "hash_balanced"])
def test_method_training_run_lowers_the_loss(tmp_path, method):
  steps = 10
  config = _method_config(tmp_path, method, steps)
  workdir = str(tmp_path / "run")
  summary = train_lib.train_and_evaluate(config, workdir)
  assert summary["step"] == steps
  lines = _train_lines(workdir)
  assert [l["step"] for l in lines] == list(range(1, steps + 1))
  assert lines[-1]["ce"] < lines[0]["ce"] - 0.5, (lines[0]["ce"], lines[-1]["ce"])
  if method in ("gating_dropout", "gate_expert_drop"):
    # The logged decision of step k (update k - 1) is the trainer key folded with the MoE layer index.
    run_cfg = schema.parse(config)
    model_cfg, moe_cfg = run_cfg.model, run_cfg.moe
    (layer,) = [i for i in range(model_cfg.num_layers) if model_cfg.is_moe_layer(i)]
    want = [float(moe.gating_dropout_decision(jax.random.fold_in(train_lib.step_rng(config.seed, k - 1), layer),
                                              moe_cfg.gating_dropout)) for k in range(1, steps + 1)]
    assert [l["gating_dropped"] for l in lines] == want
    assert 0 < sum(want) < steps  # both kinds of step happened
  if method.startswith("hash"):
    # The model holds the configured table (checkpointed, never trained).
    vocab = config.model.vocab_size
    if method == "hash_random":
      want = hash_routing.random_balanced_table(vocab, config.moe.num_experts, seed=0)
    else:
      counts = train_lib.train_token_counts(config, vocab)
      want = hash_routing.frequency_balanced_table(counts, config.moe.num_experts)
      assert (want != hash_routing.random_balanced_table(vocab, config.moe.num_experts, seed=0)).any()
    params = _model_params(config, workdir, [steps])[steps]
    np.testing.assert_array_equal(_find(params, "['router']['table']"), want)
