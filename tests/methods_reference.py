"""Independent numpy references for tests/test_methods.py (StableMoE, Gating Dropout, hash layers).

Written from /work/shared/specs/other_methods.md (sections A, B, D.1), not from the code under test:
everything here is float64 numpy with explicit loops over tokens, devices and groups.

Device layout of the sharded block (re-derived here): the batch axis is split over the row-major
(data, expert) mesh, so device ``i`` holds batch rows ``[i*B/n, (i+1)*B/n)``; its routing groups are
consecutive ``group_size`` tokens of its rows (flattened row-major); it holds the global experts
``[r*L, (r+1)*L)`` with ``r = i % n_exp`` (its index on the expert axis) and ``L = E / n_exp``.
"""
from __future__ import annotations

import math
import re

import numpy as np


# ------------------------------------------------------------------------------------------------
# Elementwise helpers and one expert.
# ------------------------------------------------------------------------------------------------
def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-np.asarray(v, np.float64)))


def softmax(v):
    v = np.asarray(v, np.float64)
    z = np.exp(v - v.max())
    return z / z.sum()


def log_softmax(v):
    v = np.asarray(v, np.float64)
    m = v.max()
    return v - (m + math.log(np.exp(v - m).sum()))


def expert(x_vec, weights, e):
    """SwiGLU expert ``e`` on one token: (silu(x Wg) * (x Wu)) Wd, float64."""
    x_vec = np.asarray(x_vec, np.float64)
    gate = x_vec @ np.asarray(weights["w_gate"][e], np.float64)
    up = x_vec @ np.asarray(weights["w_up"][e], np.float64)
    hidden = gate / (1.0 + np.exp(-gate)) * up
    return hidden @ np.asarray(weights["w_down"][e], np.float64)


def device_slices(batch, mesh_shape, num_experts):
    """[(rows slice, first global expert, L)] for every device of a (data, expert) mesh."""
    n_data, n_exp = mesh_shape
    n_dev = n_data * n_exp
    rows, num_local = batch // n_dev, num_experts // n_exp
    return [(slice(i * rows, (i + 1) * rows), (i % n_exp) * num_local, num_local) for i in range(n_dev)]


# ------------------------------------------------------------------------------------------------
# StableMoE losses (spec A.3 items 4-5), token loops.
# ------------------------------------------------------------------------------------------------
def _balance_setup(scores, assignment, mask, counts, tokens):
    """float64 scores, the valid token indices, |A_i| and n_bar (defaults: this batch's valid tokens)."""
    scores = np.asarray(scores, np.float64)
    n, num_experts = scores.shape
    valid = [t for t in range(n) if mask[t]]
    if counts is None:
        counts = [sum(1 for t in valid if assignment[t] == i) for i in range(num_experts)]
    if tokens is None:
        tokens = len(valid)
    return scores, valid, counts, tokens / num_experts


def stablemoe_balance_loss(scores, assignment, mask, counts=None, tokens=None):
    """L_bal = sum_i (|A_i| - n_bar)/n_bar * sum_{t in A_i} sigmoid(s_{t,i}), without alpha.

    scores [N, E], assignment [N], mask [N] (False = padding: not in any A_i). |A_i| and the token total
    default to this batch's valid tokens; pass the whole routed batch's values for one shard's part.
    """
    scores, valid, counts, n_bar = _balance_setup(scores, assignment, mask, counts, tokens)
    total = 0.0
    for i in range(scores.shape[1]):
        members = [t for t in valid if assignment[t] == i]
        coef = (counts[i] - n_bar) / n_bar
        total += coef * sum(float(sigmoid(scores[t, i])) for t in members)
    return total


def stablemoe_balance_grad(scores, assignment, mask, counts=None, tokens=None):
    """dL_bal/ds [N, E]: only at (t, a_t) of valid tokens, coef(a_t) * sigma'(s_{t,a_t})."""
    scores, valid, counts, n_bar = _balance_setup(scores, assignment, mask, counts, tokens)
    grad = np.zeros_like(scores)
    for t in valid:
        i = assignment[t]
        sig = float(sigmoid(scores[t, i]))
        grad[t, i] = (counts[i] - n_bar) / n_bar * sig * (1.0 - sig)
    return grad


def stablemoe_distill_loss(distill_scores, teacher, mask):
    """L_dis = -sum_t log softmax(s_hat_t)[teacher_t] over valid tokens."""
    total = 0.0
    for t in range(len(teacher)):
        if mask[t]:
            total -= float(log_softmax(distill_scores[t])[teacher[t]])
    return total


def stablemoe_distill_grads(embed, centroids, ids, teacher, mask, scale):
    """Gradients of scale * L_dis w.r.t. D [V, r] and E_hat [E, r], token by token."""
    embed = np.asarray(embed, np.float64)
    centroids = np.asarray(centroids, np.float64)
    g_embed, g_cent = np.zeros_like(embed), np.zeros_like(centroids)
    for t in range(len(ids)):
        if not mask[t]:
            continue
        h = embed[ids[t]]
        p = softmax(centroids @ h)
        p[teacher[t]] -= 1.0          # d(-log softmax[teacher]) / d s_hat
        g = scale * p
        g_cent += np.outer(g, h)
        g_embed[ids[t]] += g @ centroids
    return g_embed, g_cent


# ------------------------------------------------------------------------------------------------
# Block-level references (ample capacity for StableMoE and hash; capacity-limited local step).
# ------------------------------------------------------------------------------------------------
def stablemoe_block(x, mask, ids, kernel, embed, centroids, weights, use_distilled):
    """y_t = sigmoid(s_{t,a_t}) * FFN_{a_t}(x_t); a_t = argmax s_t (stage 1) or argmax D[id] E_hat^T.

    Assumes no token overflows its expert (the caller uses capacity >= group size). Returns (y, a).
    """
    batch, seq, width = x.shape
    y = np.zeros((batch, seq, width))
    assign = np.zeros((batch, seq), np.int64)
    for b in range(batch):
        for t in range(seq):
            s = np.asarray(x[b, t], np.float64) @ np.asarray(kernel, np.float64)
            if use_distilled:
                a = int(np.argmax(np.asarray(embed[ids[b, t]], np.float64) @ np.asarray(centroids, np.float64).T))
            else:
                a = int(np.argmax(s))
            assign[b, t] = a
            if mask[b, t]:
                y[b, t] = sigmoid(s[a]) * expert(x[b, t], weights, a)
    return y, assign


def hash_block(x, mask, ids, table, weights):
    """y_t = FFN_{table[id_t]}(x_t) (weight 1, no gate); ample capacity assumed."""
    batch, seq, width = x.shape
    y = np.zeros((batch, seq, width))
    for b in range(batch):
        for t in range(seq):
            if mask[b, t]:
                y[b, t] = expert(x[b, t], weights, int(table[ids[b, t]]))
    return y


def local_only_block(x, mask, kernel, weights, *, mesh_shape, num_experts, group_size, capacity_factor,
                     priority, weight_mode):
    """Gating Dropout's dropped step (spec B.3/B.4, option (a)): no token leaves its device.

    Every valid token goes to the device-local expert with the highest GLOBAL softmax probability; each
    local expert takes at most C = min(S, max(1, ceil(cf * S / L))) tokens per group, visiting tokens in
    sequence order ("position") or by global top-1 probability descending, ties by position ("bpr");
    overflow tokens get 0. Weight 1 ("one") or that global probability ("prob").

    Returns (y [B, T, D], stats dict: placed, overflow, off_global (tokens whose local expert is not their
    global argmax)).
    """
    batch, seq, width = x.shape
    y = np.zeros((batch, seq, width))
    stats = dict(placed=0, overflow=0, off_global=0)
    for rows, first, num_local in device_slices(batch, mesh_shape, num_experts):
        cap = int(min(group_size, max(1, math.ceil(capacity_factor * group_size / num_local))))
        xs = x[rows].reshape(-1, width)
        ms = mask[rows].reshape(-1)
        out = np.zeros_like(xs, dtype=np.float64)
        for g0 in range(0, xs.shape[0], group_size):
            members = list(range(g0, g0 + group_size))
            probs = {t: softmax(np.asarray(xs[t], np.float64) @ np.asarray(kernel, np.float64)) for t in members}
            if priority == "bpr":
                members.sort(key=lambda t: (-probs[t].max(), t))
            used = [0] * num_local
            for t in members:
                if not ms[t]:
                    continue
                local = int(np.argmax(probs[t][first:first + num_local]))
                e = first + local
                stats["off_global"] += int(e != int(np.argmax(probs[t])))
                if used[local] >= cap:
                    stats["overflow"] += 1
                    continue
                used[local] += 1
                stats["placed"] += 1
                w = 1.0 if weight_mode == "one" else float(probs[t][e])
                out[t] = w * expert(xs[t], weights, e)
        y[rows] = out.reshape(-1, seq, width)
    return y, stats


# ------------------------------------------------------------------------------------------------
# Hash tables.
# ------------------------------------------------------------------------------------------------
def greedy_balanced_table(counts, num_experts):
    """Frequency-balanced hash (spec D.1): ids by count descending (ties: lower id first), each to the
    expert with the least count mass so far (ties: fewer ids owned, then lower expert index); zero-count ids are dealt
    evenly: to the expert with the fewest zero-count ids (ties: lower load, then lower index)."""
    counts = [int(c) for c in counts]
    ids = sorted(range(len(counts)), key=lambda v: (-counts[v], v))
    loads, owned, unseen = [0] * num_experts, [0] * num_experts, [0] * num_experts
    table = [0] * len(counts)
    for v in ids:
        if counts[v] > 0:
            e = min(range(num_experts), key=lambda i: (loads[i], owned[i], i))
        else:  # ids never seen carry no load: deal them evenly (fewest such ids, then lower load, index)
            e = min(range(num_experts), key=lambda i: (unseen[i], loads[i], i))
            unseen[e] += 1
        table[v] = e
        loads[e] += counts[v]
        owned[e] += 1
    return np.asarray(table)


# ------------------------------------------------------------------------------------------------
# Compiled-HLO text parsing.
# ------------------------------------------------------------------------------------------------
# A computation starts with an unindented header "[ENTRY ]%name (params...) -> type {" and ends with an
# unindented "}"; its instructions are the indented lines in between.
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[A-Za-z0-9_.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
# Attributes through which an instruction calls other computations.
_CALL_ATTR = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation|"
                        r"branch_computations|comparator|select|scatter)=(\{[^}]*\}|%?[A-Za-z0-9_.\-]+)")
_NAME = re.compile(r"%?([A-Za-z0-9_.\-]+)")
# An opcode follows the result type and a space: " all-to-all(" / " all-to-all-start(". Instruction
# NAMES such as "%all-to-all.1" are preceded by "%", so they do not match.
_ALL_TO_ALL = re.compile(r"\sall-to-all(?:-start)?\(")
_CONDITIONAL = re.compile(r"\sconditional\(")


def hlo_computations(text):
    """{computation name: [instruction lines]} of an HLO module's text."""
    comps, current = {}, None
    for line in text.splitlines():
        if current is None:
            match = _HEADER.match(line) if line and not line[0].isspace() else None
            if match:
                current = match.group("name")
                comps[current] = []
        elif line.strip() == "}" and not line[0].isspace():
            current = None
        else:
            comps[current].append(line.strip())
    return comps


def called_computations(line, names):
    """Computations called by one instruction line (through the call attributes above)."""
    found = []
    for match in _CALL_ATTR.finditer(line):
        found += [n for n in _NAME.findall(match.group(1)) if n in names]
    return found


def closure(comps, root):
    """root and every computation it calls, transitively."""
    seen, stack = set(), [root]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in comps[name]:
            stack += called_computations(line, comps)
    return seen


def count_all_to_all(comps, names):
    return sum(1 for n in names for line in comps[n] if _ALL_TO_ALL.search(line))


def conditional_branches(line, names):
    """Branch computations of a `conditional` instruction, in branch-index order.

    `branch_computations={%b0, %b1}` (integer index: branch i runs for index i) or
    `true_computation=%t, false_computation=%f` (pred), returned as [false, true] so that index 1 is
    the taken-when-true branch either way.
    """
    match = re.search(r"branch_computations=\{([^}]*)\}", line)
    if match:
        return [n for n in _NAME.findall(match.group(1)) if n in names]
    t = re.search(r"true_computation=%?([A-Za-z0-9_.\-]+)", line)
    f = re.search(r"false_computation=%?([A-Za-z0-9_.\-]+)", line)
    return [f.group(1), t.group(1)] if t and f else []


def conditionals(comps):
    return [line for lines in comps.values() for line in lines if _CONDITIONAL.search(line)]
