"""Expert-load analysis and prediction from training traces (Cong et al. 2024, "Prediction Is All MoE Needs").

Reads the per-step expert loads that training writes (`WORKDIR/loads/loads.jsonl`, `train.write_loads=True`),
turns them into load proportions, measures how much they fluctuate (windowed variance and range), detects
where the transient state ends, and scores three predictors of future proportions:

- `SlidingWindowAverage` (the paper's SW_Avg): the mean of the last W proportions, rolled forward.
- `ARIMAPredictor`: statsmodels ARIMA per expert series, default order (5, 1, 5), with stated fallbacks.
- `LSTMPredictor`: a small Flax NNX LSTM trained on one run's traces and tested on another.

All predictors share one interface: `fit(history[t, E])` (the proportions of one MoE layer, one row per step)
then `predict(horizon) -> [horizon, E]` (rows are proportions: non-negative, summing to 1). Multi-step
horizons are produced by rolling forward (each prediction is appended to the history for the next one).

`evaluate_predictors` is the harness: at evaluation points t it fits on the history before t, predicts the
next H steps and reports the mean absolute error in percentage points of proportion (`mae_pp`) and the mean
relative error in percent (`rel_err_pct`), per layer and overall, plus the error curve over t.

CLI (writes JSON, a markdown table and PNG plots under RUN/load_prediction/):
  python -m rectify_moe.load_prediction --workdir RUN [--horizon H] [--train-workdir OTHER_RUN] [--out DIR]

It reads only the trace files, so it works for runs of any router. See docs/load_prediction.md.

Modules: `traces` (reading loads.jsonl and config.json), `statistics` (proportions, windowed statistics, the
stable-state detector), `predictors` (the interface, sliding window, ARIMA), `lstm` (the LSTM predictor),
`evaluate` (horizons, evaluation points, errors, the harness), `report` (JSON, markdown, plots) and `cli`
(`analyze` and the command line). Every public name is re-exported here.
"""

from rectify_moe.load_prediction.cli import analyze, build_parser, default_predictors, main
from rectify_moe.load_prediction.evaluate import (DEFAULT_HORIZONS, default_eval_points, evaluate_predictors,
                                                  scale_horizons)
from rectify_moe.load_prediction.lstm import LSTMPredictor
from rectify_moe.load_prediction.predictors import ARIMAPredictor, Predictor, SlidingWindowAverage
from rectify_moe.load_prediction.report import markdown_report, write_plots
from rectify_moe.load_prediction.statistics import (DEFAULT_STABLE_THRESHOLD_FRACTION, DEFAULT_STABLE_WINDOW,
                                                    DEFAULT_WINDOWS, StableState, detect_stable_state,
                                                    load_proportions, variability_summary, window_sizes,
                                                    windowed_stats)
from rectify_moe.load_prediction.traces import KINDS, LoadTrace, read_run_config, read_traces, trace_path

__all__ = [
    # traces
    "KINDS", "LoadTrace", "read_run_config", "read_traces", "trace_path",
    # statistics
    "DEFAULT_STABLE_THRESHOLD_FRACTION", "DEFAULT_STABLE_WINDOW", "DEFAULT_WINDOWS", "StableState",
    "detect_stable_state", "load_proportions", "variability_summary", "window_sizes", "windowed_stats",
    # predictors
    "ARIMAPredictor", "LSTMPredictor", "Predictor", "SlidingWindowAverage",
    # evaluation
    "DEFAULT_HORIZONS", "default_eval_points", "evaluate_predictors", "scale_horizons",
    # reports
    "markdown_report", "write_plots",
    # the analysis and the CLI
    "analyze", "build_parser", "default_predictors", "main",
]
