"""A slow, loop-based numpy reference for the routing tables (docs/routing_contract.md).

Independent of ``rectify_moe/routing.py`` on purpose: it is written from the contract alone and
walks every token, rank and slot one at a time (no cumsum tricks), so that it is easy to check by eye.
Everything returns plain numpy arrays (float64 for real values) in dicts keyed like the contract's fields.
"""
from __future__ import annotations

import math

import numpy as np

PRIORITIES = ("position", "bpr", "token_major")
FILL_IN_PRIORITIES = ("same", "score")
COMBINES = ("normalized", "probs")
IR_MODES = ("all", "any", "ignore_kth")


# ------------------------------------------------------------------------------------------------
# Capacity
# ------------------------------------------------------------------------------------------------
def expert_capacity(tokens_per_group, num_experts, top_k, capacity_factor, min_capacity=0):
    """``max(ceil(S / E * cf * k), min_capacity)``; raises if that is < 1."""
    c = max(math.ceil(tokens_per_group / num_experts * capacity_factor * top_k), min_capacity)
    if c < 1:
        raise ValueError("capacity < 1: raise capacity_factor or min_capacity")
    return int(c)


def ir_capacity_from_factor(tokens_per_group, num_local, factor):
    if factor is None:
        return None
    return int(min(tokens_per_group, max(1, math.ceil(factor * tokens_per_group / num_local))))


# ------------------------------------------------------------------------------------------------
# Ranked choices and priority orders
# ------------------------------------------------------------------------------------------------
def ranked_choices(row, K):
    """The K experts of largest probability, decreasing; ties -> the lower expert index.

    Selection by repeated scans: at each rank take the first (lowest-index) maximum among the
    experts not chosen yet. Only strict ``>`` replaces the current best, so ties keep the lower index.
    """
    row = [float(v) for v in row]
    chosen = []
    for _ in range(K):
        best = None
        for e, v in enumerate(row):
            if e in chosen:
                continue
            if best is None or v > row[best]:
                best = e
        chosen.append(best)
    return chosen


def token_order(gate_top1, priority):
    """The token order of a priority: sequence order, or top-1 probability descending (stable)."""
    S = len(gate_top1)
    if priority in ("position", "token_major"):
        return list(range(S))
    if priority == "bpr":
        return sorted(range(S), key=lambda s: (-float(gate_top1[s]), s))
    raise ValueError(priority)


def candidate_order(gate, top_k, priority, fill_in, fill_in_priority):
    """The list of (token, rank) candidates in the order they claim slots."""
    S = gate.shape[0]
    order = token_order(gate[:, 0], priority)
    cands = []
    if priority == "token_major":
        for s in order:
            for j in range(top_k):
                cands.append((s, j))
    else:  # k-major
        for j in range(top_k):
            for s in order:
                cands.append((s, j))
    if fill_in:
        if fill_in_priority == "same":
            fill_order = list(order)
        elif fill_in_priority == "score":
            where = {s: i for i, s in enumerate(order)}
            fill_order = sorted(range(S), key=lambda s: (-float(gate[s, top_k]), where[s]))
        else:
            raise ValueError(fill_in_priority)
        for s in fill_order:
            cands.append((s, top_k))
    return cands


# ------------------------------------------------------------------------------------------------
# route_top_k
# ------------------------------------------------------------------------------------------------
def route_top_k(router_probs, *, top_k, capacity, priority="position", fill_in=False,
                fill_in_priority="same", combine="normalized", straight_through=False,
                token_mask=None, eps=1e-9, fill_in_disabled=False, selection_bias=None):
    """Reference route_top_k.

    ``selection_bias`` [E] is added to the probabilities only to rank the experts; gates are the probabilities.

    ``fill_in_disabled`` is test-only (not in the public API): with ``fill_in=True`` it drops every
    rank-k (fill-in) candidate before it can take a slot. This is the official repo's check
    (gpt-moe ``test_routing.py``: top-(k+1) with the extra choice disabled == top-k).
    """
    probs = np.asarray(router_probs)
    G, S, E = probs.shape
    k = top_k
    K = k + 1 if fill_in else k
    C = capacity
    if token_mask is None:
        token_mask = np.ones((G, S), bool)
    token_mask = np.asarray(token_mask, bool)

    expert_index = np.zeros((G, S, K), np.int64)
    gate = np.zeros((G, S, K), np.float64)
    slot = -np.ones((G, S, K), np.int64)
    combine_weight = np.zeros((G, S, K), np.float64)
    dispatch = np.zeros((G, S, E, C), bool)
    combine_arr = np.zeros((G, S, E, C), np.float64)
    stats = {name: np.zeros((G,), np.float64) for name in
             ("drop_rate", "unrouted_rate", "padding_rate", "fill_in_slots", "num_tokens")}
    stats["expert_demand"] = np.zeros((G, E), np.float64)
    stats["expert_load"] = np.zeros((G, E), np.float64)

    for g in range(G):
        for s in range(S):
            scores = probs[g, s] if selection_bias is None else probs[g, s] + np.asarray(selection_bias)
            expert_index[g, s] = ranked_choices(scores, K)
            for j in range(K):
                gate[g, s, j] = probs[g, s, expert_index[g, s, j]]

        # Slot assignment: walk the candidates; every valid candidate advances its expert's counter.
        counter = [0] * E
        for s, j in candidate_order(gate[g], k, priority, fill_in, fill_in_priority):
            if not token_mask[g, s]:
                continue  # padding: never a candidate, never demand
            if fill_in_disabled and j == k:
                continue
            e = expert_index[g, s, j]
            pos = counter[e]
            counter[e] += 1
            if pos < C:
                slot[g, s, j] = pos

        # Combine weights, token by token.
        for s in range(S):
            acc = [j for j in range(K) if slot[g, s, j] >= 0]
            total = 0.0
            for j in acc:
                total += gate[g, s, j]
            for j in acc:
                if straight_through:
                    w = 1.0
                elif combine == "normalized":
                    w = gate[g, s, j] / max(total, eps)
                elif combine == "probs":
                    w = gate[g, s, j]
                else:
                    raise ValueError(combine)
                combine_weight[g, s, j] = w
                e, c = expert_index[g, s, j], slot[g, s, j]
                assert not dispatch[g, s, e, c]
                dispatch[g, s, e, c] = True
                combine_arr[g, s, e, c] = w

        # Statistics.
        n_valid = 0
        dropped_topk = 0
        unrouted = 0
        filled = 0
        fill_in_slots = 0
        for s in range(S):
            if not token_mask[g, s]:
                continue
            n_valid += 1
            n_acc = 0
            for j in range(K):
                e = expert_index[g, s, j]
                accepted = slot[g, s, j] >= 0
                if j < k:
                    stats["expert_demand"][g, e] += 1
                    if not accepted:
                        dropped_topk += 1
                if accepted:
                    n_acc += 1
                    filled += 1
                    stats["expert_load"][g, e] += 1
                    if j == k:
                        fill_in_slots += 1
            if n_acc == 0:
                unrouted += 1
        stats["num_tokens"][g] = n_valid
        stats["fill_in_slots"][g] = fill_in_slots
        stats["padding_rate"][g] = 1.0 - filled / (E * C)
        if n_valid > 0:
            stats["drop_rate"][g] = dropped_topk / (n_valid * k)
            stats["unrouted_rate"][g] = unrouted / n_valid

    return dict(expert_index=expert_index, gate=gate, slot=slot, combine_weight=combine_weight,
                dispatch=dispatch, combine=combine_arr, token_mask=token_mask, num_experts=E,
                capacity=C, top_k=k, num_choices=K, stats=stats,
                accepted=slot >= 0, num_accepted=(slot >= 0).sum(-1))


# ------------------------------------------------------------------------------------------------
# Intra-device rectification
# ------------------------------------------------------------------------------------------------
def intra_device_choice(router_probs, *, expert_index, gate, slot, token_mask, top_k, num_choices,
                        first_expert, num_local, mode, ir_capacity=None, priority="position"):
    """Reference IR choice; takes the table's arrays.

    A selected token whose local expert already accepted one of its choices reuses that choice (reuse_choice
    = its index; no IR slot); the others take IR slots in token order.
    """
    probs = np.asarray(router_probs)
    G, S, E = probs.shape
    k, K, L = top_k, num_choices, num_local
    c_ir = S if ir_capacity is None else ir_capacity
    slot = np.asarray(slot)
    expert_index = np.asarray(expert_index)
    gate = np.asarray(gate, np.float64)
    token_mask = np.ones((G, S), bool) if token_mask is None else np.asarray(token_mask, bool)

    out = dict(
        selected=np.zeros((G, S), bool), local_expert=np.zeros((G, S), np.int64),
        slot=-np.ones((G, S), np.int64), reuse_choice=-np.ones((G, S), np.int64),
        dispatch=np.zeros((G, S, L, c_ir), bool),
        p=np.zeros((G, S), np.float64), lam=np.zeros((G, S), np.float64),
        total=np.zeros((G, S), np.float64), overflow=np.zeros((G,), np.int64),
        num_rectified=np.zeros((G,), np.int64))

    for g in range(G):
        for s in range(S):
            n_acc = 0
            total = 0.0
            for j in range(K):
                if slot[g, s, j] >= 0:
                    n_acc += 1
                    total += gate[g, s, j]
            out["lam"][g, s] = K - n_acc
            out["total"][g, s] = total
            if mode == "all":
                sel = n_acc == 0
            elif mode == "any":
                sel = n_acc < K  # official code: the gate's k, i.e. K under fill-in
            elif mode == "ignore_kth":
                sel = n_acc < K - 1
            else:
                raise ValueError(mode)
            out["selected"][g, s] = bool(sel and token_mask[g, s])
            best = 0
            for i in range(1, L):
                if probs[g, s, first_expert + i] > probs[g, s, first_expert + best]:
                    best = i
            out["local_expert"][g, s] = best
            out["p"][g, s] = probs[g, s, first_expert + best]
            if out["selected"][g, s]:
                for j in range(K):
                    if slot[g, s, j] >= 0 and expert_index[g, s, j] == first_expert + best:
                        out["reuse_choice"][g, s] = j
                        break

        counter = [0] * L
        for s in token_order(gate[g, :, 0], priority):
            if not out["selected"][g, s]:
                continue
            if out["reuse_choice"][g, s] >= 0:
                out["num_rectified"][g] += 1
                continue
            i = out["local_expert"][g, s]
            pos = counter[i]
            counter[i] += 1
            if pos < c_ir:
                out["slot"][g, s] = pos
                out["dispatch"][g, s, i, pos] = True
                out["num_rectified"][g] += 1
            else:
                out["overflow"][g] += 1
    out["placed"] = (out["slot"] >= 0) | (out["reuse_choice"] >= 0)
    return out


def ir_blend(y, y_local, p, lam, total, placed, eps=1e-9):
    y = np.asarray(y, np.float64)
    y_local = np.asarray(y_local, np.float64)
    p, lam, total = (np.asarray(a, np.float64) for a in (p, lam, total))
    placed = np.asarray(placed, bool)
    out = y.copy()
    for idx in np.ndindex(placed.shape):
        if placed[idx]:
            den = max(total[idx] + lam[idx] * p[idx], eps)
            out[idx] = (y_local[idx] * p[idx] * lam[idx] + total[idx] * y[idx]) / den
    return out


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------
def load_balance_loss(router_probs, expert_index, token_mask=None, all_k=False):
    probs = np.asarray(router_probs, np.float64)
    expert_index = np.asarray(expert_index)
    G, S, E = probs.shape
    K = expert_index.shape[-1]
    if token_mask is None:
        token_mask = np.ones((G, S), bool)
    per_group = []
    for g in range(G):
        f = np.zeros(E)
        P = np.zeros(E)
        n = 0
        for s in range(S):
            if not token_mask[g, s]:
                continue
            n += 1
            ranks = range(K) if all_k else range(1)
            for j in ranks:
                f[expert_index[g, s, j]] += 1
            for e in range(E):
                P[e] += probs[g, s, e]
        if n > 0:
            f /= n
            P /= n
        per_group.append(E * sum(f[e] * P[e] for e in range(E)))
    return float(np.mean(per_group))


def router_z_loss(router_logits, token_mask=None):
    logits = np.asarray(router_logits, np.float64)
    G, S, E = logits.shape
    if token_mask is None:
        token_mask = np.ones((G, S), bool)
    acc, n = 0.0, 0
    for g in range(G):
        for s in range(S):
            if token_mask[g, s]:
                m = max(logits[g, s])
                lse = m + math.log(sum(math.exp(v - m) for v in logits[g, s]))
                acc += lse * lse
                n += 1
    return acc / max(n, 1)
