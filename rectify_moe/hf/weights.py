"""Weights of a Llama-family model in the Hugging Face layout <-> the dense model's parameters.

A folder holds `model.safetensors`, or shards `*.safetensors` with `model.safetensors.index.json` (its
`weight_map`: tensor name -> shard file). Names map to our parameters as (`param_table`):

  model.embed_tokens.weight [V, D]                    embed [V, D]
  model.layers.i.input_layernorm.weight [D]           blocks/i/attn_norm/scale
  model.layers.i.self_attn.{q,k,v,o}_proj.weight      blocks/i/attn/w{q,k,v,o}   (transposed: HF stores [out, in])
  model.layers.i.self_attn.{q,k,v,o}_proj.bias        blocks/i/attn/b{q,k,v,o}   (qkv_bias / attn_out_bias)
  model.layers.i.post_attention_layernorm.weight      blocks/i/ffn_norm/scale
  model.layers.i.mlp.{gate,up,down}_proj.weight       blocks/i/ffn/w_{gate,up,down} (transposed)
  model.norm.weight                                   final_norm/scale
  lm_head.weight [V, D]                               unembed [D, V] (transposed; absent with tied embeddings)

Both use the rotate-half RoPE convention, so q/k need no permutation. `load` reads every tensor with
`safe_open(framework="np")` (memory-mapped) and builds each parameter with `jax.make_array_from_callback`: every
device's shard is read from the file for that shard only, so the host never holds a second full copy of the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
from typing import Any, Callable, Optional

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import safe_open

from rectify_moe import model as model_lib
from rectify_moe.config import schema
from rectify_moe.config.fields import ConfigError

INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F64": np.float64}
# Tensors some checkpoints carry that the model recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

Path = tuple[Any, ...]


def param_table(model: schema.ModelConfig) -> list[tuple[Path, str, bool]]:
  """(our parameter path, Hugging Face tensor name, transposed) of every parameter of the dense model."""
  rows: list[tuple[Path, str, bool]] = [(("embed",), "model.embed_tokens.weight", False)]
  for i in range(model.num_layers):
    pre = f"model.layers.{i}."
    rows.append((("blocks", i, "attn_norm", "scale"), pre + "input_layernorm.weight", False))
    for ours, theirs in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "o")):
      rows.append((("blocks", i, "attn", "w" + ours), f"{pre}self_attn.{theirs}_proj.weight", True))
    biases = ("q", "k", "v") if model.qkv_bias else ()
    biases += ("o",) if model.attn_out_bias else ()
    for name in biases:
      rows.append((("blocks", i, "attn", "b" + name), f"{pre}self_attn.{name}_proj.bias", False))
    rows.append((("blocks", i, "ffn_norm", "scale"), pre + "post_attention_layernorm.weight", False))
    for name in ("gate", "up", "down"):
      rows.append((("blocks", i, "ffn", "w_" + name), f"{pre}mlp.{name}_proj.weight", True))
  rows.append((("final_norm", "scale"), "model.norm.weight", False))
  if not model.tie_embeddings:
    rows.append((("unembed",), "lm_head.weight", True))
  return rows


def tensor_files(directory: str) -> dict[str, str]:
  """{tensor name: safetensors file} of a folder (from the index if there is one).

  Raises:
    ConfigError: no safetensors file, an unreadable index, or an index naming a shard that is missing.
  """
  index_path = os.path.join(directory, INDEX)
  if os.path.isfile(index_path):
    try:
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
      raise ConfigError(f"cannot read the weight_map of {index_path}: {str(e).splitlines()[0]}") from None
    for shard in sorted(set(weight_map.values())):
      if not os.path.isfile(os.path.join(directory, shard)):
        raise ConfigError(f"{index_path} names shard {shard!r}, which is missing from {directory}; download every "
                          "shard the index lists.")
    return {name: os.path.join(directory, shard) for name, shard in weight_map.items()}
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise ConfigError(f"{directory} holds no *.safetensors file (only safetensors weights are read; convert "
                      "pytorch_model.bin first).")
  out = {}
  for path in files:
    with safe_open(path, framework="np") as f:
      out.update({name: path for name in f.keys()})
  return out


def _expected_shape(shape: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
  return tuple(reversed(shape)) if transposed else tuple(shape)


def _sharding_at(shardings: Any, path: Path, mesh: jax.sharding.Mesh) -> jax.sharding.Sharding:
  node = shardings
  for key in path:
    if node is None:
      break
    node = node.get(key) if isinstance(node, dict) else None
  if isinstance(node, NamedSharding):
    return NamedSharding(mesh, node.spec)  # an abstract model's sharding names an abstract mesh
  return node if isinstance(node, jax.sharding.Sharding) else NamedSharding(mesh, P())


def load(directory: str, model: schema.ModelConfig, mesh: jax.sharding.Mesh, *, shardings: Any = None,
         log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
  """The dense model's parameters (a pure dict as `nnx.to_pure_dict` gives it) read from `directory`.

  Args:
    directory: the Hugging Face model folder.
    model: the dense model's config (`hf.config.model_fields` of its config.json, moe_every=0).
    mesh: where the parameters go.
    shardings: a pure dict of shardings per parameter (None = replicated on `mesh`).

  Raises:
    ConfigError: a missing tensor, a shape or dtype mismatch, a tensor with no place in the model.
  """
  files = tensor_files(directory)
  table = param_table(model)
  wanted = {name for _, name, _ in table}
  unused = [n for n in files if n not in wanted and not n.endswith(IGNORED_SUFFIXES)
            and not (model.tie_embeddings and n == "lm_head.weight")]
  if unused:
    raise ConfigError(f"{files[unused[0]]}: tensor {unused[0]!r} has no place in the model of config.json "
                      f"({len(unused)} such); is config.json from the same checkpoint?")
  _, abstract = _abstract_dense(model, mesh)
  out: dict[Any, Any] = {}
  with contextlib.ExitStack() as stack:
    handles = {path: stack.enter_context(safe_open(path, framework="np")) for path in sorted(set(files.values()))}
    for path, name, transposed in table:
      if name not in files:
        hint = " (config.json says tie_word_embeddings=false)" if name == "lm_head.weight" else ""
        raise ConfigError(f"{directory}: tensor {name!r} is missing{hint}; the checkpoint does not match its "
                          "config.json.")
      tensor = handles[files[name]].get_slice(name)
      file_dtype, file_shape = tensor.get_dtype(), tuple(tensor.get_shape())
      if file_dtype not in FLOAT_DTYPES:
        raise ConfigError(f"{files[name]}: tensor {name!r} has dtype {file_dtype}; only float weights "
                          f"({', '.join(FLOAT_DTYPES)}) load (quantized checkpoints do not).")
      leaf = _leaf_at(abstract, path)
      shape, leaf_dtype = tuple(leaf.shape), np.dtype(leaf.dtype)  # norms stay float32 under a bf16 param_dtype
      if _expected_shape(file_shape, transposed) != shape:
        raise ConfigError(f"{files[name]}: tensor {name!r} has shape {file_shape}, but config.json gives "
                          f"{_expected_shape(shape, transposed)}; the weights and config.json disagree.")
      sharding = _sharding_at(shardings, path, mesh)

      def read(index, tensor=tensor, transposed=transposed, shape=shape, dtype=leaf_dtype):
        index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
        block = tensor[tuple(reversed(index)) if transposed else index]
        return np.asarray(block.T if transposed else block, dtype=dtype)  # no copy when the dtype matches

      _set(out, path, jax.make_array_from_callback(shape, sharding, read))
  if log is not None:
    log(f"Loaded {len(table)} tensors from {directory} ({len(set(files.values()))} file(s)).")
  return out


def _abstract_dense(model: schema.ModelConfig, mesh: jax.sharding.Mesh):
  """(graphdef, abstract pure parameters) of the dense model of `model`."""
  dense = dataclasses.replace(schema.RunConfig(), model=dataclasses.replace(model, moe_every=0))
  graphdef, abstract = model_lib.abstract_model(dense, mesh)
  return graphdef, nnx.to_pure_dict(abstract)


def _leaf_at(tree: Any, path: Path) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: Path, value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


# Mixtral's names of an MoE layer: ours -> theirs (each [out, in], one tensor per expert).
MIXTRAL_EXPERT_NAMES = {"w_gate": "w1", "w_down": "w2", "w_up": "w3"}


def host_tensors(params: dict[str, Any], model: schema.ModelConfig, dtype: Any = np.float32
                 ) -> dict[str, np.ndarray]:
  """{Hugging Face name: numpy array} of a model's pure parameters (for `hf.export`).

  A dense model in the Llama layout; MoE layers (top-k routers only) in Mixtral's:
  `model.layers.i.block_sparse_moe.gate.weight` [E, D] (the router kernel, transposed) and
  `model.layers.i.block_sparse_moe.experts.j.w{1,2,3}.weight` (gate, down, up projections of expert j, transposed).
  """
  out = {}
  for path, name, transposed in param_table(dataclasses.replace(model, moe_every=0)):
    if path[0] == "blocks" and path[2] == "ffn" and model.is_moe_layer(path[1]):
      ffn = _leaf_at(params, path[:3])
      prefix = f"model.layers.{path[1]}.block_sparse_moe."
      if path[3] == "w_gate":  # once per layer: the router
        out[prefix + "gate.weight"] = _host(ffn["router"]["kernel"], True, dtype)
      experts = np.asarray(jax.device_get(ffn[path[3]]))
      for j in range(experts.shape[0]):
        out[f"{prefix}experts.{j}.{MIXTRAL_EXPERT_NAMES[path[3]]}.weight"] = _host(experts[j], True, dtype)
      continue
    out[name] = _host(_leaf_at(params, path), transposed, dtype)
  return out


def _host(value: Any, transposed: bool, dtype: Any) -> np.ndarray:
  value = np.asarray(jax.device_get(value))
  return np.ascontiguousarray(value.T if transposed else value).astype(dtype)
