"""Load-trace reading, fluctuation statistics, the stable-state detector, the three predictors and the CLI."""

import json
import os

import numpy as np
import pytest

from rectify_moe import load_prediction as lp
from rectify_moe import train_lib
import train_helpers


def _write_trace(workdir, records, *, raw_lines=()):
  """records: (step, demand [L][E], accepted [L][E] or None); raw_lines are appended verbatim."""
  os.makedirs(os.path.join(workdir, "loads"), exist_ok=True)
  with open(os.path.join(workdir, "loads", "loads.jsonl"), "w") as f:
    for step, demand, accepted in records:
      demand = np.asarray(demand, dtype=float)
      accepted = demand if accepted is None else np.asarray(accepted, dtype=float)
      f.write(json.dumps({"step": step, "demand": demand.tolist(), "accepted": accepted.tolist()}) + "\n")
    for line in raw_lines:
      f.write(line + "\n")
  return workdir


def _softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def _mae(result, name, h):
  return result["predictors"][name]["horizons"][str(h)]["mae_pp"]["overall"]


# ---------------------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------------------
def test_duplicate_steps_last_line_wins_and_steps_are_sorted(tmp_path):
  run = _write_trace(str(tmp_path / "run"), [
      (1, [[1, 3]], [[2, 2]]), (3, [[5, 5]], None), (2, [[1, 1]], None),  # out of order
      (2, [[9, 1]], [[4, 0]]),  # a resumed run re-wrote step 2: this line wins
      (4, [[0, 0]], None)])
  trace = lp.read_traces(run)
  np.testing.assert_array_equal(trace.steps, [1, 2, 3, 4])
  np.testing.assert_array_equal(trace.loads[:, 0], [[1, 3], [9, 1], [5, 5], [0, 0]])
  assert trace.duplicates == 1 and trace.loads.shape == (4, 1, 2)
  np.testing.assert_array_equal(lp.read_traces(run, "accepted").loads[1, 0], [4, 0])
  props = trace.proportions()
  np.testing.assert_allclose(props[:, 0], [[0.25, 0.75], [0.9, 0.1], [0.5, 0.5], [0.5, 0.5]])  # no load: uniform


def test_missing_and_empty_traces_give_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    lp.read_traces(str(tmp_path / "nope"))
  (tmp_path / "run").mkdir()
  with pytest.raises(FileNotFoundError, match=r"loads\.jsonl.*write_loads=True"):
    lp.read_traces(str(tmp_path / "run"))
  (tmp_path / "run" / "loads").mkdir()
  (tmp_path / "run" / "loads" / "loads.jsonl").write_text("\n  \n")
  with pytest.raises(ValueError, match="empty"):
    lp.read_traces(str(tmp_path / "run"))
  with pytest.raises(ValueError, match="kind"):
    lp.read_traces(str(tmp_path / "run"), kind="tokens")
  (tmp_path / "run2").mkdir()
  with pytest.raises(SystemExit, match="write_loads"):  # the CLI says the same, without a traceback
    lp.main(["--workdir", str(tmp_path / "run2"), "--no-plots"])


def test_inconsistent_shapes_and_truncated_last_line(tmp_path):
  run = _write_trace(str(tmp_path / "a"), [(1, [[1, 2, 3]], None), (2, [[1, 2]], None)])
  with pytest.raises(ValueError, match=r"line 2.*\(1, 2\).*\(1, 3\)"):
    lp.read_traces(run)
  run = _write_trace(str(tmp_path / "b"), [(1, [[1, 2]], None), (2, [[3, 4]], None)], raw_lines=['{"step": 3, "dem'])
  with pytest.warns(UserWarning, match="truncated"):
    trace = lp.read_traces(run)
  assert trace.steps.tolist() == [1, 2] and trace.skipped_lines == 1
  run = _write_trace(str(tmp_path / "c"), [(1, [[1, 2]], None)], raw_lines=["not json", '{"step": 3}'])
  with pytest.raises(ValueError, match="line 2: not valid JSON"):
    lp.read_traces(run)


# ---------------------------------------------------------------------------------------------------------
# Statistics and the detector.
# ---------------------------------------------------------------------------------------------------------
def test_windowed_stats_match_brute_force_and_long_windows_are_skipped():
  x = np.random.default_rng(0).random((30, 2, 3))
  st = lp.windowed_stats(x, 7, chunk_elements=5)  # tiny chunks exercise the blocking
  for k, end in enumerate(st["end"]):
    win = x[end - 6:end + 1]
    np.testing.assert_allclose(st["variance"][k], win.var(axis=0))
    np.testing.assert_allclose(st["range"][k], win.max(axis=0) - win.min(axis=0))
  assert st["variance"].shape == (24, 2, 3)
  assert lp.window_sizes(150) == [10, 100] and lp.window_sizes(60) == [10] and lp.window_sizes(5) == []


def test_detector_finds_planted_transition_within_one_window():
  rng = np.random.default_rng(1)
  T, E, window = 400, 4, 10
  starts = (150, 250)  # layer 0 settles at row 150, layer 1 at row 250
  logits = np.zeros((T, 2, E))
  for l, s in enumerate(starts):
    logits[:s, l] = rng.normal(0, 1.0, (s, E))  # transient: proportions jump by ~15 pp per step
    logits[s:, l] = rng.normal(0, 0.01, (T - s, E))  # stable: ~0.25 pp noise
  props = _softmax(logits)
  steps = np.arange(T) + 1  # training steps start at 1
  st = lp.detect_stable_state(props, steps, window=window)
  assert st.std_threshold == pytest.approx(0.2 / E)
  for l, s in enumerate(starts):
    assert abs(st.per_layer_step[l] - steps[s]) <= window, (st.per_layer_step, starts)
  assert st.stable_step == st.per_layer_step[1]  # the run is stable once its slowest layer is
  noisy = _softmax(rng.normal(0, 1.0, (T, 1, E)))
  assert lp.detect_stable_state(noisy, window=window).stable_step is None


def test_horizon_scaling_and_eval_points():
  assert lp.scale_horizons(60, (1000, 2000))[0] == [8, 15]
  assert lp.scale_horizons(10_000, (1000, 2000)) == ([1000, 2000], "horizons as requested")
  pts = lp.default_eval_points(60, [8, 15], max_points=10)
  assert pts[0] == 15 and pts[-1] == 52 and len(pts) == 10


# ---------------------------------------------------------------------------------------------------------
# Predictors.
# ---------------------------------------------------------------------------------------------------------
def test_constant_loads_give_zero_error_for_every_predictor():
  T = 80
  props = np.broadcast_to(np.array([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]), (T, 2, 4)).copy()
  other_run = _softmax(np.cumsum(np.random.default_rng(2).normal(0, 0.2, (200, 2, 4)), axis=0))
  lstm = lp.LSTMPredictor(window=8, hidden=8, train_steps=30).train([other_run])  # trained on a moving run
  predictors = {"sw": lp.SlidingWindowAverage(10), "arima": lp.ARIMAPredictor(), "lstm": lstm}
  result = lp.evaluate_predictors(props, predictors, [5, 20], max_points=4)
  for name in predictors:
    for h in (5, 20):
      r = result["predictors"][name]["horizons"][str(h)]
      assert r["mae_pp"]["overall"] < 1e-9 and r["rel_err_pct"]["overall"] < 1e-9, (name, h, r)
  assert result["predictors"]["arima"]["notes"]["constant"] == 4 * 2 * 4  # exact constants, no fit


def test_random_walk_favours_a_short_window():
  rng = np.random.default_rng(3)
  props = _softmax(np.cumsum(rng.normal(0, 0.15, (600, 1, 5)), axis=0))
  predictors = {"short": lp.SlidingWindowAverage(3), "long": lp.SlidingWindowAverage(300)}
  result = lp.evaluate_predictors(props, predictors, [10], min_history=300, max_points=20)
  assert _mae(result, "short", 10) < 0.6 * _mae(result, "long", 10)
  # Rolled forward, a window average stays a probability vector.
  pred = lp.SlidingWindowAverage(4).fit(props[:50, 0]).predict(7)
  assert pred.shape == (7, 5)
  np.testing.assert_allclose(pred.sum(axis=1), 1.0)


def test_ar2_series_is_predicted_better_by_arima_than_by_a_long_average():
  rng = np.random.default_rng(4)
  T = 300
  a = np.zeros(T)
  for t in range(2, T):  # stationary AR(2) (roots of modulus 0.95), oscillating with a period of ~20 steps
    a[t] = 1.8 * a[t - 1] - 0.9 * a[t - 2] + rng.normal(0, 0.005)
  props = np.stack([0.5 + a, 0.5 - a], axis=-1)[:, None, :]
  assert props.min() > 0
  predictors = {"arima": lp.ARIMAPredictor((2, 0, 0)), "long": lp.SlidingWindowAverage(200)}
  result = lp.evaluate_predictors(props, predictors, [1, 3], eval_points=list(range(215, 296, 10)))
  for h in (1, 3):
    assert _mae(result, "arima", h) < 0.5 * _mae(result, "long", h)
  assert result["predictors"]["arima"]["notes"]["fitted"] == 9 * 2


def test_arima_falls_back_on_a_short_series_and_says_so():
  history = _softmax(np.random.default_rng(5).normal(0, 0.3, (12, 3)))
  arima = lp.ARIMAPredictor()  # (5, 1, 5) needs 32 steps
  pred = arima.fit(history).predict(4)
  np.testing.assert_allclose(pred, np.repeat(history[-1:], 4, axis=0))
  assert arima.notes()["too_short"] == 3 and arima.notes()["fitted"] == 0


def test_lstm_trained_on_one_run_beats_the_last_value_on_another():
  def run(seed):  # mean-reverting proportions: AR(1) logits with phi = 0.3 around a fixed skew
    rng = np.random.default_rng(seed)
    z = np.zeros((400, 2, 4))
    for t in range(1, 400):
      z[t] = 0.3 * z[t - 1] + rng.normal(0, 0.3, (2, 4))
    return _softmax(z + np.array([0.0, 0.3, 0.6, 0.9]))

  lstm = lp.LSTMPredictor(window=16, hidden=16, train_steps=200).train([run(10)])
  result = lp.evaluate_predictors(run(11), {"lstm": lstm, "last": lp.SlidingWindowAverage(1)}, [1],
                                  min_history=100, max_points=60)
  assert _mae(result, "lstm", 1) < 0.85 * _mae(result, "last", 1)


# ---------------------------------------------------------------------------------------------------------
# The CLI on a tiny real training run.
# ---------------------------------------------------------------------------------------------------------
def test_cli_on_a_tiny_training_run_writes_json_table_and_plots(tmp_path, capsys):
  config = train_helpers.tiny_config(tmp_path, steps=24)
  run = str(tmp_path / "run")
  train_lib.train_and_evaluate(config, run)
  capsys.readouterr()
  results = lp.main(["--workdir", run, "--arima-order", "1,1,1", "--lstm-steps", "20", "--lstm-window", "8",
                     "--max-points", "4"])
  out = os.path.join(run, "load_prediction")
  printed = capsys.readouterr().out
  assert "| predictor | H |" in printed and "[arima(1,1,1)] layer 1/1, point 4/4" in printed
  with open(os.path.join(out, "results.json")) as f:
    saved = json.load(f)
  assert saved["trace"]["num_steps"] == 24 and saved["trace"]["num_layers"] == 1
  assert saved["evaluation"]["horizons"] == [3, 6]  # 1000, 2000 scaled to at most a quarter of 24 steps
  assert set(saved["evaluation"]["predictors"]) == {"sw_avg(W=1)", "sw_avg(W=10)", "sw_avg(W=100)", "arima(1,1,1)",
                                                    "lstm"}
  for entry in saved["evaluation"]["predictors"].values():
    assert 0 <= entry["horizons"]["3"]["mae_pp"]["overall"] < 100
  assert saved["stability"]["std_threshold"] == pytest.approx(0.2 / 8)
  with open(os.path.join(out, "results.md")) as f:
    assert "| lstm | 6 |" in f.read()
  for name in ("proportions.png", "variability.png", "errors_H3.png", "errors_H6.png"):
    with open(os.path.join(out, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert results["out_dir"] == out
