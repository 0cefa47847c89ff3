"""The study config: one typed schema (like the run config's sections), built by `configs/studies/*.py`.

A study = a dense pretraining run shared by every run, then every (variant, capacity factor, seed) continued from
it (upcycled), each evaluated on the held-out split. `run` is the template of every run (model, data, MoE layers,
training, mesh); the other fields say what varies and how long each phase trains.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from rectify_moe import variants
from rectify_moe.config import fields, schema
from rectify_moe.config.fields import ConfigError, field


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """What a study runs (see `rectify_moe/study/__main__.py`)."""
  run: schema.RunConfig = field(schema.RunConfig(), "the template of every run: model, data, MoE layers, training, "
                                                    "mesh (the dense run sets model.moe_every=0)")
  devices: int = field(8, "fake CPU devices the study sets up before JAX starts (on CPU only; 0 = leave as is)",
                       min=0)
  variants: str = field("top1,top1_ir,top1_fr,top1_ir_fr,top2,top2_ir,top2_fr,top2_ir_fr",
                        "comma-separated router variants (names of rectify_moe/variants.py)")
  no_lb_variants: str = field("", "variants also run with train.aux_loss_weight=0 (named 'NAME/noLB'; the paper's "
                                  "appendix: does rectification help without the load-balance loss?)")
  capacity_factors: str = field("0.5,1.0,1.5", "comma-separated capacity factors (training and evaluation)")
  seeds: int = field(3, "seeds 0..N-1 of every run (router init and data order); the dense run uses run.seed",
                     min=1)
  dense_from: str = field("", "'hf:DIR': start from a local Hugging Face model (rectify_moe/hf) instead of "
                              "pretraining one: every run takes DIR's architecture and tokenizer and upcycles it "
                              "(dense_steps and dense_learning_rate are then unused)")
  dense_steps: int = field(600, "optimizer steps of the dense pretraining", min=1)
  dense_learning_rate: float = field(3e-3, "peak learning rate of the dense pretraining", min=0.0)
  steps: int = field(100, "optimizer steps of each continued (upcycled) run", min=1)
  learning_rate: float = field(1e-3, "peak learning rate of the continued runs", min=0.0)
  warmup_steps: int = field(10, "warm-up steps of the continued runs", min=0)
  init_noise: float = field(0.0, "noise on the expert copies (relative std; see rectify_moe/upcycle.py)", min=0.0)
  from_scratch: bool = field(False, "train the variants from random init instead of upcycling (for contrast)")
  scratch_steps: int = field(0, "steps of a from-scratch run (0 = dense_steps + steps: the same optimizer steps "
                                "as dense pretraining plus continued training)", min=0)
  eval_batch_size: int = field(64, "sequences per held-out batch", min=1)
  eval_batches: int = field(0, "held-out batches per evaluation (0 = the whole held-out split)", min=0)
  ablate_moe: bool = field(True, "also evaluate each vanilla run with the MoE layers' output zeroed (do the "
                                 "experts carry weight?)")

  def variant_names(self) -> list[str]:
    return _names(self.variants, "variants")

  def no_lb_names(self) -> list[str]:
    return _names(self.no_lb_variants, "no_lb_variants") if self.no_lb_variants.strip() else []

  def capacity_factor_values(self) -> list[float]:
    try:
      values = [float(v) for v in self.capacity_factors.split(",") if v.strip()]
    except ValueError:
      raise ConfigError(f"study.capacity_factors={self.capacity_factors!r}: give numbers, e.g. '0.5,1.0,1.5'.") \
          from None
    if not values or any(not v > 0 for v in values):
      raise ConfigError(f"study.capacity_factors={self.capacity_factors!r}: give positive numbers, e.g. "
                        "'0.5,1.0,1.5'.")
    return values

  def validate(self) -> None:
    """Everything that can be checked before JAX starts; one-line ConfigError."""
    self.variant_names(), self.no_lb_names(), self.capacity_factor_values()
    if self.dense_from and not self.dense_from.startswith("hf:"):
      raise ConfigError(f"study.dense_from={self.dense_from!r}: give 'hf:DIR', a local Hugging Face folder.")
    if self.run.model.moe_every < 1:
      raise ConfigError("study.run.model.moe_every must be >= 1 (the MoE runs); the dense run sets it to 0 itself.")
    for name in self.no_lb_names():
      if name not in self.variant_names():
        raise ConfigError(f"study.no_lb_variants names {name!r}, which is not in study.variants; add it there.")
    for base in {vanilla_of(name) for name in self.variant_names()}:
      if base not in self.variant_names():
        raise ConfigError(f"study.variants has no {base!r}, the vanilla router its variants are compared with; add "
                          "it.")


def _names(text: str, field_name: str) -> list[str]:
  names = [v.strip() for v in text.split(",") if v.strip()]
  if not names:
    raise ConfigError(f"study.{field_name} is empty; name variants of rectify_moe/variants.py, e.g. 'top1,top1_ir'.")
  for name in names:
    if name not in variants.VARIANTS:
      raise ConfigError(f"study.{field_name}: unknown variant {name!r}.{fields.closest(name, variants.VARIANTS)} "
                        f"Known: {', '.join(variants.VARIANTS)}.")
  if len(set(names)) != len(names):
    raise ConfigError(f"study.{field_name} names a variant twice: {text!r}.")
  return names


def vanilla_of(name: str) -> str:
  """The vanilla router a variant is compared with: the paper variant 'topK' of the same k."""
  return f"top{variants.overrides(name).get('top_k', 1)}"


def default_study() -> ml_collections.ConfigDict:
  """The ConfigDict of a study with every field at its default (where `configs/studies/*.py` start)."""
  return fields.to_config_dict(StudyConfig())


def parse(config: Any) -> StudyConfig:
  return fields.from_mapping(StudyConfig, config, "study")
