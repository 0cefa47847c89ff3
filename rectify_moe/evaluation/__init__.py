"""Evaluation: the held-out evaluator shared with training (`evaluator`), test-time router swaps (`swaps`), reports
(`report`) and the checkpoint evaluation behind eval.py (`run`)."""

from rectify_moe.evaluation.evaluator import Evaluator, eval_sums, global_batch, summarize
from rectify_moe.evaluation.report import comparison_table, layer_table, markdown_report, write_outputs
from rectify_moe.evaluation.run import (check_architecture, evaluate_checkpoint, load_run_config,
                                        parse_factors, parse_mesh, resolve_eval_mesh, restore_model, run_main)
from rectify_moe.evaluation.swaps import (ALL_PRESETS, ARCHITECTURE_FIELDS, ROUTING_FIELDS, EvalError, RouterSpec,
                                          eval_capacity_factor, parse_swap, preset_overrides, router_specs)

__all__ = ["ALL_PRESETS", "ARCHITECTURE_FIELDS", "ROUTING_FIELDS", "EvalError", "Evaluator", "RouterSpec",
           "check_architecture", "comparison_table", "eval_capacity_factor", "eval_sums",
           "evaluate_checkpoint", "global_batch", "layer_table", "load_run_config", "markdown_report", "parse_factors",
           "parse_mesh", "parse_swap", "preset_overrides", "resolve_eval_mesh", "restore_model", "router_specs",
           "run_main", "summarize", "write_outputs"]
