"""The run config: one typed section per concern, each field with its default and meaning, defaults only here.

`configs/*.py` start from `default_config()` (every field of every section exists, so any of them can be overridden
on the command line) and change what their experiment needs. The library reads the typed form, `parse(config)`.
`docs/config_reference.md` is generated from these classes (`python -m rectify_moe.config.reference`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

import ml_collections

from rectify_moe import routing
from rectify_moe.config.fields import ARCHITECTURE, ROUTING, ConfigError, field, fields_of, from_mapping, to_config_dict
from rectify_moe import dropless, routers
from rectify_moe.routers.hash_layers import HashTableKind
from rectify_moe.routing import CombineMode, FillInPriority, IRMode, Priority

Activation = Literal["swiglu", "gelu"]
Dispatch = Literal["einsum", "index", "dropless"]
DType = Literal["float32", "bfloat16"]
GatingDropoutMode = Literal["gate_drop", "gate_expert_drop"]
GatingDropoutWeight = Literal["one", "prob"]
DataSource = Literal["stdlib", "text_files", "tfds"]
Distributed = Literal["auto", "on", "off"]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The (data, expert) device mesh."""
  data: int = field(-1, "size of the 'data' axis (-1 = all remaining devices)")
  expert: int = field(1, "size of the 'expert' axis (-1 = all remaining devices); must divide moe.num_experts")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the tokens come from (see rectify_moe/data)."""
  source: DataSource = field("stdlib", "'stdlib' (offline default: the Python standard library source), "
                                       "'text_files' (data.text_files) or 'tfds' (data.tfds_name)")
  text_files: str = field("", "comma-separated files, globs (** allowed) or folders; ~ is expanded")
  tfds_name: str = field("", "registered TFDS name, e.g. 'lm1b' or 'tiny_shakespeare:1.0.0'")
  tfds_text_key: str = field("text", "feature holding the text in each TFDS example")
  train_split: str = field("train", "training split (local corpora have 'train' and 'validation')")
  eval_split: str = field("validation", "held-out split (local corpora have 'train' and 'validation')")
  data_dir: str = field("", "where datasets are prepared; '' = ~/.cache/rectify_moe/tfds for local corpora, TFDS's "
                            "own default for source='tfds'")
  heldout_fraction: float = field(0.03, "share of documents (by stable hash) in the 'validation' split of local "
                                        "corpora", min=0.0, max=1.0, max_exclusive=True)
  worker_count: int = field(0, "grain worker processes for training batches (0 = read in the trainer process)", min=0)
  stdlib_max_files: int = field(0, "use only the first N sorted stdlib files (0 = all); for quick tests", min=0)
  chunk_bytes: int = field(64 * 1024, "text files larger than this are split at line boundaries into chunks of at "
                                      "most this size", min=1)
  tfds_download: bool = field(True, "allow downloading a registered TFDS dataset that is not prepared locally")
  tokenizer: str = field("", "'byte' (259 ids), a tokenizer.json path, or 'hf:DIR' (DIR/tokenizer.json, BOS/EOS as "
                             "DIR/config.json says); '' = 'byte', or the tokenizer of an init_from=hf:DIR")
  read_threads: int = field(2, "grain prefetch threads for training batches (0 = read on demand)", min=0)
  prefetch_batches: int = field(4, "grain prefetch buffer, in batches (0 = read on demand)", min=0)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only Transformer hyper-parameters (rectify_moe/model.py)."""
  vocab_size: int = field(259, "token vocabulary (the byte tokenizer has 259)", kind=ARCHITECTURE, min=1)
  num_layers: int = field(4, "Transformer blocks", kind=ARCHITECTURE, min=1)
  d_model: int = field(128, "model width D", kind=ARCHITECTURE, min=1)
  num_heads: int = field(4, "attention heads (d_model % num_heads == 0)", kind=ARCHITECTURE, min=1)
  d_ff: int = field(512, "hidden width of the dense SwiGLU FFN layers", kind=ARCHITECTURE, min=1)
  moe_every: int = field(2, "an MoE FFN in every moe_every-th layer (0 = a dense model)", kind=ARCHITECTURE, min=0)
  dtype: DType = field("float32", "activation dtype (parameters are stored in model.param_dtype)")
  remat: bool = field(False, "rematerialise each block's activations in the backward pass (memory for speed)")
  rope_base: float = field(10000.0, "RoPE frequency base", kind=ARCHITECTURE, min=0.0, min_exclusive=True)
  tie_embeddings: bool = field(False, "share the input embedding with the output projection", kind=ARCHITECTURE)
  # The Llama family's switches (an imported Hugging Face model sets them; rectify_moe/hf).
  num_kv_heads: Optional[int] = field(None, "key/value heads of grouped-query attention (divides num_heads; None = "
                                            "num_heads, multi-head attention)", kind=ARCHITECTURE, min=1)
  head_dim: Optional[int] = field(None, "width of one attention head (None = d_model // num_heads)",
                                  kind=ARCHITECTURE, min=1)
  norm_eps: float = field(1e-6, "RMSNorm epsilon", kind=ARCHITECTURE, min=0.0)
  qkv_bias: bool = field(False, "biases on the query, key and value projections (Qwen2)", kind=ARCHITECTURE)
  attn_out_bias: bool = field(False, "a bias on the attention output projection", kind=ARCHITECTURE)
  param_dtype: DType = field("float32", "storage dtype of the embeddings, attention and dense FFN weights (norms, "
                                        "experts and routers stay float32); 'bfloat16' halves an imported model")

  def is_moe_layer(self, index: int) -> bool:
    return self.moe_every > 0 and index % self.moe_every == self.moe_every - 1

  @property
  def num_moe_layers(self) -> int:
    return sum(self.is_moe_layer(i) for i in range(self.num_layers))

  @property
  def moe_layer_indices(self) -> list[int]:
    return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def attn_head_dim(self) -> int:
    return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

  def validate(self) -> None:
    """Raises ConfigError naming the field and the fix."""
    check_section(self, "model")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}.")
    if self.attn_head_dim % 2:
      raise ConfigError(f"head dim {self.attn_head_dim} must be even for RoPE; change model.d_model, "
                        "model.num_heads or model.head_dim.")
    if self.num_heads % self.kv_heads:
      raise ConfigError(f"model.num_kv_heads={self.kv_heads} must divide model.num_heads={self.num_heads}.")

  @classmethod
  def from_dict(cls, values: Any) -> "ModelConfig":
    return from_mapping(cls, values, "model")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """One MoE block: its router (moe.router, from rectify_moe/routers), capacity, rectification and dispatch."""
  # The experts.
  num_experts: int = field(8, "E, experts per MoE layer", kind=ARCHITECTURE, min=1)
  expert_dim: int = field(256, "F, hidden width of each expert", kind=ARCHITECTURE, min=1)
  activation: Activation = field("swiglu", "'swiglu' (w_gate, w_up, w_down) or 'gelu' (w_up, w_down)",
                                 kind=ARCHITECTURE)
  router: str = field("top_k", "the router, a name of rectify_moe/routers: 'top_k' (learned softmax; vanilla and "
                               "Rectify variants), 'stablemoe', 'hash', 'expert_choice', 'base_layer'",
                      kind=ARCHITECTURE)
  router_init_std: float = field(0.02, "std of the normal init of the router kernel", min=0.0)
  # Top-k routing with capacity (routers 'top_k'; greedy top-1 for the others).
  top_k: int = field(1, "k, experts per token", kind=ROUTING, min=1)
  capacity_factor: float = field(1.0, "training capacity factor, k inside: C = ceil(S / E * cf * k)", kind=ROUTING,
                                 min=0.0, min_exclusive=True)
  eval_capacity_factor: Optional[float] = field(None, "capacity factor in evaluation (None = the training one)",
                                                kind=ROUTING, min=0.0, min_exclusive=True)
  min_capacity: int = field(0, "lower bound on C", kind=ROUTING, min=0)
  priority: Priority = field("position", "who gets a slot first: 'position' (k-major, sequence order), 'bpr' "
                                         "(k-major, by top-1 probability), 'token_major' (causal)", kind=ROUTING)
  combine: CombineMode = field("normalized", "combine weights: 'normalized' (g / sum of accepted g) or 'probs' "
                                             "(raw g)", kind=ROUTING)
  straight_through: bool = field(False, "top-1 straight-through combine (forward weight 1); needs K == 1",
                                 kind=ROUTING)
  load_balance_all_k: bool = field(False, "count all k choices in the load-balance loss (default: the first)")
  expert_bias_update_rate: float = field(
      0.0, "auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias on the selection scores, moved by "
           "rate * sign(mean load - load) after every step (0 = off)", kind=ARCHITECTURE, min=0.0)
  # Rectification (router 'top_k').
  fill_in: bool = field(False, "Fill-in Rectification: a (k+1)-th choice takes slots the top-k demand left empty",
                        kind=ROUTING)
  fill_in_priority: FillInPriority = field("same", "order of competing fill-in candidates: 'same' (official) or "
                                                   "'score'", kind=ROUTING)
  ir_mode: Optional[IRMode] = field(None, "Intra-device Rectification of tokens with: 'all' (no accepted choice), "
                                          "'any' (< K accepted), 'ignore_kth' (< K-1 accepted); None = off",
                                    kind=ROUTING)
  ir_capacity_factor: Optional[float] = field(
      None, "IR buffer per local expert: ceil(factor * S / L) slots (None = exact, S slots); tokens whose local "
            "expert holds one of their choices reuse it and take no slot", kind=ROUTING, min=0.0, min_exclusive=True)
  # Gating Dropout (router 'top_k', training only).
  gating_dropout: float = field(0.0, "Gating Dropout rate p: per step and layer, tokens stay on their device and "
                                     "the all-to-all is skipped", min=0.0, max=1.0, max_exclusive=True)
  gating_dropout_mode: GatingDropoutMode = field("gate_drop", "'gate_drop', or 'gate_expert_drop' (a dropped step "
                                                              "also skips the expert)")
  gating_dropout_weight: GatingDropoutWeight = field("one", "combine weight of the local expert on a dropped step: "
                                                            "'one' or 'prob'")
  # StableMoE (router 'stablemoe').
  stablemoe_switch_step: int = field(1000, "first step of StableMoE stage 2 (distilled router, frozen)", min=0)
  stablemoe_routing_dim: int = field(50, "width r of the distilled router's token embedding", kind=ARCHITECTURE,
                                     min=1)
  stablemoe_distill_weight: float = field(0.3, "weight of StableMoE's distillation loss", min=0.0)
  # Hash routing (router 'hash').
  hash_table: HashTableKind = field("random", "'random' (random balanced) or 'balanced' (frequency-balanced on the "
                                              "training data)")
  # Execution.
  group_size: int = field(256, "S, tokens per routing group (must divide the tokens of each device)", min=1)
  dispatch: Dispatch = field("einsum", "'einsum' (one-hot masks), 'index' (gathers both ways; faster on GPU) or "
                                      "'dropless' (every top-k choice computed, capacity factors ignored; no IR/FR)",
                             kind=ROUTING)
  dtype: DType = field("float32", "expert compute and all-to-all payload dtype; the router is float32")
  eps: float = field(1e-9, "floor of normalizers", min=0.0)

  @property
  def num_choices(self) -> int:
    """K: ranked choices per token."""
    return self.top_k + int(self.fill_in)

  def capacity(self, train: bool) -> int:
    """C for one group (training or evaluation capacity factor)."""
    cf = self.capacity_factor if train or self.eval_capacity_factor is None else self.eval_capacity_factor
    return routing.expert_capacity(self.group_size, self.num_experts, self.top_k, cf, self.min_capacity)

  def validate(self) -> None:
    """Raises ConfigError naming the field and the fix, before anything is compiled."""
    check_section(self, "moe")
    if self.top_k > self.num_experts:
      raise ConfigError(f"moe.top_k={self.top_k} must be in [1, num_experts={self.num_experts}].")
    if self.fill_in and self.top_k + 1 > self.num_experts:
      raise ConfigError(f"moe.fill_in needs top_k + 1 <= num_experts (top_k={self.top_k}, "
                        f"num_experts={self.num_experts}).")
    if self.ir_mode == "ignore_kth" and not self.fill_in and self.top_k == 1:
      raise ConfigError("moe.ir_mode='ignore_kth' with top-1 and no fill-in rectifies nothing (n_acc < 0); use 'all'.")
    if self.straight_through and self.num_choices != 1:
      raise ConfigError(f"moe.straight_through needs top-1 without fill-in (K=1), got K={self.num_choices}; set it "
                        "False.")
    routers.validate(self)
    dropless.validate(self)
    try:
      self.capacity(True), self.capacity(False)
    except ValueError as e:
      raise ConfigError(str(e)) from None

  @classmethod
  def from_dict(cls, values: Any) -> "MoEConfig":
    return from_mapping(cls, values, "moe")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training run: steps, batches, optimizer, losses, logging and checkpoints."""
  steps: int = field(300, "optimizer steps of the run (also the length of the cosine schedule)", min=1)
  batch_size: int = field(16, "sequences per step over all devices and processes", min=1)
  seq_len: int = field(128, "tokens per sequence", min=1)
  learning_rate: float = field(3e-3, "peak AdamW learning rate", min=0.0)
  warmup_steps: int = field(30, "linear warm-up steps", min=0)
  end_lr_factor: float = field(0.1, "final learning rate = factor x peak (cosine decay)", min=0.0)
  weight_decay: float = field(0.1, "AdamW weight decay", min=0.0)
  grad_clip: float = field(1.0, "global-norm gradient clipping", min=0.0, min_exclusive=True)
  b1: float = field(0.9, "Adam beta1", min=0.0, max=1.0)
  b2: float = field(0.95, "Adam beta2", min=0.0, max=1.0)
  aux_loss_weight: float = field(0.01, "weight of the summed load-balance losses (StableMoE: its balance loss alpha)",
                                 min=0.0)
  z_loss_weight: float = field(0.0, "weight of the summed router z-losses", min=0.0)
  log_every: int = field(25, "steps between progress lines / metrics.jsonl rows", min=1)
  eval_every: int = field(100, "steps between held-out evaluations (0 = none, not even at the end)", min=0)
  eval_batches: int = field(8, "held-out batches per evaluation", min=1)
  eval_batch_size: int = field(16, "sequences per eval batch (all processes)", min=1)
  checkpoint_every: int = field(100, "steps between checkpoints (a final one and one on SIGTERM/SIGINT are always "
                                     "written)", min=1)
  keep_checkpoints: int = field(3, "checkpoints kept", min=1)
  write_loads: bool = field(True, "write per-step expert loads to workdir/loads/loads.jsonl")
  stop_at_step: int = field(0, "stop with a checkpoint after this step without changing the schedule (0 = off)",
                            min=0)
  distributed: Distributed = field("auto", "jax.distributed.initialize() for multi-host runs: 'auto' (when a "
                                           "launcher is detected), 'on', 'off'")
  num_processes: int = field(0, "processes of a multi-process run (0 = JAX_NUM_PROCESSES or cluster detection)",
                             min=0)
  process_id: int = field(-1, "this process's index (-1 = JAX_PROCESS_ID or cluster detection)", min=-1)

  # Older spellings of a value that `from_mapping` maps to the current one.
  ALIASES = {"distributed": {True: "on", False: "off", "true": "on", "false": "off", "True": "on", "False": "off"}}


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A whole run: the sections above and the seed."""
  seed: int = field(0, "parameter init and per-step RNG (Gating Dropout)")
  init_from: str = field("", "upcycle a dense run: its workdir (latest checkpoint) or one checkpoint step folder, or "
                             "'hf:DIR', a local Hugging Face Llama-family folder (a dense run starts from it); "
                             "every expert starts as a copy of its layer's dense FFN (used when the workdir has no "
                             "checkpoint yet; '' = random init)")
  init_noise: float = field(0.0, "std of Gaussian noise added to each upcycled expert copy, relative to the std of "
                                 "the dense weight it copies (0 = exact copies)", min=0.0)
  mesh: MeshConfig = field(MeshConfig(), "the device mesh")
  data: DataConfig = field(DataConfig(), "the data")
  model: ModelConfig = field(ModelConfig(), "the model")
  moe: MoEConfig = field(MoEConfig(), "the MoE layers")
  train: TrainConfig = field(TrainConfig(), "the training run")


SECTIONS = {"mesh": MeshConfig, "data": DataConfig, "model": ModelConfig, "moe": MoEConfig, "train": TrainConfig}


def check_section(section: Any, path: str) -> None:
  """Type, choice and range checks of an already-built section (e.g. one made with keyword arguments)."""
  from_mapping(type(section), {f.name: getattr(section, f.name) for f in fields_of(section)}, path)


def default_config() -> ml_collections.ConfigDict:
  """The ConfigDict with every field of every section at its default: where every configs/*.py starts."""
  return to_config_dict(RunConfig())


def resolve(config: Any) -> tuple[RunConfig, list[str]]:
  """The config as a run uses it: `parse(config)` with the MoE options its router cannot use turned off (a greedy
  router takes no top-k, rectification, Gating Dropout or expert bias), and a 'moe.field=value' list of them."""
  cfg = parse(config)
  if cfg.init_from.startswith("hf:"):  # the architecture (and tokenizer) of a Hugging Face folder
    from rectify_moe.hf import config as hf_config  # pylint: disable=import-outside-toplevel (it imports schema)
    cfg = hf_config.apply(cfg)
  if not cfg.model.num_moe_layers:
    return cfg, []
  moe_cfg, unused = routers.applicable(cfg.moe)
  return dataclasses.replace(cfg, moe=moe_cfg), unused


def parse(config: Any) -> RunConfig:
  """The typed run config from a ConfigDict / mapping (missing fields take their defaults).

  Raises:
    ConfigError: one line naming the first unknown field (and the closest valid name) or bad value.
  """
  if isinstance(config, RunConfig):
    return config
  return from_mapping(RunConfig, config)
