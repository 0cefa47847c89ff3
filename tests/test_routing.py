"""rectify_moe.routing against the contract (docs/routing_contract.md) and an independent loop reference.

* ``routing_reference`` (same folder) is a token-by-token numpy reference written from the contract.
* Hand-worked golden examples check both the reference and the module against literals.
* Gradient checks use finite differences of functions in which the detached (stop-gradient)
  quantities are frozen at their values at the evaluation point.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import routing_reference as ref
from rectify_moe import intra_device, routing

STAT_NAMES = ("drop_rate", "unrouted_rate", "padding_rate", "fill_in_slots", "num_tokens",
              "expert_demand", "expert_load")
FILL_VARIANTS = (("none", False, "same"), ("same", True, "same"), ("score", True, "score"))


# ------------------------------------------------------------------------------------------------
# Adapters: both implementations return dicts of numpy arrays.
# ------------------------------------------------------------------------------------------------
def _table_to_dict(t):
    d = {name: np.asarray(getattr(t, name)) for name in
         ("expert_index", "gate", "slot", "combine_weight", "dispatch", "combine", "token_mask",
          "accepted", "num_accepted")}
    d.update(num_experts=t.num_experts, capacity=t.capacity, top_k=t.top_k,
             num_choices=t.num_choices)
    d["stats"] = {name: np.asarray(getattr(t.stats, name)) for name in STAT_NAMES}
    return d


@functools.lru_cache(maxsize=None)
def _jitted_route(**static):
    return jax.jit(lambda probs, mask: routing.route_top_k(probs, token_mask=mask, **static))


def module_route(probs, token_mask=None, jit=False, **kw):
    """route_top_k, eagerly (default: on these tiny shapes op-by-op dispatch is cheaper than
    compiling every static configuration) or through jax.jit."""
    probs = np.asarray(probs, np.float32)
    if token_mask is None:
        token_mask = np.ones(probs.shape[:2], bool)
    fn = _jitted_route(**kw) if jit else functools.partial(routing.route_top_k, **kw)
    table = fn(jnp.asarray(probs), token_mask=jnp.asarray(token_mask)) if not jit else fn(
        jnp.asarray(probs), jnp.asarray(token_mask))
    return table, _table_to_dict(table)


def route(impl, probs, **kw):
    if impl == "reference":
        return ref.route_top_k(np.asarray(probs, np.float32), **kw)
    return module_route(probs, **kw)[1]


def ir_choice(impl, probs, table_kwargs, **kw):
    """IR choice on the table that route_top_k(**table_kwargs) gives for probs."""
    probs = np.asarray(probs, np.float32)
    if impl == "reference":
        t = ref.route_top_k(probs, **table_kwargs)
        return ref.intra_device_choice(
            probs, expert_index=t["expert_index"], gate=t["gate"], slot=t["slot"],
            token_mask=t["token_mask"], top_k=t["top_k"], num_choices=t["num_choices"], **kw)
    table, _ = module_route(probs, **table_kwargs)
    ir = intra_device.intra_device_choice(jnp.asarray(probs), table, **kw)
    return _ir_to_dict(ir)


def _ir_to_dict(ir):
    d = {name: np.asarray(getattr(ir, name)) for name in
         ("selected", "local_expert", "slot", "reuse_choice", "dispatch", "p", "lam", "total", "overflow",
          "num_rectified", "placed")}
    return d


IMPLS = ["reference", "routing"]  # the goldens also validate the reference


# ------------------------------------------------------------------------------------------------
# Capacity
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,expected", [
    ((16384, 8, 1, 1.0), 2048),          # top-1, cf 1, 8 experts (spec §2.1 example)
    ((16384, 32, 1, 1.0), 512),
    ((16384, 8, 2, 0.5), 2048),          # Top-1+FR keeps the top-1 capacity
    ((6, 4, 1, 1.0), 2),                 # ceil(1.5)
    ((7, 3, 2, 1.0), 5),                 # ceil(4.666)
    ((13, 5, 3, 0.5), 4),                # ceil(3.9)
    ((8, 8, 1, 0.25), 1),                # ceil(0.25)
    ((8, 8, 1, 0.25, 3), 3),             # min_capacity wins
    ((100, 10, 2, 1.25), 25),
    ((10, 4, 2, 1.0), 5),
])
def test_expert_capacity_closed_form(args, expected):
    assert ref.expert_capacity(*args) == expected
    assert routing.expert_capacity(*args) == expected
    assert isinstance(routing.expert_capacity(*args), int)


def test_expert_capacity_random_matches_closed_form():
    rng = np.random.default_rng(0)
    for _ in range(200):
        S, E, k = int(rng.integers(1, 5000)), int(rng.integers(1, 64)), int(rng.integers(1, 4))
        cf = float(rng.choice([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2 / 3]))
        mc = int(rng.integers(0, 4))
        exact = max(math.ceil(S * cf * k / E - 1e-9), mc)  # guard against float rounding in the check
        if exact < 1:
            continue
        got = routing.expert_capacity(S, E, k, cf, mc)
        assert got in (exact, ref.expert_capacity(S, E, k, cf, mc)), (S, E, k, cf, mc, got)


def test_ir_capacity_from_factor():
    assert intra_device.ir_capacity_from_factor(16, 2, None) is None
    for S, L, f in [(16, 2, 1.0), (16, 2, 0.25), (16, 4, 0.01), (5, 1, 0.5), (7, 2, 3.0),
                    (13, 4, 0.3), (1, 1, 1.0)]:
        assert intra_device.ir_capacity_from_factor(S, L, f) == ref.ir_capacity_from_factor(S, L, f)
    assert intra_device.ir_capacity_from_factor(16, 2, 0.25) == 2
    assert intra_device.ir_capacity_from_factor(16, 4, 0.01) == 1     # at least 1
    assert intra_device.ir_capacity_from_factor(7, 2, 3.0) == 7       # at most S


# ------------------------------------------------------------------------------------------------
# Golden, hand-worked examples
# ------------------------------------------------------------------------------------------------
# Example A: G=1, S=5, E=3, k=2, C=2. Ranked choices (ties -> lower index):
#   s0 [.5 .3 .2] -> (e0 .5, e1 .3)     s1 [.6 .1 .3] -> (e0 .6, e2 .3)
#   s2 [.2 .7 .1] -> (e1 .7, e0 .2)     s3 [.7 .2 .1] -> (e0 .7, e1 .2)
#   s4 [.1 .3 .6] -> (e2 .6, e1 .3)
PROBS_A = np.array([[[.5, .3, .2], [.6, .1, .3], [.2, .7, .1], [.7, .2, .1], [.1, .3, .6]]],
                   np.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_golden_position(impl):
    # rank 0 in sequence order: s0->e0 pos0 ok, s1->e0 pos1 ok, s2->e1 pos0 ok, s3->e0 pos2 DROP,
    #   s4->e2 pos0 ok.  Counters now e0=3 (overflow counts), e1=1, e2=1.
    # rank 1: s0->e1 pos1 ok, s1->e2 pos1 ok, s2->e0 pos3 DROP, s3->e1 pos2 DROP, s4->e1 pos3 DROP.
    t = route(impl, PROBS_A, top_k=2, capacity=2, priority="position")
    np.testing.assert_array_equal(t["expert_index"][0], [[0, 1], [0, 2], [1, 0], [0, 1], [2, 1]])
    np.testing.assert_array_equal(t["slot"][0], [[0, 1], [1, 1], [0, -1], [-1, -1], [0, -1]])
    # normalized over accepted: s0 .5/.8, .3/.8; s1 .6/.9, .3/.9; s2 .7/.7; s3 nothing; s4 .6/.6.
    np.testing.assert_allclose(
        t["combine_weight"][0],
        [[.625, .375], [2 / 3, 1 / 3], [1, 0], [0, 0], [1, 0]], atol=1e-6)
    st = t["stats"]
    np.testing.assert_allclose(st["drop_rate"], [4 / 10], atol=1e-6)       # 4 of 10 top-k choices dropped
    np.testing.assert_allclose(st["unrouted_rate"], [1 / 5], atol=1e-6)    # s3
    np.testing.assert_allclose(st["padding_rate"], [0.0], atol=1e-6)       # 6 of 6 slots filled
    np.testing.assert_allclose(st["expert_demand"], [[4, 4, 2]], atol=1e-6)
    np.testing.assert_allclose(st["expert_load"], [[2, 2, 2]], atol=1e-6)
    np.testing.assert_allclose(st["fill_in_slots"], [0], atol=1e-6)
    np.testing.assert_allclose(st["num_tokens"], [5], atol=1e-6)
    # dispatch / combine: s0 holds (e0, 0) and (e1, 1).
    assert t["dispatch"][0, 0, 0, 0] and t["dispatch"][0, 0, 1, 1] and t["dispatch"][0].sum() == 6
    np.testing.assert_allclose(t["combine"][0, 1, 2, 1], 1 / 3, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_golden_bpr(impl):
    # Top-1 probabilities: s0 .5, s1 .6, s2 .7, s3 .7, s4 .6 -> order s2, s3 (tie .7: position),
    # s1, s4 (tie .6: position), s0.
    # rank 0: s2->e1 pos0 ok, s3->e0 pos0 ok, s1->e0 pos1 ok, s4->e2 pos0 ok, s0->e0 pos2 DROP.
    # rank 1: s2->e0 pos3 DROP, s3->e1 pos1 ok, s1->e2 pos1 ok, s4->e1 pos2 DROP, s0->e1 pos3 DROP.
    t = route(impl, PROBS_A, top_k=2, capacity=2, priority="bpr")
    np.testing.assert_array_equal(t["slot"][0], [[-1, -1], [1, 1], [0, -1], [0, 1], [0, -1]])
    np.testing.assert_allclose(
        t["combine_weight"][0], [[0, 0], [2 / 3, 1 / 3], [1, 0], [.7 / .9, .2 / .9], [1, 0]],
        atol=1e-6)
    np.testing.assert_allclose(t["stats"]["unrouted_rate"], [1 / 5], atol=1e-6)  # s0


@pytest.mark.parametrize("impl", IMPLS)
def test_golden_token_major(impl):
    # s0: e0 pos0 ok, e1 pos0 ok | s1: e0 pos1 ok, e2 pos0 ok | s2: e1 pos1 ok, e0 pos2 DROP |
    # s3: e0 pos3 DROP, e1 pos2 DROP | s4: e2 pos1 ok, e1 pos3 DROP.
    t = route(impl, PROBS_A, top_k=2, capacity=2, priority="token_major")
    np.testing.assert_array_equal(t["slot"][0], [[0, 0], [1, 0], [1, -1], [-1, -1], [1, -1]])
    # combine="probs": raw gates of the accepted choices.
    t = route(impl, PROBS_A, top_k=2, capacity=2, priority="token_major", combine="probs")
    np.testing.assert_allclose(
        t["combine_weight"][0], [[.5, .3], [.6, .3], [.7, 0], [0, 0], [.6, 0]], atol=1e-7)


# Example B (fill-in): G=1, S=6, E=4, k=1 -> K=2, C = expert_capacity(6, 4, 1, 1.0) = 2.
#   s0 [.6 .3 .1 0]   -> (e0, e1)         s1 [.5 .1 .4 0]   -> (e0, e2)
#   s2 [.7 0 0 .3]    -> (e0, e3)         s3 [.1 .8 .1 0]   -> (e1, e0)  tie e0/e2 at .1 -> e0
#   s4 [.2 0 .3 .5]   -> (e3, e2)         s5 [0 .45 .1 .45] -> (e1, e3)  tie e1/e3 at .45 -> e1 first
PROBS_B = np.array([[[.6, .3, .1, 0], [.5, .1, .4, 0], [.7, 0, 0, .3], [.1, .8, .1, 0],
                     [.2, 0, .3, .5], [0, .45, .1, .45]]], np.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_golden_fill_in_same(impl):
    # Top-1 phase: s0->e0 pos0, s1->e0 pos1, s2->e0 pos2 DROP, s3->e1 pos0, s4->e3 pos0, s5->e1 pos1.
    # Counters after ALL top-1 demand: e0=3, e1=2, e2=0, e3=1.
    # Fill-in phase, position order: s0->e1 pos2 DROP, s1->e2 pos0 ok, s2->e3 pos1 ok (rescues s2),
    #   s3->e0 pos3 DROP, s4->e2 pos1 ok, s5->e3 pos2 DROP.
    t = route(impl, PROBS_B, top_k=1, capacity=2, fill_in=True, fill_in_priority="same")
    assert t["num_choices"] == 2 and t["top_k"] == 1
    np.testing.assert_array_equal(t["expert_index"][0], [[0, 1], [0, 2], [0, 3], [1, 0], [3, 2], [1, 3]])
    np.testing.assert_array_equal(t["slot"][0], [[0, -1], [1, 0], [-1, 1], [0, -1], [0, 1], [1, -1]])
    # Normalised over all accepted incl. the fill-in: s1 .5/.9, .4/.9; s2 only fill-in -> 1;
    # s4 .5/.8, .3/.8.
    np.testing.assert_allclose(
        t["combine_weight"][0],
        [[1, 0], [5 / 9, 4 / 9], [0, 1], [1, 0], [.625, .375], [1, 0]], atol=1e-6)
    st = t["stats"]
    np.testing.assert_allclose(st["fill_in_slots"], [3], atol=1e-6)
    np.testing.assert_allclose(st["drop_rate"], [1 / 6], atol=1e-6)       # s2's top-1
    np.testing.assert_allclose(st["unrouted_rate"], [0], atol=1e-6)       # s2 rescued by fill-in
    np.testing.assert_allclose(st["padding_rate"], [0], atol=1e-6)        # 8 of 8 slots
    np.testing.assert_allclose(st["expert_demand"], [[3, 2, 0, 1]], atol=1e-6)  # top-k demand only
    np.testing.assert_allclose(st["expert_load"], [[2, 2, 2, 2]], atol=1e-6)
    # Without fill-in the same top-1 slots, and padding 3/8.
    v = route(impl, PROBS_B, top_k=1, capacity=2)
    np.testing.assert_array_equal(v["slot"][0, :, 0], t["slot"][0, :, 0])
    np.testing.assert_allclose(v["stats"]["padding_rate"], [3 / 8], atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_golden_fill_in_score(impl):
    # Same top-1 phase as above (counters e0=3, e1=2, e2=0, e3=1).
    # Fill-in candidates by their own probability, ties by position:
    #   s5 .45 (e3), s1 .4 (e2), s0 .3 (e1), s2 .3 (e3), s4 .3 (e2), s3 .1 (e0).
    #   s5->e3 pos1 ok, s1->e2 pos0 ok, s0->e1 pos2 DROP, s2->e3 pos2 DROP, s4->e2 pos1 ok,
    #   s3->e0 pos3 DROP.
    t = route(impl, PROBS_B, top_k=1, capacity=2, fill_in=True, fill_in_priority="score")
    np.testing.assert_array_equal(t["slot"][0], [[0, -1], [1, 0], [-1, -1], [0, -1], [0, 1], [1, 1]])
    np.testing.assert_allclose(
        t["combine_weight"][0],
        [[1, 0], [5 / 9, 4 / 9], [0, 0], [1, 0], [.625, .375], [.5, .5]], atol=1e-6)
    np.testing.assert_allclose(t["stats"]["fill_in_slots"], [3], atol=1e-6)
    np.testing.assert_allclose(t["stats"]["unrouted_rate"], [1 / 6], atol=1e-6)   # s2 now unrouted


@pytest.mark.parametrize("impl", IMPLS)
def test_golden_straight_through_and_masked(impl):
    # k=1, C=1, E=2: s0 [.3 .7] -> e1; s1 [.8 .2] -> e0 (padding); s2 [.6 .4] -> e0; s3 [.1 .9] -> e1.
    # s1 is padding, so s2 takes e0 slot 0; s3 overflows e1.
    probs = np.array([[[.3, .7], [.8, .2], [.6, .4], [.1, .9]]], np.float32)
    mask = np.array([[True, False, True, True]])
    t = route(impl, probs, top_k=1, capacity=1, straight_through=True, token_mask=mask)
    np.testing.assert_array_equal(t["slot"][0, :, 0], [0, -1, 0, -1])
    np.testing.assert_allclose(t["combine_weight"][0, :, 0], [1, 0, 1, 0])   # forward value 1
    st = t["stats"]
    np.testing.assert_allclose(st["num_tokens"], [3], atol=1e-6)
    np.testing.assert_allclose(st["drop_rate"], [1 / 3], atol=1e-6)
    np.testing.assert_allclose(st["unrouted_rate"], [1 / 3], atol=1e-6)
    np.testing.assert_allclose(st["expert_demand"], [[1, 2]], atol=1e-6)   # padding is not demand
    np.testing.assert_allclose(st["padding_rate"], [0], atol=1e-6)


# IR golden 1: the table of example A with position priority (n_acc: s0 2, s1 2, s2 1, s3 0, s4 1),
# K = k = 2, device holding experts 1 and 2 (first_expert=1, num_local=2).
#   local argmax by global prob: s0 (.3,.2)->0  s1 (.1,.3)->1  s2 (.7,.1)->0  s3 (.2,.1)->0
#   s4 (.3,.6)->1.
@pytest.mark.parametrize("impl", IMPLS)
def test_golden_ir_all_and_any(impl):
    tk = dict(top_k=2, capacity=2, priority="position")
    # "all": n_acc == 0 -> only s3; its local expert 0 (= e1), p = .2, lam = 2 - 0, total = 0.
    ir = ir_choice(impl, PROBS_A, tk, first_expert=1, num_local=2, mode="all")
    np.testing.assert_array_equal(ir["selected"][0], [0, 0, 0, 1, 0])
    np.testing.assert_array_equal(ir["slot"][0], [-1, -1, -1, 0, -1])
    assert ir["local_expert"][0, 3] == 0
    np.testing.assert_allclose(ir["p"][0, 3], .2, atol=1e-7)
    np.testing.assert_allclose(ir["lam"][0], [0, 0, 1, 2, 1])
    np.testing.assert_allclose(ir["total"][0], [.8, .9, .7, 0, .6], atol=1e-6)
    np.testing.assert_array_equal(ir["overflow"], [0])
    np.testing.assert_array_equal(ir["num_rectified"], [1])
    # "ignore_kth" without fill-in: n_acc < K - 1 = 1 -> same as "all" here.
    ir2 = ir_choice(impl, PROBS_A, tk, first_expert=1, num_local=2, mode="ignore_kth")
    np.testing.assert_array_equal(ir2["selected"], ir["selected"])
    # "any": n_acc < 2 -> s2, s3, s4. s2's local expert 0 (= e1) already accepted its rank 0, and s4's local
    #   expert 1 (= e2) its rank 0: both reuse that choice, no IR slot. s3 (nothing accepted) takes local 0 pos0
    #   of a 1-slot IR buffer. Nothing overflows; 3 tokens rectified.
    ir = ir_choice(impl, PROBS_A, tk, first_expert=1, num_local=2, mode="any", ir_capacity=1)
    np.testing.assert_array_equal(ir["selected"][0], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ir["slot"][0], [-1, -1, -1, 0, -1])
    np.testing.assert_array_equal(ir["reuse_choice"][0], [-1, -1, 0, -1, 0])
    np.testing.assert_array_equal(ir["placed"][0], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ir["local_expert"][0, 2:], [0, 0, 1])
    np.testing.assert_allclose(ir["p"][0, 2:], [.7, .2, .6], atol=1e-7)
    np.testing.assert_array_equal(ir["overflow"], [0])
    np.testing.assert_array_equal(ir["num_rectified"], [3])
    assert ir["dispatch"].shape == (1, 5, 2, 1)
    assert ir["dispatch"][0, 3, 0, 0] and ir["dispatch"].sum() == 1


# IR golden 2 (Top-2 + FR, K=3): S=4, E=3, k=2, C=1, position.
#   s0 [.5 .3 .2] -> (0,1,2)   s1 [.6 .3 .1] -> (0,1,2)   s2 [.2 .5 .3] -> (1,2,0)
#   s3 [.1 .2 .7] -> (2,1,0)
#   rank 0: s0 e0 ok, s1 e0 DROP, s2 e1 ok, s3 e2 ok; rank 1: all DROP (e1, e1, e2, e1 are full);
#   fill-in: all experts full -> all DROP.  n_acc = [1, 0, 1, 1].
PROBS_C = np.array([[[.5, .3, .2], [.6, .3, .1], [.2, .5, .3], [.1, .2, .7]]], np.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_golden_ir_ignore_kth_with_fill_in(impl):
    tk = dict(top_k=2, capacity=1, priority="position", fill_in=True)
    t = route(impl, PROBS_C, **tk)
    np.testing.assert_array_equal(t["slot"][0], [[0, -1, -1], [-1, -1, -1], [0, -1, -1], [0, -1, -1]])
    # Device holds expert 2 only: local_expert 0, p = probs[:, 2] = [.2, .1, .3, .7].
    # "all": s1 only.
    ir = ir_choice(impl, PROBS_C, tk, first_expert=2, num_local=1, mode="all")
    np.testing.assert_array_equal(ir["selected"][0], [0, 1, 0, 0])
    # "ignore_kth": n_acc < K - 1 = 2 -> every token. lam = 3 - n_acc, total = accepted gate sum.
    # s3 accepted e2 (its rank 0) and reuses it. IR buffer of 2 slots with priority "bpr" (top-1 prob
    # .5 .6 .5 .7 -> order s3, s1, s0, s2): s3 reuses, s1 pos0, s0 pos1, s2 OVERFLOW.
    ir = ir_choice(impl, PROBS_C, tk, first_expert=2, num_local=1, mode="ignore_kth",
                   ir_capacity=2, priority="bpr")
    np.testing.assert_array_equal(ir["selected"][0], [1, 1, 1, 1])
    np.testing.assert_array_equal(ir["slot"][0], [1, 0, -1, -1])
    np.testing.assert_array_equal(ir["reuse_choice"][0], [-1, -1, -1, 0])
    np.testing.assert_array_equal(ir["local_expert"][0], [0, 0, 0, 0])
    np.testing.assert_allclose(ir["p"][0], [.2, .1, .3, .7], atol=1e-7)
    np.testing.assert_allclose(ir["lam"][0], [2, 3, 2, 2])
    np.testing.assert_allclose(ir["total"][0], [.5, 0, .5, .7], atol=1e-7)
    np.testing.assert_array_equal(ir["overflow"], [1])
    np.testing.assert_array_equal(ir["num_rectified"], [3])
    # Same with position priority: s0 pos0, s1 pos1, s2 overflows, s3 reuses.
    ir = ir_choice(impl, PROBS_C, tk, first_expert=2, num_local=1, mode="ignore_kth",
                   ir_capacity=2, priority="position")
    np.testing.assert_array_equal(ir["slot"][0], [0, 1, -1, -1])
    np.testing.assert_array_equal(ir["placed"][0], [1, 1, 0, 1])
    # "any": n_acc < K = 3 (the gate's k, as the official code) -> every token as well.
    ir = ir_choice(impl, PROBS_C, tk, first_expert=2, num_local=1, mode="any")
    np.testing.assert_array_equal(ir["selected"][0], [1, 1, 1, 1])


# ------------------------------------------------------------------------------------------------
# Random comparison: module vs reference
# ------------------------------------------------------------------------------------------------
def make_probs(seed, G, S, E):
    """G groups, each a different kind of input; returns float32 probs [G,S,E] and a mask [G,S]."""
    rng = np.random.default_rng(seed)
    probs = np.zeros((G, S, E), np.float64)
    mask = np.ones((G, S), bool)
    kinds = ["normal", "ties", "one_expert", "ties", "normal", "uniform", "ties", "normal"]
    for g in range(G):
        kind = kinds[g % len(kinds)]
        if kind == "normal":
            logits = rng.normal(size=(S, E)) * 2.0
            p = np.exp(logits - logits.max(-1, keepdims=True))
        elif kind == "ties":  # quantised: many exactly equal probabilities, also across tokens
            p = rng.integers(0, 3, size=(S, E)).astype(np.float64)
            p[p.sum(-1) == 0, 0] = 1.0
        elif kind == "one_expert":  # every token prefers the same expert
            logits = rng.normal(size=(S, E)) * 0.3
            logits[:, int(rng.integers(E))] += 6.0
            p = np.exp(logits - logits.max(-1, keepdims=True))
        else:  # uniform: every probability tied
            p = np.ones((S, E))
        probs[g] = p / p.sum(-1, keepdims=True)
        if g % 8 in (3, 4, 7):
            mask[g] = rng.random(S) < 0.6
        elif g % 8 == 6:
            mask[g] = False
    return probs.astype(np.float32), mask


# (S, E, k, C): odd sizes, E > S, E == 1, tiny and roomy capacities.
SHAPES = [
    (1, 1, 1, 1),
    (1, 3, 2, 1),
    (3, 2, 1, 1),
    (3, 8, 2, 1),      # E > S
    (7, 3, 2, 3),
    (7, 5, 1, 2),
    (13, 5, 3, 4),
    (13, 8, 2, 2),
    (13, 2, 1, 13),    # nothing overflows top-1
    (7, 3, 1, 1),
]


def assert_tables_match(got, want, ctx=""):
    for name in ("expert_index", "slot", "dispatch", "token_mask", "accepted", "num_accepted"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name} {ctx}")
    for name in ("gate", "combine_weight", "combine"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=f"{name} {ctx}")
    for name in ("num_experts", "capacity", "top_k", "num_choices"):
        assert got[name] == want[name], (name, got[name], want[name], ctx)
    assert got["expert_index"].dtype == np.int32 and got["slot"].dtype == np.int32
    assert got["gate"].dtype == np.float32 and got["combine_weight"].dtype == np.float32
    assert got["dispatch"].dtype == np.bool_ and got["combine"].dtype == np.float32
    valid_group = want["stats"]["num_tokens"] > 0
    for name in STAT_NAMES:
        g, w = got["stats"][name], want["stats"][name]
        assert g.dtype == np.float32, (name, g.dtype)
        assert g.shape == w.shape, (name, g.shape, w.shape)
        if name == "padding_rate":
            # A group with no valid tokens: "rates are 0" or 1 - 0/(E*C) = 1; the contract is
            # ambiguous here, so only groups with valid tokens are compared exactly.
            np.testing.assert_allclose(g[valid_group], w[valid_group], atol=1e-6, err_msg=f"{name} {ctx}")
            assert np.all(np.isclose(g[~valid_group], 0) | np.isclose(g[~valid_group], 1)), (name, g)
        else:
            np.testing.assert_allclose(g, w, atol=1e-6, err_msg=f"{name} {ctx}")


def _route_cases():
    for n, (S, E, k, C) in enumerate(SHAPES):
        for priority in ref.PRIORITIES:
            for fname, fill_in, fip in FILL_VARIANTS:
                if fill_in and k + 1 > E:
                    continue
                # "probs" only changes the weights: check it on every other shape.
                combines = [("normalized", False)] + ([("probs", False)] if n % 2 == 0 else [])
                if k == 1 and not fill_in:
                    # straight-through overrides the combine mode (forward value 1 either way)
                    combines.append(("normalized" if n % 2 else "probs", True))
                for combine, st in combines:
                    cname = f"st_{combine}" if st else combine
                    yield pytest.param(S, E, k, C, priority, fill_in, fip, combine, st,
                                       id=f"S{S}E{E}k{k}C{C}-{priority}-fill_{fname}-{cname}")


@pytest.mark.parametrize("S,E,k,C,priority,fill_in,fip,combine,st", list(_route_cases()))
def test_route_top_k_matches_reference(S, E, k, C, priority, fill_in, fip, combine, st):
    kw = dict(top_k=k, capacity=C, priority=priority, fill_in=fill_in, fill_in_priority=fip,
              combine=combine, straight_through=st)
    # 16 groups = 16 independent random cases (with different kinds of inputs) per call.
    probs, mask = make_probs(hash((S, E, k, C)) % 2**31, 16, S, E)
    _, got = module_route(probs, token_mask=mask, **kw)
    want = ref.route_top_k(probs, token_mask=mask, **kw)
    assert_tables_match(got, want, ctx=str(kw))


def test_route_top_k_eager_matches_jit_and_default_mask():
    probs, _ = make_probs(1, 4, 7, 5)
    kw = dict(top_k=2, capacity=2, priority="bpr", fill_in=True)
    eager = _table_to_dict(routing.route_top_k(jnp.asarray(probs), **kw))
    want = ref.route_top_k(probs, **kw)
    assert_tables_match(eager, want)
    assert eager["token_mask"].all()
    for priority, fip in (("bpr", "score"), ("token_major", "same")):
        kw = dict(top_k=2, capacity=2, priority=priority, fill_in=True, fill_in_priority=fip)
        _, jitted = module_route(probs, jit=True, **kw)
        assert_tables_match(jitted, ref.route_top_k(probs, **kw), ctx=str(kw))


def test_route_top_k_default_arguments():
    """Defaults: priority="position", fill_in=False, combine="normalized"."""
    probs, mask = make_probs(2, 8, 7, 3)
    got = _table_to_dict(routing.route_top_k(jnp.asarray(probs), top_k=2, capacity=2,
                                             token_mask=jnp.asarray(mask)))
    assert_tables_match(got, ref.route_top_k(probs, top_k=2, capacity=2, token_mask=mask))


def test_fill_in_accepts_same_top_k_as_vanilla():
    for seed in range(3):
        probs, mask = make_probs(seed, 16, 13, 5)
        for priority in ref.PRIORITIES:
            for fip in ref.FILL_IN_PRIORITIES:
                _, v = module_route(probs, token_mask=mask, top_k=2, capacity=3, priority=priority)
                _, f = module_route(probs, token_mask=mask, top_k=2, capacity=3, priority=priority,
                                    fill_in=True, fill_in_priority=fip)
                np.testing.assert_array_equal(f["slot"][..., :2], v["slot"])
                np.testing.assert_array_equal(f["expert_index"][..., :2], v["expert_index"])


# ------------------------------------------------------------------------------------------------
# IR vs reference
# ------------------------------------------------------------------------------------------------
def assert_ir_match(got, want, ctx=""):
    for name in ("selected", "slot", "dispatch", "overflow", "num_rectified", "placed"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name} {ctx}")
    # local_expert and p are defined for every token (the contract does not restrict them to the
    # selected ones); only the selected tokens use them.
    np.testing.assert_array_equal(got["local_expert"], want["local_expert"],
                                  err_msg=f"local_expert {ctx}")
    np.testing.assert_allclose(got["p"], want["p"], atol=1e-7, err_msg=f"p {ctx}")
    np.testing.assert_allclose(got["lam"], want["lam"], atol=1e-6, err_msg=f"lam {ctx}")
    np.testing.assert_allclose(got["total"], want["total"], atol=1e-6, err_msg=f"total {ctx}")
    assert got["local_expert"].dtype == np.int32 and got["slot"].dtype == np.int32
    assert got["overflow"].dtype == np.int32 and got["num_rectified"].dtype == np.int32
    assert got["p"].dtype == np.float32 and got["lam"].dtype == np.float32
    assert got["dispatch"].dtype == np.bool_


IR_TABLES = [  # (S, E, k, C, fill_in)
    (7, 4, 1, 1, False),
    (13, 8, 2, 2, False),
    (13, 8, 2, 1, True),
    (7, 4, 1, 1, True),
    (5, 2, 1, 1, False),
]


def _ir_cases():
    caps = (None, 1, 2)
    i = 0
    for S, E, k, C, fill_in in IR_TABLES:
        for L in (1, 2, 4):
            if L > E:
                continue
            for first in sorted({0, E - L, (E // 2) // L * L}):
                # cycle the IR buffer size and the priority over the cases
                ir_cap, priority = caps[i % 3], ref.PRIORITIES[(i // 3) % 3]
                i += 1
                name = f"S{S}E{E}k{k}C{C}fill{int(fill_in)}-fe{first}L{L}-cap{ir_cap}-{priority}"
                yield pytest.param(S, E, k, C, fill_in, first, L, ir_cap, priority, id=name)


@pytest.mark.parametrize("S,E,k,C,fill_in,first,L,ir_cap,priority", list(_ir_cases()))
def test_intra_device_choice_matches_reference(S, E, k, C, fill_in, first, L, ir_cap, priority):
    probs, mask = make_probs(hash((S, E, k, first, L)) % 2**31, 8, S, E)
    tk = dict(top_k=k, capacity=C, priority=priority, fill_in=fill_in)
    table, t = module_route(probs, token_mask=mask, **tk)
    for mode in ref.IR_MODES:
        kw = dict(first_expert=first, num_local=L, mode=mode, ir_capacity=ir_cap,
                  priority=priority)
        got = _ir_to_dict(intra_device.intra_device_choice(jnp.asarray(probs), table, **kw))
        want = ref.intra_device_choice(
            probs, expert_index=t["expert_index"], gate=t["gate"], slot=t["slot"],
            token_mask=mask, top_k=k, num_choices=t["num_choices"], **kw)
        assert_ir_match(got, want, ctx=f"{tk} {kw}")
        assert got["dispatch"].shape == (8, S, L, S if ir_cap is None else ir_cap)


@pytest.mark.parametrize("mode", ref.IR_MODES)
def test_intra_device_choice_traced_first_expert(mode):
    S, E, k, C, L = 13, 8, 2, 1, 2
    probs, mask = make_probs(7, 8, S, E)
    table, t = module_route(probs, token_mask=mask, top_k=k, capacity=C, fill_in=True)

    @jax.jit
    def f(p, tab, fe):
        return intra_device.intra_device_choice(p, tab, first_expert=fe, num_local=L, mode=mode,
                                           ir_capacity=2, priority="bpr")

    for fe in (0, 2, 4, 6, 3):
        got = _ir_to_dict(f(jnp.asarray(probs), table, jnp.int32(fe)))
        want = ref.intra_device_choice(
            probs, expert_index=t["expert_index"], gate=t["gate"], slot=t["slot"], token_mask=mask,
            top_k=k, num_choices=t["num_choices"], first_expert=fe, num_local=L, mode=mode,
            ir_capacity=2, priority="bpr")
        assert_ir_match(got, want, ctx=f"fe={fe}")


# ------------------------------------------------------------------------------------------------
# Blend: the spec's worked cases (rectify_router.md §3.2 and §5)
# ------------------------------------------------------------------------------------------------
def _blend(*args, **kw):
    return np.asarray(intra_device.ir_blend(*(jnp.asarray(a) for a in args), **kw))


def test_blend_worked_cases():
    rng = np.random.default_rng(0)
    D = 5
    y_loc, y_a = rng.normal(size=(2, D)).astype(np.float32)
    p, g_a = np.float32(0.3), np.float32(0.45)
    one = np.ones((), bool)
    # Top-1 + IR: T = 0, lam = 1 -> y_new = y_loc * p / p = y_loc (forward weight 1); y (= 0) unused.
    out = _blend(np.zeros(D, np.float32), y_loc, p, np.float32(1), np.float32(0), one)
    np.testing.assert_allclose(out, y_loc, rtol=1e-6)
    # Top-2 + IR ('any'), one accepted expert a: y = y_a (weight g_a/g_a), lam = 1, T = g_a.
    out = _blend(y_a, y_loc, p, np.float32(1), g_a, one)
    np.testing.assert_allclose(out, (p * y_loc + g_a * y_a) / (g_a + p), rtol=1e-6)
    # Zero accepted (any k): T = 0, y = 0 -> y_new = y_loc (lam cancels).
    out = _blend(np.zeros(D, np.float32), y_loc, p, np.float32(2), np.float32(0), one)
    np.testing.assert_allclose(out, y_loc, rtol=1e-6)
    # Top-2 + IR + FR (K = 3), one accepted: lam = K - n_acc = 2.
    out = _blend(y_a, y_loc, p, np.float32(2), g_a, one)
    np.testing.assert_allclose(out, (2 * p * y_loc + g_a * y_a) / (g_a + 2 * p), rtol=1e-6)
    # Not placed: y unchanged.
    out = _blend(y_a, y_loc, p, np.float32(2), g_a, np.zeros((), bool))
    np.testing.assert_array_equal(out, y_a)
    # p = 0 and T = 0 -> denominator clamps to eps, output 0 instead of NaN.
    out = _blend(y_a, y_loc, np.float32(0), np.float32(1), np.float32(0), one)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, 0, atol=1e-6)


def test_blend_matches_reference_batched():
    rng = np.random.default_rng(1)
    G, S, D = 3, 7, 4
    y, y_loc = rng.normal(size=(2, G, S, D)).astype(np.float32)
    p = rng.random((G, S)).astype(np.float32)
    lam = rng.integers(0, 4, (G, S)).astype(np.float32)
    total = (rng.random((G, S)) * (rng.random((G, S)) < 0.7)).astype(np.float32)
    placed = rng.random((G, S)) < 0.6
    got = _blend(y, y_loc, p, lam, total, placed)
    np.testing.assert_allclose(got, ref.ir_blend(y, y_loc, p, lam, total, placed), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Gradients (detached denominators held constant in the finite differences)
# ------------------------------------------------------------------------------------------------
def _softmax64(x):
    x = np.asarray(x, np.float64)
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _central_fd(f, x, eps=1e-6):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        grad[idx] = (f(xp) - f(xm)) / (2 * eps)
    return grad


@pytest.mark.parametrize("mode,fill_in", [("normalized", False), ("normalized", True),
                                          ("probs", False), ("probs", True),
                                          ("straight_through", False)])  # ST is top-1 only
def test_combine_weight_gradient_matches_frozen_fd(mode, fill_in):
    G, S, E = 2, 7, 4
    k = 1 if mode == "straight_through" else 2
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(G, S, E)).astype(np.float32)
    K = k + 1 if fill_in else k
    W = rng.normal(size=(G, S, K))
    combine = "probs" if mode == "probs" else "normalized"
    kw = dict(top_k=k, capacity=2, priority="bpr", fill_in=fill_in, combine=combine,
              straight_through=mode == "straight_through")

    def loss(lg):
        t = routing.route_top_k(jax.nn.softmax(lg, axis=-1), **kw)
        return jnp.sum(t.combine_weight * jnp.asarray(W, jnp.float32))

    got = np.asarray(jax.grad(loss)(jnp.asarray(logits)))

    # Freeze the routing (expert_index, accepted) and the detached denominator at this point.
    t = ref.route_top_k(_softmax64(logits).astype(np.float32), **kw)
    idx, acc = t["expert_index"], t["accepted"]
    assert acc.sum() > 0
    den = np.maximum((t["gate"] * acc).sum(-1), 1e-9)
    scale = (1.0 / den)[..., None] if mode == "normalized" else np.ones((G, S, 1))

    def frozen(lg):
        pr = _softmax64(lg)
        g = np.take_along_axis(pr, idx, axis=-1)
        return float(np.sum(W * acc * g * scale))

    want = _central_fd(frozen, logits)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-5)

    if mode == "normalized" and (acc.sum(-1) >= 2).any():
        # The gradient is NOT the gradient of the full ratio g_j / sum(g) (denominator detached).
        def ratio(lg):
            pr = _softmax64(lg)
            g = np.take_along_axis(pr, idx, axis=-1) * acc
            return float(np.sum(W * g / np.maximum(g.sum(-1, keepdims=True), 1e-9)))
        assert not np.allclose(got, _central_fd(ratio, logits), atol=1e-4)


def test_combine_tensor_gradient_matches_combine_weight_gradient():
    """dispatch/combine carry the same (differentiable) weights as combine_weight."""
    rng = np.random.default_rng(4)
    probs = jnp.asarray(_softmax64(rng.normal(size=(2, 6, 3))).astype(np.float32))
    kw = dict(top_k=2, capacity=2, fill_in=False)
    Wc = jnp.asarray(rng.normal(size=(2, 6, 3, 2)), jnp.float32)
    t = routing.route_top_k(probs, **kw)

    def via_combine(p):
        return jnp.sum(routing.route_top_k(p, **kw).combine * Wc)

    # The same loss written with combine_weight and (expert_index, slot).
    e, c, acc = np.asarray(t.expert_index), np.maximum(np.asarray(t.slot), 0), np.asarray(t.accepted)
    Wcw = np.asarray(Wc)[np.arange(2)[:, None, None], np.arange(6)[None, :, None], e, c] * acc

    def via_weight(p):
        return jnp.sum(routing.route_top_k(p, **kw).combine_weight * jnp.asarray(Wcw))

    np.testing.assert_allclose(jax.grad(via_combine)(probs), jax.grad(via_weight)(probs),
                               rtol=1e-5, atol=1e-6)


def test_ir_blend_gradient_matches_frozen_fd():
    rng = np.random.default_rng(5)
    G, S, D = 2, 5, 3
    y, y_loc = rng.normal(size=(2, G, S, D)).astype(np.float32)
    p = (rng.random((G, S)) * 0.8 + 0.1).astype(np.float32)
    lam = rng.integers(1, 4, (G, S)).astype(np.float32)
    total = (rng.random((G, S)) * (rng.random((G, S)) < 0.6)).astype(np.float32)
    placed = rng.random((G, S)) < 0.7
    W = rng.normal(size=(G, S, D))

    def loss(p_, y_, yl_):
        out = intra_device.ir_blend(y_, yl_, p_, jnp.asarray(lam), jnp.asarray(total), jnp.asarray(placed))
        return jnp.sum(out * jnp.asarray(W, jnp.float32))

    gp, gy, gyl = (np.asarray(a) for a in
                   jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(p), jnp.asarray(y), jnp.asarray(y_loc)))

    den0 = np.maximum(total + lam * p.astype(np.float64), 1e-9)  # detached: frozen

    def frozen(p_, y_, yl_):
        pl = placed[..., None]
        new = (yl_ * (p_ * lam)[..., None] + total[..., None] * y_) / den0[..., None]
        return float(np.sum(W * np.where(pl, new, y_)))

    np.testing.assert_allclose(gp, _central_fd(lambda a: frozen(a, y, y_loc), p), rtol=1e-3, atol=2e-5)
    np.testing.assert_allclose(gy, _central_fd(lambda a: frozen(p, a, y_loc), y), rtol=1e-3, atol=2e-5)
    np.testing.assert_allclose(gyl, _central_fd(lambda a: frozen(p, y, a), y_loc), rtol=1e-3, atol=2e-5)
    # Top-1 case (T = 0, lam = 1): forward weight 1 but d/dp = y_loc / p (ST-like).
    one = jnp.ones((), bool)
    gp1 = jax.grad(lambda q: jnp.sum(intra_device.ir_blend(jnp.zeros(D), jnp.asarray(y_loc[0, 0]), q,
                                                      jnp.float32(1), jnp.float32(0), one)))(
        jnp.float32(0.25))
    np.testing.assert_allclose(gp1, y_loc[0, 0].sum() / 0.25, rtol=1e-5)


def test_ir_blend_weights_closed_form():
    """keep = T / max(T + lam p, eps) and local = lam p / max(T + lam p, eps) where placed, 1 and 0 elsewhere
    (ir_blend is keep * y + local * y_local; the tests above check it against the reference)."""
    rng = np.random.default_rng(8)
    p = rng.random(12).astype(np.float32)
    lam = rng.integers(0, 4, 12).astype(np.float32)
    total = (rng.random(12) * (rng.random(12) < 0.6)).astype(np.float32)
    placed = rng.random(12) < 0.7
    p[0], total[0], placed[0] = 0.0, 0.0, True  # clamped denominator
    keep, local = (np.asarray(a) for a in intra_device.ir_blend_weights(*(jnp.asarray(v) for v in (p, lam, total, placed))))
    den = np.maximum(total.astype(np.float64) + lam * p, 1e-9)
    np.testing.assert_allclose(keep, np.where(placed, total / den, 1.0), rtol=1e-6)
    np.testing.assert_allclose(local, np.where(placed, lam * p / den, 0.0), rtol=1e-6)
    assert keep[0] == 0.0 and local[0] == 0.0


def test_ir_p_is_differentiable_and_lam_total_are_detached():
    rng = np.random.default_rng(6)
    probs, mask = make_probs(11, 4, 7, 4)
    table, t = module_route(probs, token_mask=mask, top_k=2, capacity=1)
    w = jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)
    kw = dict(first_expert=2, num_local=2, mode="any")

    def f(field):
        def inner(pr):
            tab = routing.route_top_k(pr, top_k=2, capacity=1, token_mask=jnp.asarray(mask))
            ir = intra_device.intra_device_choice(pr, tab, **kw)
            val = getattr(ir, field)
            return jnp.sum(jnp.where(ir.selected, val, 0.0) * w)
        return np.asarray(jax.grad(inner)(jnp.asarray(probs)))

    ir = _ir_to_dict(intra_device.intra_device_choice(jnp.asarray(probs), table, **kw))
    expected = np.zeros_like(probs)
    for g, s in zip(*np.nonzero(ir["selected"])):
        expected[g, s, 2 + ir["local_expert"][g, s]] = np.asarray(w)[g, s]
    assert ir["selected"].any()
    np.testing.assert_allclose(f("p"), expected, atol=1e-7)
    np.testing.assert_array_equal(f("lam"), 0)
    np.testing.assert_array_equal(f("total"), 0)


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("all_k", [False, True])
@pytest.mark.parametrize("masked", ["none", "partial", "empty_group"])
def test_load_balance_loss_matches_reference(all_k, masked):
    for seed in range(4):
        probs, mask = make_probs(seed, 8, 9, 5)
        if masked == "partial":
            mask[6] = True
        elif masked == "none":
            mask = None
        # "empty_group": group 6 is all padding. It contributes 0 and still counts in the mean over
        # groups (the literal reading of "mean over groups"; see the report on this ambiguity).
        t = ref.route_top_k(probs, top_k=2, capacity=2, token_mask=mask)
        ei = t["expert_index"].astype(np.int32)
        got = routing.load_balance_loss(jnp.asarray(probs), jnp.asarray(ei),
                                        token_mask=None if mask is None else jnp.asarray(mask),
                                        all_k=all_k)
        assert np.shape(got) == ()
        np.testing.assert_allclose(float(got), ref.load_balance_loss(probs, ei, mask, all_k),
                                   rtol=1e-5, atol=1e-6)


def test_load_balance_loss_balanced_is_one():
    G, S, E = 2, 8, 4
    probs = np.full((G, S, E), 1 / E, np.float32)
    ei = np.broadcast_to(np.arange(S)[None, :, None] % E, (G, S, 1)).astype(np.int32)
    np.testing.assert_allclose(float(routing.load_balance_loss(jnp.asarray(probs), jnp.asarray(ei))),
                               1.0, rtol=1e-6)
    # Masked tokens do not count: padding the second half (still balanced) keeps 1.
    mask = np.zeros((G, S), bool)
    mask[:, :E] = True
    probs2 = probs.copy()
    probs2[:, E:] = np.eye(E, dtype=np.float32)[0]   # junk on padding must be ignored
    ei2 = ei.copy()
    ei2[:, E:] = 0
    np.testing.assert_allclose(float(routing.load_balance_loss(
        jnp.asarray(probs2), jnp.asarray(ei2), token_mask=jnp.asarray(mask))), 1.0, rtol=1e-6)
    # all_k with K = 2 and balanced choices sums f to 2 -> loss 2.
    ei3 = np.stack([ei[..., 0], (ei[..., 0] + 1) % E], -1).astype(np.int32)
    np.testing.assert_allclose(float(routing.load_balance_loss(
        jnp.asarray(probs), jnp.asarray(ei3), all_k=True)), 2.0, rtol=1e-6)
    # Everything on one expert with all its probability: E * 1 * 1 = E.
    probs4 = np.zeros((G, S, E), np.float32)
    probs4[..., 1] = 1
    ei4 = np.ones((G, S, 1), np.int32)
    np.testing.assert_allclose(float(routing.load_balance_loss(jnp.asarray(probs4), jnp.asarray(ei4))),
                               E, rtol=1e-6)


def test_router_z_loss():
    G, S, E = 2, 3, 8
    assert np.isclose(float(routing.router_z_loss(jnp.zeros((G, S, E)))), math.log(E) ** 2, rtol=1e-6)
    logits = np.zeros((G, S, E), np.float32)
    logits[0, 0, 3] = 5.0
    lse = math.log(math.exp(5.0) + E - 1)
    want = (lse ** 2 + 5 * math.log(E) ** 2) / 6
    np.testing.assert_allclose(float(routing.router_z_loss(jnp.asarray(logits))), want, rtol=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(3):
        logits = (rng.normal(size=(3, 5, 4)) * 3).astype(np.float32)
        mask = rng.random((3, 5)) < 0.6
        mask[0, 0] = True
        got = float(routing.router_z_loss(jnp.asarray(logits), token_mask=jnp.asarray(mask)))
        np.testing.assert_allclose(got, ref.router_z_loss(logits, mask), rtol=1e-5)
        assert np.isclose(float(routing.router_z_loss(jnp.asarray(logits))),
                          ref.router_z_loss(logits), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Validation errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=4, capacity=2), "top_k"),
    (dict(top_k=3, capacity=2, fill_in=True), "fill_in|top_k"),
    (dict(top_k=1, capacity=0), "capacity"),
    (dict(top_k=1, capacity=2, priority="random"), "priority"),
    (dict(top_k=1, capacity=2, fill_in=True, fill_in_priority="random"), "fill_in_priority"),
    (dict(top_k=1, capacity=2, combine="softmax"), "combine"),
    (dict(top_k=2, capacity=2, straight_through=True), "straight_through"),
    (dict(top_k=1, capacity=2, fill_in=True, straight_through=True), "straight_through"),
    (dict(top_k=1, capacity=2, token_mask=jnp.ones((2, 4), bool)), "token_mask"),
    (dict(top_k=1, capacity=2, token_mask=jnp.ones((1, 5), bool)), "token_mask"),
])
def test_route_top_k_validation(kwargs, match):
    probs = jnp.full((1, 4, 3), 1 / 3, jnp.float32)
    with pytest.raises(ValueError, match=match):
        routing.route_top_k(probs, **kwargs)


def test_expert_capacity_validation():
    with pytest.raises(ValueError, match="capacity_factor|min_capacity"):
        routing.expert_capacity(8, 4, 1, 0.0)
    assert routing.expert_capacity(8, 4, 1, 0.0, min_capacity=1) == 1


def test_intra_device_choice_validation():
    probs = jnp.full((1, 4, 3), 1 / 3, jnp.float32)
    table = routing.route_top_k(probs, top_k=1, capacity=1)
    with pytest.raises(ValueError, match="mode"):
        intra_device.intra_device_choice(probs, table, first_expert=0, num_local=1, mode="some")
    with pytest.raises(ValueError, match="priority"):
        intra_device.intra_device_choice(probs, table, first_expert=0, num_local=1, mode="all",
                                    priority="random")
