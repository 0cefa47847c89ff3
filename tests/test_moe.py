"""The sharded MoE block (rectify_moe/moe.py) against an independent token-by-token reference.

* ``moe_reference.py`` re-derives the device layout, routes every device's tokens with the loop
  reference ``routing_reference.py`` (float64), applies the experts one by one per token and the IR
  blend, and recounts the metrics. Its jax.numpy twin (routing frozen) gives reference gradients.
* Data are chosen so that every variant really drops tokens (and IR rectifies / FR fills slots):
  the tests assert it, otherwise they would prove nothing.
* Runtime: per (mesh, dispatch) ONE jitted program computes value and gradient of all eight variants
  (XLA compiles that ~3x faster than eight programs), compiled at LLVM -O0 (FAST_COMPILE: same XLA
  program, about half the compile time); results are cached and shared between tests. The communication
  test compiles with default options.
"""
from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import moe_reference as mref
from rectify_moe import metrics as metrics_lib
from rectify_moe import moe, routing, sharding, variants
from rectify_moe.config.schema import MoEConfig

D, F, B, T, S = 12, 32, 8, 16, 8     # width, expert width, batch, seq, group size
E = 8
AUX_W, Z_W = 0.1, 0.01               # loss = sum(y * cot) + AUX_W * aux + Z_W * z
MESHES = ((1, 1), (1, 8), (2, 4), (4, 2), (8, 1))
REF_TOL = dict(rtol=2e-5, atol=2e-5)  # float32 block vs float64 reference
EXACT_TOL = dict(rtol=1e-5, atol=1e-5)  # float32 vs float32 (different meshes / dispatch)

# The paper's eight variants (rectify_moe/variants.py); capacity factor 0.5: C = 1 slot per expert per group of 8.
VARIANTS = variants.PAPER_VARIANTS
NO_IR = tuple(n for n, v in VARIANTS.items() if v["ir_mode"] is None)
WITH_IR = tuple(n for n, v in VARIANTS.items() if v["ir_mode"] is not None)
BASE = dict(num_experts=E, expert_dim=F, group_size=S, capacity_factor=0.5)


def to_block_params(params):
    """The block's pure dict (router parameters under "router") from flat reference parameters."""
    return {("router" if k == "router_kernel" else k): ({"kernel": v} if k == "router_kernel" else v)
            for k, v in params.items()}


def from_block_params(pure):
    """Flat reference names ("router_kernel", "w_up", ...) from the block's pure dict."""
    return {("router_kernel" if k == "router" else k): (v["kernel"] if k == "router" else v) for k, v in pure.items()}


def make_cfg(name, **overrides):
    return MoEConfig(**{**BASE, **VARIANTS[name], **overrides})


def make_params(cfg, d_model=D, seed=0):
    """float32 numpy weights; a decisive router (logit std ~1.7) so routing has no near-ties."""
    rng = np.random.RandomState(seed)
    e, f = cfg.num_experts, cfg.expert_dim
    params = {
        "router_kernel": rng.randn(d_model, e) * 0.5,
        "w_up": rng.randn(e, d_model, f) / np.sqrt(d_model),
        "w_down": rng.randn(e, f, d_model) / np.sqrt(f),
    }
    if cfg.activation == "swiglu":
        params["w_gate"] = rng.randn(e, d_model, f) / np.sqrt(d_model)
    return {k: v.astype(np.float32) for k, v in params.items()}


def make_inputs(seed=1, d_model=D):
    rng = np.random.RandomState(seed)
    x = rng.randn(B, T, d_model).astype(np.float32)
    cot = rng.randn(B, T, d_model).astype(np.float32)
    mask = rng.rand(B, T) > 0.3
    mask[0, :S] = False   # one whole group of padding
    mask[3, :] = True     # and one device row without padding
    return x, cot, mask


X, COT, MASK = make_inputs()
FULL_MASK = np.ones((B, T), bool)


# ------------------------------------------------------------------------------------------------
# Compiled block functions and cached results.
# ------------------------------------------------------------------------------------------------
_MESHES = {}
_FNS = {}
FAST_COMPILE = {"xla_backend_optimization_level": 0}
_RESULTS = {}


def get_mesh(mesh_shape):
    if mesh_shape not in _MESHES:
        _MESHES[mesh_shape] = sharding.make_mesh(*mesh_shape)
    return _MESHES[mesh_shape]


def _block_fn(cfgs, mesh_shape, d_model=D):
    """(mesh, templates, jitted fn) computing value and gradient of several configs in ONE program.

    XLA compiles one program with eight variants ~3x faster than eight programs, which keeps this file
    fast; the variants do not interact (each has its own parameters and outputs).
    """
    cfgs = tuple(cfgs)
    key = (cfgs, mesh_shape, d_model)
    if key not in _FNS:
        mesh = get_mesh(mesh_shape)
        graphdefs, templates = [], []
        with jax.set_mesh(mesh):
            for cfg in cfgs:
                graphdef, state = nnx.split(moe.MoEBlock(cfg, d_model=d_model, rngs=nnx.Rngs(0)))
                graphdefs.append(graphdef)
                templates.append(state)

        def loss_fn(state, x, mask, cot, graphdef):
            y, metrics = nnx.merge(graphdef, state)(x, mask)
            loss = jnp.sum(y * cot) + AUX_W * metrics["losses"]["aux_loss"] + Z_W * metrics["losses"]["z_loss"]
            return loss, (y, metrics)

        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

        def all_variants(states, x, mask, cot):
            return [grad_fn(st, x, mask, cot, gd) for st, gd in zip(states, graphdefs)]

        # LLVM optimisation level 0 halves compile time on CPU; the XLA program (and its numerics) is the same.
        _FNS[key] = (mesh, templates, jax.jit(all_variants, compiler_options=FAST_COMPILE))
    return _FNS[key]


def _state(template, params):
    state = jax.tree.map(lambda a: a, template)
    nnx.replace_by_pure_dict(state, to_block_params({k: np.asarray(v) for k, v in params.items()}))
    return state


def run_blocks(cfgs, mesh_shape, params, x=X, mask=FULL_MASK, cot=COT):
    """Value and gradient of each config (all with the same params); numpy results, one per config."""
    mesh, templates, fn = _block_fn(cfgs, mesh_shape, x.shape[-1])
    states = [_state(t, params) for t in templates]
    with jax.set_mesh(mesh):
        outs = jax.device_get(fn(states, x, mask, cot))
    return [dict(loss=float(loss), y=np.asarray(y),
                 metrics={k: np.asarray(v) for k, v in metrics_lib.block_summary(metrics).items()},
                 grads={k: np.asarray(v) for k, v in from_block_params(nnx.to_pure_dict(g_state)).items()},
                 gx=np.asarray(g_x))
            for (loss, (y, metrics)), (g_state, g_x) in outs]


def run_block(cfg, mesh_shape, params, **kw):
    return run_blocks([cfg], mesh_shape, params, **kw)[0]


def variant_cfgs(dispatch="einsum"):
    return [make_cfg(name, dispatch=dispatch) for name in VARIANTS]


PARAMS = make_params(make_cfg("top1"))  # the same weights for every variant (same shapes)


def cached_run(name, mesh_shape, dispatch="einsum", masked=False):
    key = (mesh_shape, dispatch, masked)
    if key not in _RESULTS:
        outs = run_blocks(variant_cfgs(dispatch), mesh_shape, PARAMS, mask=MASK if masked else FULL_MASK)
        _RESULTS[key] = dict(zip(VARIANTS, outs))
    return _RESULTS[key][name]


_REF_GRAD_FNS = {}
_REFS = {}


def reference(name, mesh_shape, masked=False, cfg=None, params=None, x=X, cot=COT):
    """Numpy forward, routes/metrics and jnp reference gradients for one variant and mesh layout."""
    cache = cfg is None
    key = (name, mesh_shape, masked)
    if cache and key in _REFS:
        return _REFS[key]
    cfg = make_cfg(name) if cfg is None else cfg
    params = PARAMS if params is None else params
    mask = MASK if masked else FULL_MASK
    y, routes = mref.moe_forward(x, mask, params, cfg, mesh_shape)
    static = (cfg.activation, cfg.combine, cfg.eps)
    if static not in _REF_GRAD_FNS:
        def ref_loss(p, xx, frozen, c):
            return mref.reference_loss_jax(p, xx, frozen, c, activation=static[0], combine=static[1],
                                           eps=static[2], aux_weight=AUX_W, z_weight=Z_W)
        _REF_GRAD_FNS[static] = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1), has_aux=True),
                                        compiler_options=FAST_COMPILE)
    (loss, y_jnp), (g_p, g_x) = _REF_GRAD_FNS[static](params, x, mref.frozen_routes(routes, cfg), cot)
    out = dict(y=y, routes=routes, metrics=routes["metrics"], y_jnp=np.asarray(y_jnp), loss=float(loss),
               grads={k: np.asarray(v) for k, v in g_p.items()}, gx=np.asarray(g_x))
    if cache:
        _REFS[key] = out
    return out


def assert_metrics_match(got, want, check_losses=True):
    for name in ("tokens", "drop_rate", "unrouted_rate", "padding_rate", "fill_in_rate", "ir_rate",
                 "ir_overflow_rate", "ir_reuse_rate", "expert_demand", "expert_load"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)
    if check_losses:
        for name in ("aux_loss", "z_loss"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def assert_nontrivial(name, metrics):
    """The data must exercise the mechanism under test."""
    cfg = make_cfg(name)
    assert metrics["drop_rate"] > 0, f"{name}: nothing dropped, test is vacuous"
    if cfg.ir_mode is not None:
        assert metrics["ir_rate"] > 0, f"{name}: nothing rectified, test is vacuous"
    if cfg.fill_in:
        assert metrics["fill_in_rate"] > 0, f"{name}: no fill-in slot taken, test is vacuous"


def assert_grads_close(got, want, tol, what=""):
    assert set(got["grads"]) == set(want["grads"])
    for k in want["grads"]:
        np.testing.assert_allclose(got["grads"][k], want["grads"][k], **tol, err_msg=f"{what} d/d{k}")
    np.testing.assert_allclose(got["gx"], want["gx"], **tol, err_msg=f"{what} d/dx")


# ------------------------------------------------------------------------------------------------
# The reference itself (cheap sanity checks so a broken reference cannot make tests pass).
# ------------------------------------------------------------------------------------------------
def test_reference_jnp_twin_matches_numpy_forward():
    for name in ("top1_ir", "top2_ir_fr"):
        ref = reference(name, (2, 4))
        np.testing.assert_allclose(ref["y_jnp"], ref["y"], **REF_TOL)


def test_reference_top1_weights_by_hand():
    """Top-1 ST: y is exactly the chosen expert's output or 0 (dropped); IR: the local expert's."""
    ref = reference("top1_ir", (1, 8))
    params, r = PARAMS, ref["routes"]
    b, t = np.argwhere(r["ir_placed"])[0]
    assert r["slot"][b, t, 0] < 0 and r["ir_expert"][b, t] == r["device"][b, t]  # L = 1 on (1, 8)
    np.testing.assert_allclose(ref["y"][b, t], mref.apply_expert(X[b, t], params, r["ir_expert"][b, t], "swiglu"),
                               rtol=1e-12)
    b, t = np.argwhere(r["slot"][..., 0] >= 0)[0]
    np.testing.assert_allclose(ref["y"][b, t], mref.apply_expert(X[b, t], params, r["expert_index"][b, t, 0],
                                                                 "swiglu"), rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# Mesh (1, 1): the block equals the reference for all eight variants.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_single_device_matches_reference(name):
    got, ref = cached_run(name, (1, 1)), reference(name, (1, 1))
    assert_nontrivial(name, got["metrics"])
    np.testing.assert_allclose(got["y"], ref["y"], **REF_TOL)
    assert_metrics_match(got["metrics"], ref["metrics"])
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
    assert_grads_close(got, ref, REF_TOL, name)


# ------------------------------------------------------------------------------------------------
# Across meshes.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mesh_shape", MESHES[1:])
@pytest.mark.parametrize("name", NO_IR)
def test_no_ir_variants_identical_across_meshes(name, mesh_shape):
    """Vanilla and FR do not depend on which device holds a token: values and grads equal (1, 1)."""
    got, base = cached_run(name, mesh_shape), cached_run(name, (1, 1))
    np.testing.assert_allclose(got["y"], base["y"], **EXACT_TOL)
    assert_metrics_match(got["metrics"], base["metrics"])
    assert_grads_close(got, base, EXACT_TOL, f"{name} {mesh_shape}")


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("name", WITH_IR)
def test_ir_variants_match_reference_with_mesh_layout(name, mesh_shape):
    """IR picks the holding device's local experts: compare with the reference of that layout."""
    got, ref = cached_run(name, mesh_shape), reference(name, mesh_shape)
    assert_nontrivial(name, got["metrics"])
    if make_cfg(name).top_k == 2:
        # Both IR paths are exercised: tokens that reuse an accepted choice of their local expert, and
        # tokens with an IR slot.
        routes = ref["routes"]
        assert routes["ir_reused"].any() and (routes["ir_placed"] & ~routes["ir_reused"]).any()
    np.testing.assert_allclose(got["y"], ref["y"], **REF_TOL)
    assert_metrics_match(got["metrics"], ref["metrics"])
    assert_grads_close(got, ref, REF_TOL, f"{name} {mesh_shape}")
    if mesh_shape[1] > 1:
        # The layout matters for these data: the single-device reference would be wrong here.
        assert not np.allclose(ref["y"], reference(name, (1, 1))["y"], **REF_TOL)


def test_gelu_bpr_ir_overflow_four_experts_match_reference():
    """GELU experts (jax's default tanh approximation), E = 4 (two experts per device), batch-prioritized
    routing and a 1-slot IR buffer that overflows, on mesh (2, 2)."""
    cfg = make_cfg("top2_ir_fr", activation="gelu", num_experts=4, priority="bpr", ir_capacity_factor=0.25)
    params = make_params(cfg)
    got = run_block(cfg, (2, 2), params)
    ref = reference(None, (2, 2), cfg=cfg, params=params)
    assert "w_gate" not in got["grads"]
    m = got["metrics"]
    assert m["drop_rate"] > 0 and m["ir_rate"] > 0 and m["fill_in_rate"] > 0 and m["ir_overflow_rate"] > 0
    np.testing.assert_allclose(got["y"], ref["y"], **REF_TOL)
    assert_metrics_match(got["metrics"], ref["metrics"])
    assert_grads_close(got, ref, REF_TOL, "gelu")


def test_single_expert_equals_dense_swiglu():
    cfg = MoEConfig(num_experts=1, expert_dim=F, top_k=1, straight_through=True, capacity_factor=1.0,
                        group_size=S)
    params = make_params(cfg)
    got = run_block(cfg, (8, 1), params)
    assert got["metrics"]["drop_rate"] == 0 and got["metrics"]["padding_rate"] == 0
    xd = X.astype(np.float64)
    h = xd @ params["w_gate"][0]
    dense = (h / (1 + np.exp(-h))) * (xd @ params["w_up"][0]) @ params["w_down"][0]
    np.testing.assert_allclose(got["y"], dense, **REF_TOL)

    # Gradients of the same loss on the dense FFN. With E = 1 the router probability is 1 (no gradient),
    # the load-balance loss is the constant 1, and the z-loss is the mean of logit^2.
    def dense_loss(p, x):
        g = x @ p["w_gate"][0]
        y = (jax.nn.silu(g) * (x @ p["w_up"][0])) @ p["w_down"][0]
        return jnp.sum(y * COT) + AUX_W * 1.0 + Z_W * jnp.mean((x @ p["router_kernel"]) ** 2)
    gp, gx = jax.grad(dense_loss, argnums=(0, 1))(params, X)
    np.testing.assert_allclose(got["metrics"]["aux_loss"], 1.0, rtol=1e-6)
    for k in ("router_kernel", "w_gate", "w_up", "w_down"):
        np.testing.assert_allclose(got["grads"][k], gp[k], **REF_TOL, err_msg=k)
    np.testing.assert_allclose(got["gx"], gx, **REF_TOL)


# ------------------------------------------------------------------------------------------------
# Einsum versus index dispatch.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mesh_shape", [(2, 4), (1, 1)])  # IR through all_to_all buffers / one joint buffer
@pytest.mark.parametrize("name", list(VARIANTS))
def test_einsum_and_index_dispatch_agree(name, mesh_shape):
    a, b = cached_run(name, mesh_shape, "einsum"), cached_run(name, mesh_shape, "index")
    assert_nontrivial(name, a["metrics"])
    np.testing.assert_allclose(b["y"], a["y"], **EXACT_TOL)
    assert_metrics_match(b["metrics"], a["metrics"])
    assert_grads_close(b, a, EXACT_TOL, f"{name} index vs einsum")


def _row_copies(dispatch):
    """Concatenates and slices of token rows (last dim D) in the compiled one-device +IR+FR program."""
    cfg = make_cfg("top2_ir_fr", dispatch=dispatch, ir_capacity_factor=0.5)
    p = {k: jnp.asarray(v) for k, v in PARAMS.items()}
    weights = {k: p[k] for k in ("w_gate", "w_up", "w_down")}

    def loss(x, kernel, weights):
        y, _ = moe.moe_shard_body(x, jnp.ones(x.shape[:2], bool), moe.router_from_arrays(cfg, {"kernel": kernel}, d_model=D), weights, cfg=cfg,
                                  train=True, expert_axis_size=1, expert_axis=None)
        return jnp.sum(y * COT)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(X, p["router_kernel"], weights).compile().as_text()
    return re.findall(rf"= \w+\[[\d,]*,{D}\]\S* (?:concatenate|slice)\(", hlo)


def test_one_device_ir_index_program_copies_no_rows():
    """On a device holding every expert, index dispatch puts IR slots behind the routed slots of each buffer:
    the program concatenates and splits no token rows (the einsum path, which joins two buffers, does)."""
    assert _row_copies("einsum"), "the detector finds the einsum path's joint-buffer copies"
    assert not _row_copies("index")


# ------------------------------------------------------------------------------------------------
# Communication.
# ------------------------------------------------------------------------------------------------
COLLECTIVES = ("all-to-all", "all-reduce", "all-gather", "collective-permute", "reduce-scatter")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+(?P<op>" + "|".join(COLLECTIVES)
                    + r")(?P<start>-start)?\(")


def collectives(hlo_text):
    """{op kind: sorted list of result shapes} over all computations of the compiled HLO."""
    found = collections.defaultdict(list)
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            shape = re.sub(r"\{[^{}]*\}", "", m.group("shape"))  # drop layouts
            shape = re.sub(r"/\*index=\d+\*/", "", shape).replace(" ", "")
            found[m.group("op")].append(shape)
    return {k: sorted(v) for k, v in found.items()}


def _num_elements(shape):
    """Total elements of an HLO result type such as '(f32[2,2,1,12],f32[2,2,1,12])' or 'f32[]'."""
    total = 0
    for dims in re.findall(r"\w+\[([\d,]*)\]", shape):
        total += int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def _forward_hlo(name):
    cfg = make_cfg(name)
    mesh = get_mesh((2, 4))
    with jax.set_mesh(mesh):
        graphdef, template = nnx.split(moe.MoEBlock(cfg, d_model=D, rngs=nnx.Rngs(0)))
    state = _state(template, PARAMS)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)
    with jax.set_mesh(mesh):
        return jax.jit(forward).lower(state, X).compile().as_text()


def _elements(shapes):
    """Multiset of the array types inside a list of (tuple) result types."""
    return collections.Counter(re.findall(r"\w+\[[\d,]*\]", "".join(shapes)))


# Per-device metric counters that are constant zeros when IR / FR are off (fill-in slots, IR rectified,
# reused and overflowing tokens); XLA folds constants out of the metric psum, so turning IR / FR on may
# add these scalars to the metric all-reduce. Nothing else may change.
MAX_EXTRA_METRIC_SCALARS = 4


def test_rectification_adds_no_communication():
    """IR and FR must not change the all-to-alls or add collectives (mesh (2, 4), forward pass).

    * all-to-all: the same instructions with the same operand shapes in all four variants, each moving
      exactly one device's capacity buffers [E, G_l, C, D];
    * all-gather / collective-permute / reduce-scatter: identical (in fact absent);
    * all-reduce (the metric psum/pmean): a fair assertion cannot require identical all-reduces, because
      the metric counters that are zeros without IR/FR are constant-folded out of vanilla's psum. So we
      require that every all-reduced array is metric-sized (a scalar or an [E] vector: never tokens or
      weights), that nothing vanilla reduces disappears, and that the extra elements are at most the
      MAX_EXTRA_METRIC_SCALARS scalar counters.
    """
    hlo = {name: collectives(_forward_hlo(name)) for name in ("top1", "top1_ir", "top1_fr", "top1_ir_fr")}
    base = hlo["top1"]
    assert len(base.get("all-to-all", [])) == 2, base  # dispatch and return
    # Each all-to-all moves exactly one device's capacity buffers [E, G_l, C, D] (G_l = 2, C = 1).
    for shape in base["all-to-all"]:
        assert _num_elements(shape) == E * 2 * make_cfg("top1").capacity(True) * D, shape
    for name, found in hlo.items():
        assert set(found) <= set(base), (name, found)
        assert found.get("all-to-all") == base["all-to-all"], (name, found)
        for kind in ("all-gather", "collective-permute", "reduce-scatter"):
            assert found.get(kind, []) == base.get(kind, []), (name, kind, found.get(kind), base.get(kind))
        got, want = _elements(found.get("all-reduce", [])), _elements(base.get("all-reduce", []))
        for elem in got:
            assert _num_elements(elem) <= E, (name, elem)
        assert not want - got, (name, "vanilla reductions missing", want - got)
        extra = got - want
        assert set(extra) <= {"f32[]"} and sum(extra.values()) <= MAX_EXTRA_METRIC_SCALARS, (name, extra)


# ------------------------------------------------------------------------------------------------
# IR never reads another device's experts.
# ------------------------------------------------------------------------------------------------
def _poison(params, keep, names=("w_gate", "w_up", "w_down")):
    out = dict(params)
    for k in names:
        w = params[k].copy()
        drop = np.ones(w.shape[0], bool)
        drop[list(keep)] = False
        w[drop] = np.nan
        out[k] = w
    return out


def test_ir_uses_only_local_experts():
    """IR (ir_table, ir_dispatch -> the device's experts -> ir_combine) inside shard_map on (2, 4): poisoning every
    expert not local to expert rank r leaves y_local of the devices with rank r finite and unchanged."""
    cfg = make_cfg("top1_ir")
    params = PARAMS
    mesh = get_mesh((2, 4))
    n_exp, L = 4, E // 4
    C = cfg.capacity(True)

    def body(x_l, rk, w_l):
        g = x_l.shape[0] * x_l.shape[1] // S
        xg = x_l.reshape(g, S, D)
        probs = jax.nn.softmax(jnp.einsum("gsd,de->gse", xg, rk), axis=-1)
        table = routing.route_top_k(probs, top_k=1, capacity=C, straight_through=True)
        first = jax.lax.axis_index(sharding.EXPERT) * L
        ir = moe.ir_table(probs, table, cfg=cfg, first_expert=first, num_local=L)
        buffers = moe.ir_dispatch(xg, ir, num_local=L, impl=cfg.dispatch)
        y_loc = moe.ir_combine(moe.expert_ffn(buffers, w_l, cfg.activation), ir,
                               (ir.slot >= 0).astype(jnp.float32), impl=cfg.dispatch)
        return y_loc.reshape(x_l.shape), ir.placed.reshape(x_l.shape[:2])

    names = ("w_gate", "w_up", "w_down")
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(sharding.token_spec(3), P(),
                                                             {k: sharding.expert_spec(3) for k in names}),
                               out_specs=(sharding.token_spec(3), sharding.token_spec(2))))
    with jax.set_mesh(mesh):
        clean, placed = (np.asarray(a) for a in fn(X, params["router_kernel"], {k: params[k] for k in names}))
        for r in range(n_exp):
            bad = _poison(params, range(r * L, (r + 1) * L))
            y_loc, _ = fn(X, params["router_kernel"], {k: bad[k] for k in names})
            y_loc = np.asarray(y_loc)
            rows = [i for i in range(B) if i % n_exp == r]   # one row per device on (2, 4), B = 8
            assert placed[rows].any()
            assert np.all(np.isfinite(y_loc[rows])), r
            np.testing.assert_array_equal(y_loc[rows], clean[rows])
            others = [i for i in range(B) if i % n_exp != r]
            assert not np.all(np.isfinite(y_loc[others][placed[others]]))  # the poison is really there


def test_block_ir_output_of_unrouted_tokens_uses_only_local_experts():
    """Whole block, index dispatch (gathers only accepted slots, so remote NaNs cannot leak through
    0 * NaN): tokens rectified with nothing accepted stay finite and unchanged when every expert not on
    their device is NaN."""
    name, mesh_shape, n_exp, L = "top1_ir", (2, 4), 4, E // 4
    clean = cached_run(name, mesh_shape, "index")
    routes = reference(name, mesh_shape)["routes"]
    i = list(VARIANTS).index(name)
    for r in range(n_exp):
        got = run_blocks(variant_cfgs("index"), mesh_shape, _poison(PARAMS, range(r * L, (r + 1) * L)))[i]
        rows = np.array([b % n_exp == r for b in range(B)])  # one row per device on (2, 4)
        sel = routes["ir_placed"] & rows[:, None]
        assert sel.any()
        assert np.all(np.isfinite(got["y"][sel])), r
        np.testing.assert_array_equal(got["y"][sel], clean["y"][sel])
        assert not np.all(np.isfinite(got["y"][rows[:, None] & ~routes["ir_placed"]]))


# ------------------------------------------------------------------------------------------------
# Token masks and metrics.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_token_mask(name):
    got = cached_run(name, (2, 4), masked=True)
    ref = reference(name, (2, 4), masked=True)
    assert_nontrivial(name, got["metrics"])
    pad = ~MASK
    assert pad.any()
    assert np.all(got["y"][pad] == 0.0), "padding tokens must get no expert output"
    assert np.all(got["gx"][pad] == 0.0), "padding tokens must not influence the loss"
    assert got["metrics"]["tokens"] == MASK.sum()
    np.testing.assert_allclose(got["y"], ref["y"], **REF_TOL)
    # Rates, demand and load recounted from the reference tables of all devices; losses too (the z-loss
    # is the mean over ALL valid tokens of the mesh, so it does not depend on how padding falls on devices).
    assert_metrics_match(got["metrics"], ref["metrics"])
    assert_grads_close(got, ref, REF_TOL, f"{name} masked")
    # Padding changes nothing for the valid tokens' routing counts except removing the padded tokens.
    full = cached_run(name, (2, 4))
    assert full["metrics"]["tokens"] == B * T
    assert np.sum(got["metrics"]["expert_demand"]) == MASK.sum() * make_cfg(name).top_k


def test_z_loss_with_uneven_padding_is_the_same_on_every_mesh():
  """The z-loss and its router gradient are a global masked mean: padding spread unevenly over devices
  must not change them (a mean of per-device means would)."""
  values = {}
  for mesh_shape in ((1, 1), (2, 4), (8, 1)):
    got = cached_run("top2", mesh_shape, masked=True)
    values[mesh_shape] = got["metrics"]["z_loss"]
  counts = MASK.reshape(8, -1).sum(1)
  assert counts.min() != counts.max(), "the test needs uneven padding over the 8 devices"
  np.testing.assert_allclose(values[(2, 4)], values[(1, 1)], rtol=1e-6)
  np.testing.assert_allclose(values[(8, 1)], values[(1, 1)], rtol=1e-6)


def test_metric_values_are_consistent_with_tables():
    """Direct recount for one variant, independent of the reference's _metrics helper."""
    got, ref = cached_run("top2_ir_fr", (2, 4), masked=True), reference("top2_ir_fr", (2, 4), masked=True)
    r = ref["routes"]
    valid = r["mask"]
    acc = r["slot"] >= 0
    slots = (B * T // S) * E * r["capacity"]
    np.testing.assert_allclose(got["metrics"]["drop_rate"], (~acc[..., :2])[valid].sum() / (2 * valid.sum()),
                               rtol=1e-6)
    np.testing.assert_allclose(got["metrics"]["unrouted_rate"], (acc.sum(-1) == 0)[valid].mean(), rtol=1e-6)
    np.testing.assert_allclose(got["metrics"]["padding_rate"], 1 - acc.sum() / slots, rtol=1e-6)
    np.testing.assert_allclose(got["metrics"]["fill_in_rate"], acc[..., 2].sum() / slots, rtol=1e-6)
    np.testing.assert_allclose(got["metrics"]["ir_rate"], r["ir_placed"].sum() / valid.sum(), rtol=1e-6)
    np.testing.assert_allclose(got["metrics"]["expert_load"],
                               np.bincount(r["expert_index"][acc], minlength=E), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Validation.
# ------------------------------------------------------------------------------------------------
def _call(cfg, mesh_shape, batch=B, seq=T):
    mesh = get_mesh(mesh_shape)
    with jax.set_mesh(mesh):
        block = moe.MoEBlock(cfg, d_model=D, rngs=nnx.Rngs(0))
        return block(jnp.zeros((batch, seq, D)))


def test_experts_not_divisible_by_expert_axis_at_call():
    """A block built on a mesh it fits, called under a mesh whose expert axis does not divide E."""
    with jax.set_mesh(get_mesh((1, 1))):
        block = moe.MoEBlock(make_cfg("top1", num_experts=4), d_model=D, rngs=nnx.Rngs(0))
    with jax.set_mesh(get_mesh((1, 8))):
        with pytest.raises(ValueError, match=r"num_experts=4 is not divisible by the mesh's expert axis \(8\)"):
            block(jnp.zeros((B, T, D)))


def test_experts_not_divisible_by_expert_axis_at_construction():
    """Building the block under such a mesh must also give the clear layout error (not a raw sharding
    error from the parameter initializer)."""
    with jax.set_mesh(get_mesh((1, 8))):
        with pytest.raises(ValueError, match=r"num_experts=4.*expert axis \(8\)"):
            moe.MoEBlock(make_cfg("top1", num_experts=4), d_model=D, rngs=nnx.Rngs(0))


def test_tokens_per_device_not_divisible_by_group_size():
    with pytest.raises(ValueError, match=r"holds 16 tokens.*group_size=12"):
        _call(make_cfg("top1", group_size=12), (2, 4))


def test_batch_not_divisible_by_devices():
    with pytest.raises(ValueError, match=r"batch_size=4 is not divisible by the 8 devices"):
        _call(make_cfg("top1"), (2, 4), batch=4)


def test_block_without_mesh_gives_clear_error():
    mesh = get_mesh((1, 1))
    with jax.set_mesh(mesh):
        block = moe.MoEBlock(make_cfg("top1"), d_model=D, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"jax\.set_mesh"):
        block(jnp.zeros((B, T, D)))


def test_from_dict():
    cfg = MoEConfig.from_dict({"num_experts": 4, "top_k": 2, "ir_mode": "any"})
    assert (cfg.num_experts, cfg.top_k, cfg.ir_mode, cfg.num_choices) == (4, 2, "any", 2)
    with pytest.raises(ValueError, match=r"Unknown config field moe\.num_expert\. Did you mean 'moe\.num_experts'"):
        MoEConfig.from_dict({"num_expert": 4})


@pytest.mark.parametrize("field, value, pattern", [
    ("priority", "first", r"moe\.priority='first'"),
    ("fill_in_priority", "best", r"moe\.fill_in_priority='best'"),
    ("combine", "sum", r"moe\.combine='sum'"),
    ("activation", "relu", r"moe\.activation='relu'"),
    ("dispatch", "sparse", r"moe\.dispatch='sparse'"),
    ("dtype", "float16", r"moe\.dtype='float16'"),
    ("ir_mode", "some", r"moe\.ir_mode='some'"),
    ("top_k", 9, r"moe\.top_k=9"),
    ("capacity_factor", -1.0, r"moe\.capacity_factor=-1\.0"),
    ("group_size", 0, r"moe\.group_size=0"),
    ("num_experts", 0, r"moe\.num_experts=0"),
])
def test_bad_values_rejected(field, value, pattern):
    cfg = MoEConfig(**{**BASE, field: value})
    with pytest.raises(ValueError, match=pattern):
        cfg.validate()
    with jax.set_mesh(get_mesh((1, 1))), pytest.raises(ValueError, match=pattern):
        moe.MoEBlock(cfg, d_model=D, rngs=nnx.Rngs(0))


def test_inconsistent_combinations_rejected():
    with pytest.raises(ValueError, match="straight_through"):
        make_cfg("top2", straight_through=True).validate()
    with pytest.raises(ValueError, match="straight_through"):
        make_cfg("top1_fr", straight_through=True).validate()
    with pytest.raises(ValueError, match="ignore_kth"):
        make_cfg("top1", ir_mode="ignore_kth").validate()
    with pytest.raises(ValueError, match="fill_in"):
        MoEConfig(**{**BASE, "num_experts": 2, "top_k": 2, "fill_in": True}).validate()
