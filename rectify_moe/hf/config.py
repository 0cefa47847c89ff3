"""A Hugging Face `config.json` of the Llama family -> the `model` config section (and back, for export).

The family: `LlamaForCausalLM` (Llama 1-3 without rope scaling, SmolLM, TinyLlama), `MistralForCausalLM` (without a
sliding window) and `Qwen2ForCausalLM` (qkv bias): pre-norm RMSNorm blocks, rotate-half RoPE, grouped-query
attention, SwiGLU MLP, tied or untied embeddings. Anything else (another architecture, rope scaling, a sliding
window, an MLP bias, another activation) is refused with one line naming the field of config.json.

`--config.init_from=hf:DIR` makes the run's architecture that of DIR (`apply`, called by `schema.resolve`); the
number of MoE layers (`model.moe_every`) and the execution fields stay the run's own.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from rectify_moe.config import schema
from rectify_moe.config.fields import ConfigError

PREFIX = "hf:"
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def hf_dir(init_from: str) -> Optional[str]:
  """DIR of `init_from='hf:DIR'` (absolute, ~ expanded), None for any other value."""
  if not init_from.startswith(PREFIX):
    return None
  return os.path.abspath(os.path.expanduser(init_from[len(PREFIX):]))


def read(directory: str) -> dict[str, Any]:
  """DIR/config.json as a dict; ConfigError if the folder or the file is missing or unreadable."""
  if not os.path.isdir(directory):
    raise ConfigError(f"init_from=hf:{directory}: no such directory; give a local folder in the Hugging Face layout "
                      "(config.json, *.safetensors, tokenizer.json).")
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{path} is missing; a Hugging Face model folder holds config.json next to its *.safetensors.")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def architecture(hf: dict[str, Any], where: str = "config.json") -> str:
  """The family member named by `architectures` (or `model_type`); ConfigError naming the field otherwise."""
  names = hf.get("architectures") or []
  if names:
    if len(names) != 1 or names[0] not in ARCHITECTURES:
      raise ConfigError(f"{where}: architectures={names} is outside the Llama family this model implements "
                        f"({', '.join(ARCHITECTURES)}).")
    return names[0]
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ConfigError(f"{where}: model_type={model_type!r} (and no 'architectures') is outside the Llama family "
                      f"({', '.join(MODEL_TYPES)}).")
  return MODEL_TYPES[model_type]


def _rope_theta(hf: dict[str, Any], where: str) -> float:
  """rope_theta, from the top level or from `rope_parameters` (newer files); refuses any rope scaling."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling")
  for name, value in (("rope_scaling", scaling), ("rope_parameters", params)):
    kind = (value or {}).get("rope_type", (value or {}).get("type", "default"))
    if value and kind != "default":
      raise ConfigError(f"{where}: {name}={json.dumps(value)} (rope scaling) is not supported; only plain RoPE "
                        "(rope_scaling null) is.")
  if hf.get("partial_rotary_factor", 1.0) != 1.0:
    raise ConfigError(f"{where}: partial_rotary_factor={hf['partial_rotary_factor']} is not supported (needs 1.0).")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_fields(hf: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
  """The architecture fields of `schema.ModelConfig` that config.json fixes (a dense model: moe_every=0).

  Raises:
    ConfigError: one line naming the config.json field outside the family or missing.
  """
  arch = architecture(hf, where)
  for name in REQUIRED:
    if not isinstance(hf.get(name), int):
      raise ConfigError(f"{where}: '{name}' is missing or not an integer; a Llama-family config.json needs "
                        f"{', '.join(REQUIRED)}.")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ConfigError(f"{where}: hidden_act={act!r} is not supported; the family's SwiGLU MLP uses 'silu'.")
  if hf.get("mlp_bias"):
    raise ConfigError(f"{where}: mlp_bias=true is not supported (the SwiGLU FFN has no biases).")
  if hf.get("use_sliding_window") or (arch == "MistralForCausalLM" and hf.get("sliding_window") is not None):
    raise ConfigError(f"{where}: sliding_window={hf.get('sliding_window')} (sliding-window attention) is not "
                      "supported; set it to null in config.json if train.seq_len never exceeds it (then identical).")
  heads = hf["num_attention_heads"]
  kv = hf.get("num_key_value_heads") or heads
  head_dim = hf.get("head_dim")
  if head_dim is not None and head_dim * heads == hf["hidden_size"]:
    head_dim = None
  bias = bool(hf.get("attention_bias", False))
  return dict(
      vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"], num_heads=heads,
      num_kv_heads=None if kv == heads else kv, head_dim=head_dim, d_ff=hf["intermediate_size"],
      rope_base=_rope_theta(hf, where), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=arch == "Qwen2ForCausalLM" or bias, attn_out_bias=bias and arch != "Qwen2ForCausalLM", moe_every=0)


def special_tokens(hf: dict[str, Any]) -> tuple[Optional[int], Optional[int]]:
  """(bos_token_id, eos_token_id) of config.json (the first one where it lists several)."""
  def first(value):
    return value[0] if isinstance(value, list) and value else (value if isinstance(value, int) else None)
  return first(hf.get("bos_token_id")), first(hf.get("eos_token_id"))


def apply(cfg: schema.RunConfig) -> schema.RunConfig:
  """`cfg` with the architecture of its `init_from=hf:DIR` (unchanged for other init_from values or a missing DIR,
  which `upcycle.check_source` reports) and, when data.tokenizer is '', DIR's tokenizer."""
  directory = hf_dir(cfg.init_from)
  if directory is None or not os.path.isdir(directory):
    return cfg
  values = model_fields(read(directory), os.path.join(directory, "config.json"))
  values["moe_every"] = cfg.model.moe_every
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **values))
  if not cfg.data.tokenizer:
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=PREFIX + directory))
  return cfg


def to_hf(model: schema.ModelConfig, *, base: Optional[dict[str, Any]] = None, dtype: str = "float32"
          ) -> dict[str, Any]:
  """The config.json of a dense model (`base`: the imported one, whose other keys such as token ids are kept)."""
  if model.qkv_bias and not model.attn_out_bias:
    arch, model_type, bias = "Qwen2ForCausalLM", "qwen2", {}
  elif model.qkv_bias != model.attn_out_bias:
    raise ConfigError("model.attn_out_bias without model.qkv_bias has no Hugging Face counterpart in the Llama "
                      "family; set both or neither.")
  else:
    arch, model_type, bias = "LlamaForCausalLM", "llama", {"attention_bias": model.qkv_bias, "mlp_bias": False}
  out = dict(base or {})
  if base and architecture(base) != arch:  # e.g. a Mistral checkpoint: keep its own name
    arch, model_type = architecture(base), base.get("model_type", model_type)
  out.update(architectures=[arch], model_type=model_type, vocab_size=model.vocab_size, hidden_size=model.d_model,
             num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
             num_key_value_heads=model.kv_heads, head_dim=model.attn_head_dim, intermediate_size=model.d_ff,
             rope_theta=model.rope_base, rms_norm_eps=model.norm_eps, tie_word_embeddings=model.tie_embeddings,
             hidden_act="silu", rope_scaling=None, torch_dtype=dtype, **bias)
  out.pop("rope_parameters", None)
  return out
