"""Property-based tests of rectify_moe.routing (hypothesis), against docs/routing_contract.md.

Shapes come from a small fixed list and the module is called eagerly, so JAX only compiles each
primitive once per shape (no per-example recompilation).
"""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import jax.numpy as jnp

import routing_reference as ref
from rectify_moe import intra_device, routing


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (G, S, E, k, C): small fixed shapes; E > S in the last one; E == k + 1 in the first.
CONFIGS = [(2, 5, 3, 2, 2), (2, 7, 4, 1, 2), (1, 9, 5, 2, 3), (2, 4, 8, 3, 1), (1, 6, 2, 1, 1)]


def _normalise(w):
    w = w.astype(np.float64)
    w[w.sum(-1) == 0, 0] = 1.0
    return (w / w.sum(-1, keepdims=True)).astype(np.float32)


@st.composite
def cases(draw, need_fill_in=False):
    configs = [c for c in CONFIGS if not need_fill_in or c[3] + 1 <= c[2]]
    G, S, E, k, C = draw(st.sampled_from(configs))
    if draw(st.booleans()):  # continuous: softmax of bounded logits
        logits = draw(arrays(np.float32, (G, S, E), elements=st.floats(-4, 4, width=32)))
        z = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
        probs = (z / z.sum(-1, keepdims=True)).astype(np.float32)
    else:  # quantised: many exact ties, within and across tokens
        probs = _normalise(draw(arrays(np.int8, (G, S, E), elements=st.integers(0, 3))))
    mask = draw(arrays(np.bool_, (G, S)))
    priority = draw(st.sampled_from(ref.PRIORITIES))
    fill_in = draw(st.booleans()) if (k + 1 <= E and not need_fill_in) else k + 1 <= E
    fill_in_priority = draw(st.sampled_from(ref.FILL_IN_PRIORITIES))
    return probs, mask, dict(top_k=k, capacity=C, priority=priority, fill_in=fill_in,
                             fill_in_priority=fill_in_priority)


def _np(table):
    return {name: np.asarray(getattr(table, name)) for name in
            ("expert_index", "gate", "slot", "combine_weight", "dispatch", "combine", "accepted",
             "num_accepted")}


@SETTINGS
@given(cases(), st.sampled_from(["normalized", "probs"]))
def test_table_invariants(case, combine):
    probs, mask, kw = case
    table = routing.route_top_k(jnp.asarray(probs), token_mask=jnp.asarray(mask), combine=combine, **kw)
    t = _np(table)
    G, S, E = probs.shape
    k, C = kw["top_k"], kw["capacity"]
    K = k + 1 if kw["fill_in"] else k
    assert t["slot"].shape == (G, S, K) and t["dispatch"].shape == (G, S, E, C)
    idx, slot, acc = t["expert_index"], t["slot"], t["accepted"]

    # Ranked choices: distinct experts, probabilities non-increasing, gate = probs[expert_index].
    assert all(len(set(row)) == K for row in idx.reshape(-1, K))
    np.testing.assert_array_equal(t["gate"], np.take_along_axis(probs, idx, -1))
    assert np.all(np.diff(t["gate"], axis=-1) <= 0)

    # Slots are -1 or in [0, C); accepted == slot >= 0; num_accepted counts them.
    assert np.all((slot == -1) | ((slot >= 0) & (slot < C)))
    np.testing.assert_array_equal(acc, slot >= 0)
    np.testing.assert_array_equal(t["num_accepted"], acc.sum(-1))

    disp = t["dispatch"]
    # No expert exceeds C per group; no (expert, slot) holds two tokens.
    assert np.all(disp.sum(axis=(1, 3)) <= C)
    assert np.all(disp.sum(axis=1) <= 1)
    # A token holds at most K slots, one per accepted ranked choice, on distinct experts.
    assert np.all(disp.sum(axis=(2, 3)) == acc.sum(-1))
    assert np.all(disp.sum(axis=3) <= 1)
    # Padding never dispatched.
    assert not disp[~mask].any() and not acc[~mask].any()

    # dispatch / combine agree with (expert_index, slot, combine_weight).
    want_disp = np.zeros_like(disp)
    want_comb = np.zeros(disp.shape, np.float32)
    for g, s, j in zip(*np.nonzero(acc)):
        want_disp[g, s, idx[g, s, j], slot[g, s, j]] = True
        want_comb[g, s, idx[g, s, j], slot[g, s, j]] = t["combine_weight"][g, s, j]
    np.testing.assert_array_equal(disp, want_disp)
    np.testing.assert_array_equal(t["combine"], want_comb)
    assert np.all(t["combine_weight"][~acc] == 0)

    total = (t["gate"] * acc).sum(-1)
    if combine == "normalized":
        # Weights sum to 1 for every token with an accepted choice (of non-zero probability).
        live = acc.any(-1) & (total > 1e-6)
        np.testing.assert_allclose(t["combine_weight"].sum(-1)[live], 1.0, rtol=1e-5)
    else:
        np.testing.assert_allclose(t["combine_weight"], t["gate"] * acc, rtol=1e-6)

    # Statistics: sane ranges and consistent with the table.
    stats = table.stats
    np.testing.assert_allclose(np.asarray(stats.num_tokens), mask.sum(-1))
    np.testing.assert_allclose(np.asarray(stats.expert_load), disp.sum(axis=(1, 3)))
    np.testing.assert_allclose(np.asarray(stats.expert_demand).sum(-1), mask.sum(-1) * k)
    np.testing.assert_allclose(np.asarray(stats.fill_in_slots), acc[..., k:].sum(axis=(1, 2)))
    for name in ("drop_rate", "unrouted_rate", "padding_rate"):
        v = np.asarray(getattr(stats, name))
        assert np.all((v >= -1e-6) & (v <= 1 + 1e-6)), (name, v)
    np.testing.assert_allclose(np.asarray(stats.padding_rate)[mask.any(-1)],
                               (1 - disp.sum(axis=(1, 2, 3)) / (E * C))[mask.any(-1)], atol=1e-6)


@SETTINGS
@given(cases())
def test_matches_reference(case):
    probs, mask, kw = case
    table = routing.route_top_k(jnp.asarray(probs), token_mask=jnp.asarray(mask), **kw)
    want = ref.route_top_k(probs, token_mask=mask, **kw)
    got = _np(table)
    for name in ("expert_index", "slot", "dispatch"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_allclose(got["combine_weight"], want["combine_weight"], rtol=1e-6, atol=1e-6)


@SETTINGS
@given(cases(need_fill_in=True))
def test_fill_in_keeps_vanilla_top_k_and_fills_only_padding(case):
    probs, mask, kw = case
    k, C = kw["top_k"], kw["capacity"]
    jp, jm = jnp.asarray(probs), jnp.asarray(mask)
    f = _np(routing.route_top_k(jp, token_mask=jm, **kw))
    vkw = dict(kw, fill_in=False)
    v = _np(routing.route_top_k(jp, token_mask=jm, **vkw))
    # The accepted top-k set (and slots) equal the vanilla top-k router's.
    np.testing.assert_array_equal(f["expert_index"][..., :k], v["expert_index"])
    np.testing.assert_array_equal(f["slot"][..., :k], v["slot"])
    # Fill-in takes only slots that vanilla leaves empty, at positions past the whole top-k demand.
    demand = np.zeros(probs.shape[::2], int)  # [G, E]
    for g, s, j in zip(*np.nonzero(np.broadcast_to(mask[..., None], v["slot"].shape))):
        demand[g, v["expert_index"][g, s, j]] += 1
    for g, s in zip(*np.nonzero(f["accepted"][..., k])):
        e, c = f["expert_index"][g, s, k], f["slot"][g, s, k]
        assert not v["dispatch"][g, :, e, c].any()
        assert c >= demand[g, e]
    # Weights: a token whose fill-in was refused keeps the vanilla weights; otherwise the top-k
    # weights shrink by total_topk / total_all.
    refused = ~f["accepted"][..., k]
    np.testing.assert_allclose(f["combine_weight"][..., :k][refused], v["combine_weight"][refused],
                               rtol=1e-5, atol=1e-7)
    # Filled slots = vanilla filled + fill-in slots; padding can only go down.
    assert np.all(f["dispatch"].sum(axis=(1, 3)) >= v["dispatch"].sum(axis=(1, 3)))


@SETTINGS
@given(cases(need_fill_in=True))
def test_fill_in_with_disabled_candidates_equals_vanilla(case):
    """The official repo's check (gpt-moe test_routing.py): top-(k+1) at the top-k capacity with the
    (k+1)-th choice disabled equals vanilla top-k. The public API cannot disable the fill-in
    candidates (giving the (k+1)-th expert zero probability only changes which expert is ranked
    k+1), so the disabled top-(k+1) router is the reference's test-only ``fill_in_disabled`` and it
    is compared with the module's vanilla top-k table, field by field over ranks < k."""
    probs, mask, kw = case
    k = kw["top_k"]
    disabled = ref.route_top_k(probs, token_mask=mask, fill_in_disabled=True, **kw)
    table = routing.route_top_k(jnp.asarray(probs), token_mask=jnp.asarray(mask),
                                **dict(kw, fill_in=False))
    v = _np(table)
    assert not disabled["accepted"][..., k].any()
    np.testing.assert_array_equal(disabled["expert_index"][..., :k], v["expert_index"])
    np.testing.assert_array_equal(disabled["slot"][..., :k], v["slot"])
    np.testing.assert_array_equal(disabled["dispatch"], v["dispatch"])
    np.testing.assert_allclose(disabled["combine"], v["combine"], rtol=1e-6, atol=1e-7)
    for name in ("drop_rate", "unrouted_rate", "expert_demand", "expert_load"):
        np.testing.assert_allclose(disabled["stats"][name], np.asarray(getattr(table.stats, name)),
                                   atol=1e-6, err_msg=name)


@SETTINGS
@given(cases(), st.sampled_from(ref.IR_MODES), st.sampled_from([1, 2, 4]), st.integers(0, 7),
       st.sampled_from([None, 1, 2]), st.sampled_from(ref.PRIORITIES))
def test_ir_invariants(case, mode, L, first_seed, ir_cap, ir_priority):
    probs, mask, kw = case
    G, S, E = probs.shape
    L = min(L, E)
    first = first_seed % (E - L + 1)
    table = routing.route_top_k(jnp.asarray(probs), token_mask=jnp.asarray(mask), **kw)
    ir = intra_device.intra_device_choice(jnp.asarray(probs), table, first_expert=first, num_local=L,
                                     mode=mode, ir_capacity=ir_cap, priority=ir_priority)
    sel, le, slot = (np.asarray(a) for a in (ir.selected, ir.local_expert, ir.slot))
    disp, placed = np.asarray(ir.dispatch), np.asarray(ir.placed)
    c_ir = S if ir_cap is None else ir_cap
    n_acc = np.asarray(table.num_accepted)
    k, K = table.top_k, table.num_choices
    assert disp.shape == (G, S, L, c_ir)
    # Only valid tokens are selected, with the mode's threshold.
    thr = {"all": n_acc == 0, "any": n_acc < K, "ignore_kth": n_acc < K - 1}[mode]
    np.testing.assert_array_equal(sel, thr & mask)
    # IR picks only local experts: the one with the highest global probability among them.
    assert np.all((le >= 0) & (le < L))
    local = probs[..., first:first + L]
    np.testing.assert_array_equal(le[sel], np.argmax(local, -1)[sel])
    np.testing.assert_allclose(np.asarray(ir.p)[sel], local.max(-1)[sel], rtol=1e-7)
    # Reuse: exactly the selected tokens whose local expert accepted one of their choices; reuse_choice
    # names that choice, and such a token takes no IR slot.
    reuse = np.asarray(ir.reuse_choice)
    eidx, tslot = np.asarray(table.expert_index), np.asarray(table.slot)
    same = (tslot >= 0) & (eidx == (first + le)[..., None])
    np.testing.assert_array_equal(reuse >= 0, sel & same.any(-1))
    for g, s in zip(*np.nonzero(reuse >= 0)):
        assert same[g, s, reuse[g, s]]
    assert np.all(slot[reuse >= 0] == -1)
    # Placement: placed => selected; slots in range; each (local expert, slot) holds <= 1 token.
    np.testing.assert_array_equal(placed, (slot >= 0) | (reuse >= 0))
    assert not placed[~sel].any()
    assert np.all((slot == -1) | ((slot >= 0) & (slot < c_ir)))
    assert np.all(disp.sum(axis=1) <= 1)
    want = np.zeros_like(disp)
    for g, s in zip(*np.nonzero(slot >= 0)):
        want[g, s, le[g, s], slot[g, s]] = True
    np.testing.assert_array_equal(disp, want)
    np.testing.assert_array_equal(np.asarray(ir.num_rectified), placed.sum(-1))
    np.testing.assert_array_equal(np.asarray(ir.overflow), (sel & ~placed).sum(-1))
    if ir_cap is None:
        np.testing.assert_array_equal(placed, sel)
    else:  # a token overflows only when its local expert's buffer is full
        for g, s in zip(*np.nonzero(sel & ~placed)):
            assert ((slot[g] >= 0) & (le[g] == le[g, s])).sum() == c_ir
    np.testing.assert_allclose(np.asarray(ir.lam), K - n_acc)
    np.testing.assert_allclose(np.asarray(ir.total),
                               (np.asarray(table.gate) * np.asarray(table.accepted)).sum(-1),
                               rtol=1e-6, atol=1e-7)
