"""An independent, token-by-token reference for the whole MoE block (rectify_moe/moe.py).

Written from docs/routing_contract.md and /work/shared/specs/design.md, not from moe.py:

* the device layout is re-derived here: device ``i`` of a (data, expert) mesh (row-major) holds batch
  rows ``[i*B/n, (i+1)*B/n)``; its routing groups are consecutive ``group_size`` tokens of its rows; its
  experts are ``[r*L, (r+1)*L)`` with ``r = i % n_exp`` and ``L = E / n_exp``;
* router logits and probabilities are float64; the routing tables come from the loop reference
  ``routing_reference.py`` (one call per device, exactly as the block routes each shard);
* the experts are applied ONE BY ONE per token and choice (no capacity buffers, no all-to-all), summed
  with the combine weights, then the IR blend ``y = (y_loc*p*lam + T*y) / max(T + lam*p, eps)`` is applied
  to placed tokens, with the local expert set of the device holding the token;
* the global metrics are recounted from the per-token tables.

`reference_loss_jax` re-evaluates the same per-token formulas with jax.numpy, with the routing decisions
(which experts, which choices were accepted, which tokens were rectified) frozen from the numpy tables
and the stop-gradients placed where the contract puts them, so that gradients can be compared too.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

import routing_reference as rr


# ------------------------------------------------------------------------------------------------
# Activations and one expert.
# ------------------------------------------------------------------------------------------------
def silu(v):
    return v / (1.0 + np.exp(-v))


def gelu_tanh(v):
    """jax.nn.gelu's default (approximate=True) formula."""
    return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))


def apply_expert(x_vec, params, e, activation):
    """Expert ``e`` on one token ``x_vec[D]`` in float64."""
    x_vec = np.asarray(x_vec, np.float64)
    up = x_vec @ np.asarray(params["w_up"][e], np.float64)
    if activation == "swiglu":
        gate = x_vec @ np.asarray(params["w_gate"][e], np.float64)
        hidden = silu(gate) * up
    elif activation == "gelu":
        hidden = gelu_tanh(up)
    else:
        raise ValueError(activation)
    return hidden @ np.asarray(params["w_down"][e], np.float64)


def softmax64(logits):
    logits = np.asarray(logits, np.float64)
    z = logits - logits.max(-1, keepdims=True)
    ez = np.exp(z)
    return ez / ez.sum(-1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# Layout.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Device:
    index: int          # row-major position in the (data, expert) mesh
    expert_rank: int    # r: position on the expert axis
    rows: tuple         # batch rows it holds
    first_expert: int   # r * L
    num_local: int      # L


def device_layout(batch, mesh_shape, num_experts):
    n_data, n_exp = mesh_shape
    n_dev = n_data * n_exp
    assert batch % n_dev == 0 and num_experts % n_exp == 0
    rows_per, L = batch // n_dev, num_experts // n_exp
    return [Device(i, i % n_exp, tuple(range(i * rows_per, (i + 1) * rows_per)), (i % n_exp) * L, L)
            for i in range(n_dev)]


def _capacity(cfg, train):
    cf = cfg.capacity_factor if (train or cfg.eval_capacity_factor is None) else cfg.eval_capacity_factor
    return rr.expert_capacity(cfg.group_size, cfg.num_experts, cfg.top_k, cf, cfg.min_capacity)


# ------------------------------------------------------------------------------------------------
# Routing of every device, flattened back to global [B, T, ...] per-token arrays.
# ------------------------------------------------------------------------------------------------
def route_all(x, token_mask, router_kernel, cfg, mesh_shape, train=True, min_gap=1e-6):
    """Routes each device's tokens with the loop reference; returns global per-token arrays.

    Also checks that no routing decision of the reference sits on a near-tie (probability gaps
    below ``min_gap``), where float32 (the block) and float64 (here) could legitimately disagree.
    """
    x = np.asarray(x, np.float64)
    B, T, D = x.shape
    E, S, k = cfg.num_experts, cfg.group_size, cfg.top_k
    K = k + int(cfg.fill_in)
    mask = np.ones((B, T), bool) if token_mask is None else np.asarray(token_mask, bool)
    C = _capacity(cfg, train)
    devices = device_layout(B, mesh_shape, E)
    out = dict(
        expert_index=np.zeros((B, T, K), np.int64), gate=np.zeros((B, T, K)),
        slot=-np.ones((B, T, K), np.int64), combine_weight=np.zeros((B, T, K)),
        probs=np.zeros((B, T, E)), logits=np.zeros((B, T, E)), device=np.zeros((B, T), np.int64),
        first_expert=np.zeros((B, T), np.int64), group=np.zeros((B, T), np.int64),
        ir_selected=np.zeros((B, T), bool), ir_placed=np.zeros((B, T), bool),
        ir_reused=np.zeros((B, T), bool), ir_expert=np.zeros((B, T), np.int64), ir_p=np.zeros((B, T)),
        ir_lam=np.zeros((B, T)), ir_total=np.zeros((B, T)), capacity=C, num_choices=K, mask=mask)
    groups_total = 0
    per_device = []
    for dev in devices:
        rows = list(dev.rows)
        n_tok = len(rows) * T
        assert n_tok % S == 0
        G = n_tok // S
        xg = x[rows].reshape(G, S, D)
        mg = mask[rows].reshape(G, S)
        logits = xg @ np.asarray(router_kernel, np.float64)
        probs = softmax64(logits)
        _check_no_near_ties(probs, K, dev, min_gap)
        table = rr.route_top_k(probs, top_k=k, capacity=C, priority=cfg.priority, fill_in=cfg.fill_in,
                               fill_in_priority=cfg.fill_in_priority, combine=cfg.combine,
                               straight_through=cfg.straight_through, token_mask=mg, eps=cfg.eps)
        ir = None
        if cfg.ir_mode is not None:
            ir_cap = rr.ir_capacity_from_factor(S, dev.num_local, cfg.ir_capacity_factor)
            ir = rr.intra_device_choice(probs, expert_index=table["expert_index"], gate=table["gate"],
                                        slot=table["slot"], token_mask=mg, top_k=k, num_choices=K,
                                        first_expert=dev.first_expert, num_local=dev.num_local,
                                        mode=cfg.ir_mode, ir_capacity=ir_cap, priority=cfg.priority)
            if dev.num_local > 1:
                loc = np.sort(probs[..., dev.first_expert:dev.first_expert + dev.num_local], -1)
                assert np.all(loc[..., -1] - loc[..., -2] > min_gap), "near-tie among local experts"
        per_device.append(dict(device=dev, table=table, ir=ir, probs=probs, logits=logits, mask=mg))

        def put(name, value):
            out[name][rows] = value.reshape((len(rows), T) + value.shape[2:])

        for name in ("expert_index", "gate", "slot", "combine_weight"):
            put(name, table[name])
        put("probs", probs)
        put("logits", logits)
        out["device"][rows] = dev.index
        out["first_expert"][rows] = dev.first_expert
        put("group", groups_total + np.arange(G)[:, None] * np.ones((1, S), np.int64))
        groups_total += G
        if ir is not None:
            put("ir_selected", ir["selected"])
            put("ir_placed", ir["placed"])
            put("ir_reused", ir["reuse_choice"] >= 0)
            put("ir_expert", dev.first_expert + ir["local_expert"])
            put("ir_p", ir["p"])
            put("ir_lam", ir["lam"])
            put("ir_total", ir["total"])
    out["num_groups"] = groups_total
    out["per_device"] = per_device
    out["metrics"] = _metrics(out, cfg)
    return out


def _check_no_near_ties(probs, K, dev, min_gap):
    srt = -np.sort(-probs, axis=-1)
    upto = min(K + 1, probs.shape[-1])
    gaps = srt[..., :upto - 1] - srt[..., 1:upto]
    if gaps.size and not np.all(gaps > min_gap):
        raise AssertionError(f"test data has a near-tie in the router probabilities on device {dev.index}; "
                             "pick another seed")


def _metrics(routes, cfg):
    """Global metrics recounted token by token from the per-token tables."""
    B, T, K = routes["slot"].shape
    E, k = cfg.num_experts, cfg.top_k
    mask = routes["mask"]
    tokens = dropped = unrouted = filled = fill_in = ir_rect = ir_over = ir_reused = 0
    demand = np.zeros(E)
    load = np.zeros(E)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                # padding: never dispatched; check the reference agrees.
                assert np.all(routes["slot"][b, t] < 0) and not routes["ir_placed"][b, t]
                continue
            tokens += 1
            n_acc = 0
            for j in range(K):
                e = routes["expert_index"][b, t, j]
                acc = routes["slot"][b, t, j] >= 0
                if j < k:
                    demand[e] += 1
                    dropped += int(not acc)
                if acc:
                    n_acc += 1
                    filled += 1
                    load[e] += 1
                    fill_in += int(j == k)
            unrouted += int(n_acc == 0)
            ir_rect += int(routes["ir_placed"][b, t])
            ir_over += int(routes["ir_selected"][b, t] and not routes["ir_placed"][b, t])
            ir_reused += int(routes["ir_reused"][b, t])
    slots = routes["num_groups"] * E * routes["capacity"]
    per_dev = routes["per_device"]
    aux = np.mean([rr.load_balance_loss(d["probs"], d["table"]["expert_index"][..., :k], d["mask"],
                                        all_k=cfg.load_balance_all_k) for d in per_dev])
    # The z-loss is the mean over ALL valid tokens of the mesh (not a mean of per-device means).
    valid = [float(np.sum(d["mask"])) for d in per_dev]
    z = sum(rr.router_z_loss(d["logits"], d["mask"]) * n for d, n in zip(per_dev, valid)) / max(sum(valid), 1.0)
    den = max(tokens, 1)
    return dict(tokens=float(tokens), drop_rate=dropped / max(k * tokens, 1), unrouted_rate=unrouted / den,
                padding_rate=1.0 - filled / slots, fill_in_rate=fill_in / slots, ir_rate=ir_rect / den,
                ir_overflow_rate=ir_over / den, ir_reuse_rate=ir_reused / den, expert_demand=demand,
                expert_load=load, aux_loss=aux, z_loss=z)


# ------------------------------------------------------------------------------------------------
# The forward pass, one token at a time.
# ------------------------------------------------------------------------------------------------
def moe_forward(x, token_mask, params, cfg, mesh_shape, train=True, routes=None):
    """float64 reference output ``y[B, T, D]`` of the block, and the routes (with ``metrics``)."""
    x = np.asarray(x, np.float64)
    B, T, D = x.shape
    if routes is None:
        routes = route_all(x, token_mask, params["router_kernel"], cfg, mesh_shape, train)
    K = routes["num_choices"]
    y = np.zeros((B, T, D))
    for b in range(B):
        for t in range(T):
            acc = np.zeros(D)
            for j in range(K):
                if routes["slot"][b, t, j] >= 0:
                    e = routes["expert_index"][b, t, j]
                    acc += routes["combine_weight"][b, t, j] * apply_expert(x[b, t], params, e, cfg.activation)
            if routes["ir_placed"][b, t]:
                y_loc = apply_expert(x[b, t], params, routes["ir_expert"][b, t], cfg.activation)
                p, lam, total = routes["ir_p"][b, t], routes["ir_lam"][b, t], routes["ir_total"][b, t]
                acc = (y_loc * p * lam + total * acc) / max(total + lam * p, cfg.eps)
            y[b, t] = acc
    return y, routes


# ------------------------------------------------------------------------------------------------
# The same formulas in jax.numpy, routing decisions frozen: for gradients.
# ------------------------------------------------------------------------------------------------
def frozen_routes(routes, cfg, max_devices=8, max_choices=3) -> dict[str, Any]:
    """The non-differentiable routing decisions as arrays (inputs of `reference_loss_jax`).

    Shapes do not depend on the mesh or the variant (devices padded to ``max_devices`` with zero weight,
    choices padded to ``max_choices`` as never-accepted), so one compiled reference serves them all.
    """
    B, T, K = routes["slot"].shape
    n_dev = len(routes["per_device"])
    assert n_dev <= max_devices and K <= max_choices
    pad = ((0, 0), (0, 0), (0, max_choices - K))
    valid = routes["mask"].reshape(-1).astype(np.float32)
    group_onehot = np.eye(routes["num_groups"], dtype=np.float32)[routes["group"].reshape(-1)]
    device_onehot = np.eye(max_devices, dtype=np.float32)[routes["device"].reshape(-1)]
    # Ranks counted in the load-balance loss: the first choice, or all top-k ranks.
    rank_weight = np.zeros(max_choices, np.float32)
    rank_weight[:cfg.top_k if cfg.load_balance_all_k else 1] = 1.0
    return dict(expert_index=np.pad(routes["expert_index"], pad).astype(np.int32),
                accepted=np.pad(routes["slot"] >= 0, pad), placed=routes["ir_placed"],
                ir_expert=routes["ir_expert"].astype(np.int32), lam=routes["ir_lam"].astype(np.float32),
                straight_through=np.float32(cfg.straight_through), rank_weight=rank_weight,
                group_onehot=group_onehot * valid[:, None], device_onehot=device_onehot * valid[:, None])


def reference_loss_jax(params, x, frozen, cot, *, activation, combine, eps, aux_weight, z_weight):
    """``sum(y * cot) + aux_weight * aux_loss + z_weight * z_loss`` with per-token jnp math.

    Stop-gradients as in the contract: normalized combine divides by sg(sum of accepted gates);
    straight-through uses g - sg(g) + 1; the IR blend uses lam, T = sg(sum of accepted gates) and a
    detached denominator, so the router gradient of IR flows only through p in the numerator.
    Tokens that are not rectified (all of them without IR) keep the combine output.
    """
    import jax
    import jax.numpy as jnp
    sg = jax.lax.stop_gradient
    E = params["router_kernel"].shape[-1]
    B, T, D = x.shape
    N = B * T
    xf = x.reshape(N, D).astype(jnp.float32)
    logits = xf @ params["router_kernel"].astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    e_idx = frozen["expert_index"].reshape(N, -1)
    accepted = frozen["accepted"].reshape(N, -1)
    gate = jnp.take_along_axis(probs, e_idx, axis=-1)

    def experts(xs, idx):  # xs [N, D], idx [N, ...] -> [N, ..., D], one expert per (token, choice)
        xx = jnp.broadcast_to(xs.reshape((N,) + (1,) * (idx.ndim - 1) + (D,)), idx.shape + (D,))
        up = jnp.einsum("n...d,n...df->n...f", xx, params["w_up"][idx])
        if activation == "swiglu":
            h = jax.nn.silu(jnp.einsum("n...d,n...df->n...f", xx, params["w_gate"][idx])) * up
        else:
            h = jax.nn.gelu(up)
        return jnp.einsum("n...f,n...fd->n...d", h, params["w_down"][idx])

    acc_gate = gate * accepted
    if combine == "normalized":
        cw = acc_gate / sg(jnp.maximum(jnp.sum(acc_gate, -1, keepdims=True), eps))
    else:
        cw = acc_gate
    cw = jnp.where(frozen["straight_through"] > 0, accepted * (gate - sg(gate) + 1.0), cw)
    y = jnp.sum(cw[..., None] * experts(xf, e_idx), axis=1)
    # Intra-device rectification of the placed tokens.
    loc = frozen["ir_expert"].reshape(N)
    p = jnp.take_along_axis(probs, loc[:, None], axis=-1)[:, 0]
    lam = frozen["lam"].reshape(N)
    total = sg(jnp.sum(acc_gate, -1))
    blended = (experts(xf, loc) * (p * lam)[:, None] + total[:, None] * y) / sg(
        jnp.maximum(total + lam * p, eps))[:, None]
    y = jnp.where(frozen["placed"].reshape(N)[:, None], blended, y).reshape(B, T, D)

    # Load-balance loss: per group, E * sum_e f_e P_e over valid tokens; mean over all groups.
    gone = frozen["group_onehot"]  # [N, G], zero rows for padding
    n_g = jnp.maximum(gone.sum(0), 1.0)
    counted = jnp.einsum("nke,k->ne", jax.nn.one_hot(e_idx, E, dtype=jnp.float32), frozen["rank_weight"])
    f = (gone.T @ counted) / n_g[:, None]
    P = (gone.T @ probs) / n_g[:, None]
    aux = jnp.mean(E * jnp.sum(f * P, -1))
    # z-loss: mean of logsumexp^2 over all valid tokens of the mesh.
    lse2 = jax.nn.logsumexp(logits, axis=-1) ** 2
    valid = frozen["device_onehot"].sum(1)  # [N], 0 for padding
    z = jnp.sum(valid * lse2) / jnp.maximum(jnp.sum(valid), 1.0)
    return jnp.sum(y * cot) + aux_weight * aux + z_weight * z, y
