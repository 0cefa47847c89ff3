"""Decoder-only Transformer language model with MoE feed-forward layers.

Pre-norm blocks: RMSNorm -> causal multi-head attention with RoPE -> residual; RMSNorm -> FFN -> residual.
The FFN is an `MoEBlock` in every `moe_every`-th layer (layers i with `i % moe_every == moe_every - 1`,
i.e. every other layer for 2, as in the paper) and a dense SwiGLU elsewhere. Dense parameters are
replicated; the batch is sharded over (data, expert); expert weights over `expert`.
The Llama family's switches (model.num_kv_heads, head_dim, norm_eps, qkv_bias, attn_out_bias, param_dtype) make it
the architecture of Llama / Qwen2 / Mistral checkpoints (rectify_moe/hf imports and exports them).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from rectify_moe import moe as moe_lib
from rectify_moe.config import schema
from rectify_moe.config.schema import ModelConfig, MoEConfig

Array = jax.Array


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis; statistics in float32, output in the input dtype."""

  def __init__(self, dim: int, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...]).astype(x.dtype)


def apply_rope(x: Array, positions: Array, base: float) -> Array:
  """Rotary position embedding (rotate-half form).

  Args:
    x: [B, T, H, Dh].
    positions: int32[T].
    base: frequency base.

  Returns:
    [B, T, H, Dh] in x.dtype.
  """
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # [T, half]
  sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class CausalSelfAttention(nnx.Module):
  """Causal self-attention with RoPE; grouped-query when model.num_kv_heads < num_heads (each K/V head serves
  num_heads / num_kv_heads consecutive query heads); optional q/k/v and output biases (Qwen2, Llama's
  attention_bias)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, kv, dh = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.attn_head_dim
    self.num_heads, self.num_kv_heads, self.head_dim, self.rope_base = h, kv, dh, cfg.rope_base
    self.dtype = moe_lib.DTYPES[cfg.dtype]
    init = _param_init(nnx.initializers.lecun_normal(), cfg.param_dtype)
    self.wq = nnx.Param(init(rngs.params(), (d, h * dh)))
    self.wk = nnx.Param(init(rngs.params(), (d, kv * dh)))
    self.wv = nnx.Param(init(rngs.params(), (d, kv * dh)))
    self.wo = nnx.Param(init(rngs.params(), (h * dh, d)))
    zeros = lambda n: nnx.Param(jnp.zeros((n,), moe_lib.DTYPES[cfg.param_dtype]))
    if cfg.qkv_bias:
      self.bq, self.bk, self.bv = zeros(h * dh), zeros(kv * dh), zeros(kv * dh)
    if cfg.attn_out_bias:
      self.bo = zeros(d)

  def __call__(self, x: Array) -> Array:
    batch, seq, _ = x.shape
    head_dim = self.head_dim
    positions = jnp.arange(seq, dtype=jnp.int32)

    def project(w, bias_name, heads):
      # Shape: [B, T, H, Dh] = einsum("btd,dk->btk") reshaped
      out = jnp.einsum("btd,dk->btk", x, w[...].astype(self.dtype))
      if hasattr(self, bias_name):
        out = out + getattr(self, bias_name)[...].astype(self.dtype)
      return out.reshape(batch, seq, heads, head_dim)

    q = apply_rope(project(self.wq, "bq", self.num_heads), positions, self.rope_base)
    k = apply_rope(project(self.wk, "bk", self.num_kv_heads), positions, self.rope_base)
    v = project(self.wv, "bv", self.num_kv_heads)
    groups = self.num_heads // self.num_kv_heads
    if groups > 1:  # K/V head j serves query heads j*groups .. j*groups + groups - 1
      k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    # Shape: [B, H, T, T] = einsum("bqhd,bkhd->bhqk")
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(head_dim)
    causal = jnp.tril(jnp.ones((seq, seq), bool))
    scores = jnp.where(causal[None, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    # Shape: [B, T, H, Dh] = einsum("bhqk,bkhd->bqhd")
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, seq, self.num_heads * head_dim)
    # Shape: [B, T, D] = einsum("btk,kd->btd")
    out = jnp.einsum("btk,kd->btd", out, self.wo[...].astype(self.dtype))
    if hasattr(self, "bo"):
      out = out + self.bo[...].astype(self.dtype)
    return out


def _param_init(init, param_dtype: str):
  """`init` drawn in float32 (the same numbers for every param_dtype), stored in model.param_dtype."""
  if param_dtype == "float32":
    return init
  return lambda key, shape: init(key, shape).astype(moe_lib.DTYPES[param_dtype])


class DenseFFN(nnx.Module):
  """SwiGLU feed-forward: `(silu(x W_gate) * (x W_up)) W_down`."""

  def __init__(self, d_model: int, d_ff: int, dtype: str, *, rngs: nnx.Rngs, param_dtype: str = "float32"):
    init = _param_init(nnx.initializers.lecun_normal(), param_dtype)
    self.w_gate = nnx.Param(init(rngs.params(), (d_model, d_ff)))
    self.w_up = nnx.Param(init(rngs.params(), (d_model, d_ff)))
    self.w_down = nnx.Param(init(rngs.params(), (d_ff, d_model)))
    self.dtype = moe_lib.DTYPES[dtype]

  def __call__(self, x: Array) -> Array:
    cast = lambda w: w[...].astype(self.dtype)
    # Shape: [B, T, F] = einsum("btd,df->btf")
    hidden = jax.nn.silu(jnp.einsum("btd,df->btf", x, cast(self.w_gate))) * jnp.einsum(
        "btd,df->btf", x, cast(self.w_up))
    # Shape: [B, T, D] = einsum("btf,fd->btd")
    return jnp.einsum("btf,fd->btd", hidden, cast(self.w_down))


class Block(nnx.Module):
  """One pre-norm Transformer block; the FFN is an MoEBlock or a DenseFFN."""

  def __init__(self, cfg: ModelConfig, moe_cfg: Optional[MoEConfig], *, rngs: nnx.Rngs,
               router_prepared: Optional[dict[str, Any]] = None):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.attn = CausalSelfAttention(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.is_moe = moe_cfg is not None
    if self.is_moe:
      self.ffn = moe_lib.MoEBlock(moe_cfg, d_model=cfg.d_model, rngs=rngs, vocab_size=cfg.vocab_size,
                                  prepared=router_prepared)
    else:
      self.ffn = DenseFFN(cfg.d_model, cfg.d_ff, cfg.dtype, rngs=rngs, param_dtype=cfg.param_dtype)

  def __call__(self, x: Array, token_mask: Array, train: bool, tokens: Array, step: Array, rng: Array
               ) -> tuple[Array, Optional[dict[str, Array]]]:
    x = x + self.attn(self.attn_norm(x))
    h = self.ffn_norm(x)
    if self.is_moe:
      out, metrics = self.ffn(h, token_mask, train=train, token_ids=tokens, step=step, rng=rng)
    else:
      out, metrics = self.ffn(h), None
    return x + out.astype(x.dtype), metrics


class TransformerLM(nnx.Module):
  """Decoder-only LM: tokens int32[B, T] -> logits float32[B, T, V] and per-MoE-layer routing metrics."""

  def __init__(self, cfg: ModelConfig, moe_cfg: Optional[MoEConfig], *, rngs: nnx.Rngs,
               router_prepared: Optional[dict[str, Any]] = None):
    """router_prepared: the routers' data-dependent initialisation (`moe.prepare_router`); None = defaults."""
    cfg.validate()
    if cfg.num_moe_layers and moe_cfg is None:
      raise ValueError("model.moe_every > 0 needs a moe config.")
    self.cfg = cfg
    self.embed = nnx.Param(_param_init(nnx.initializers.normal(1.0), cfg.param_dtype)(
        rngs.params(), (cfg.vocab_size, cfg.d_model)))
    self.blocks = nnx.List([Block(cfg, moe_cfg if cfg.is_moe_layer(i) else None, rngs=rngs,
                                  router_prepared=router_prepared) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    if not cfg.tie_embeddings:
      self.unembed = nnx.Param(_param_init(nnx.initializers.lecun_normal(), cfg.param_dtype)(
          rngs.params(), (cfg.d_model, cfg.vocab_size)))

  def __call__(self, tokens: Array, token_mask: Optional[Array] = None, *, train: bool = True,
               step: Optional[Array] = None, rng: Optional[Array] = None
               ) -> tuple[Array, list[dict[str, Array]]]:
    """Runs the LM.

    Args:
      tokens: int32[B, T] input token ids.
      token_mask: bool[B, T] (False = padding).
      train: training mode (training capacity factor, Gating Dropout, StableMoE stage by step).
      step: int32 scalar training step (StableMoE).
      rng: replicated PRNG key of this step; layer i uses fold_in(rng, i) (Gating Dropout).

    Returns:
      (logits float32[B, T, V], one metrics dict per MoE layer: {"losses", "counts"}, see `moe.MoEBlock`).
    """
    dtype = moe_lib.DTYPES[self.cfg.dtype]
    if token_mask is None:
      token_mask = jnp.ones(tokens.shape, bool)
    step = jnp.zeros((), jnp.int32) if step is None else step
    rng = jax.random.key(0) if rng is None else rng
    x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
    layer_metrics = []
    for index, block in enumerate(self.blocks):
      layer_rng = jax.random.fold_in(rng, index)
      if self.cfg.remat:
        x, metrics = nnx.remat(lambda blk, h, m, s, r: blk(h, m, train, tokens, s, r))(
            block, x, token_mask, step, layer_rng)
      else:
        x, metrics = block(x, token_mask, train, tokens, step, layer_rng)
      if metrics is not None:
        layer_metrics.append(metrics)
    x = self.final_norm(x)
    unembed = self.embed[...].T if self.cfg.tie_embeddings else self.unembed[...]
    # Shape: [B, T, V] = einsum("btd,dv->btv")
    logits = jnp.einsum("btd,dv->btv", x, unembed.astype(dtype), preferred_element_type=jnp.float32)
    return logits, layer_metrics

  def moe_blocks(self) -> list[moe_lib.MoEBlock]:
    """The MoE blocks, in layer order (the order of the per-layer metrics)."""
    return [block.ffn for block in self.blocks if block.is_moe]

  def after_step(self, layer_metrics: list[dict[str, Any]]) -> None:
    """Router state updates after an optimizer step, from each MoE layer's global metrics of that step."""
    for block, metrics in zip(self.moe_blocks(), layer_metrics, strict=True):
      block.after_step(metrics)


def abstract_model(cfg: Any, mesh: jax.sharding.Mesh, moe_cfg: Optional[MoEConfig] = None):
  """(graphdef, abstract state) of the model of a run config, with no parameter materialised (a restore target).

  `moe_cfg` replaces the config's MoE settings (a router swap: same parameters, other graphdef). Router state that
  the training data would prepare (a balanced hash table) is a placeholder that a checkpoint restore fills.
  """
  cfg = schema.parse(cfg)
  moe_cfg = cfg.moe if moe_cfg is None else moe_cfg
  has_moe = bool(cfg.model.num_moe_layers)
  prepared = moe_lib.prepare_router(moe_cfg, vocab_size=cfg.model.vocab_size) if has_moe else None
  with jax.set_mesh(mesh):
    model = nnx.eval_shape(lambda: TransformerLM(cfg.model, moe_cfg if has_moe else None, rngs=nnx.Rngs(0),
                                                 router_prepared=prepared))
  return nnx.split(model)
