"""Multi-process training: 2 processes x 4 CPU devices on 127.0.0.1 against 1 process x 8 devices.

Three launches (the slow part): a 6-step run with checkpoints at 3 and 6; its resume from step 3 where process 1
alone gets SIGTERM at step 5; a run where process 1 raises. In this process (8 fake devices): the same 6 steps,
and the 2-process checkpoint of step 5 resumed on one process.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import train_helpers
from rectify_moe import launch, train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(REPO, "tests", "multihost_child.py")
TIMEOUT_S = 240

pytestmark = pytest.mark.slow


def _losses(workdir, kind="train"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if r["kind"] == kind}


def _config_file(tmp_path, config):
  """A config .py that returns `config` (the exact in-process test config, for train.py --config)."""
  values = tmp_path / "config.json"
  values.write_text(config.to_json())
  path = tmp_path / "test_config.py"
  path.write_text("import json\nimport ml_collections\n\n\ndef get_config():\n"
                  f"  return ml_collections.ConfigDict(json.load(open({str(values)!r})))\n")
  return str(path)


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(extra)
  return env


def _launch(args, *, env=None):
  """python -m rectify_moe.launch --processes=2 --devices_per_process=4 -- CHILD ARGS; (rc, output)."""
  command = [sys.executable, "-m", "rectify_moe.launch", "--processes=2", "--devices_per_process=4", "--",
             CHILD, *args]
  proc = subprocess.Popen(command, cwd=REPO, env=_env(**(env or {})), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher's session: the launcher only (children have their own)
    out, _ = proc.communicate()
    _kill_children(out)
    pytest.fail(f"launch timed out after {TIMEOUT_S}s:\n{out[-3000:]}")
  return proc.returncode, out


def _kill_children(out):
  for line in out.splitlines():
    if line.startswith("[launch] 2 processes (pids "):
      for pid in line.split("(pids ")[1].split(")")[0].split(", "):
        try:
          os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
          pass


def test_two_processes_equal_one_resume_stop_and_failure(tmp_path):
  config = train_helpers.tiny_config(tmp_path, mesh=(2, 4), steps=6)
  config.train.update(dict(log_every=1, checkpoint_every=3, eval_every=6))
  config_py = _config_file(tmp_path, config)
  run2 = str(tmp_path / "two")

  # 1. Two processes, 6 steps (checkpoints 3 and 6): the losses and the eval of one process with 8 devices.
  rc, out = _launch([f"--config={config_py}", f"--workdir={run2}"])
  assert rc == 0, out[-3000:]
  run1 = str(tmp_path / "one")
  train_lib.train_and_evaluate(config, run1)
  two, one = _losses(run2), _losses(run1)
  with open(os.path.join(run2, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 7))  # written once (process 0)
  for step in one:
    assert two[step] == pytest.approx(one[step], abs=1e-5), step
  assert _losses(run2, "eval")[6] == pytest.approx(_losses(run1, "eval")[6], abs=1e-5)

  # 2. Resume the 2-process run from step 3; process 1 alone gets SIGTERM at step 5: both stop there and exit 0.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(run2, resumed, ignore=shutil.ignore_patterns("6", "metrics.jsonl", "train.lock"))
  rc, out = _launch([f"--config={config_py}", f"--workdir={resumed}"],
                    env=dict(TEST_FAULT="sigterm@2", TEST_FAULT_PROCESS="1"))
  assert rc == 0, out[-3000:]
  assert "[p0] Process 0: stopped with the others at step 5." in out, out[-3000:]
  assert "[p1] Process 1: stopped with the others at step 5." in out, out[-3000:]
  assert sorted(int(s) for s in os.listdir(os.path.join(resumed, "checkpoints"))) == [3, 5]
  assert _losses(resumed) == {4: two[4], 5: two[5]}  # exact

  # 3. One process restores the 2-process checkpoint of step 5 and continues the same data.
  config.train.update(dict(eval_every=1000))
  train_lib.train_and_evaluate(config, resumed)
  assert _losses(resumed)[6] == pytest.approx(two[6], abs=1e-5)

  # 4. An exception in process 1 ends both within 60 s (no launcher: the job's own failure watch).
  port = launch.free_port()
  args = [sys.executable, CHILD, f"--config={config_py}", f"--workdir={tmp_path / 'fail'}",
          "--config.train.steps=1000"]
  logs = [open(tmp_path / f"fail{i}.log", "w+") for i in range(2)]
  procs = [subprocess.Popen(args, cwd=REPO, stdout=logs[i], stderr=subprocess.STDOUT, text=True,
                            env=launch.process_env(_env(TEST_FAULT="raise@2"), index=i, count=2, port=port,
                                                   devices=4))
           for i in range(2)]
  ended = [None, None]
  try:
    deadline = time.time() + TIMEOUT_S
    while None in ended and time.time() < deadline:
      for i, proc in enumerate(procs):
        if ended[i] is None and proc.poll() is not None:
          ended[i] = time.time()
      time.sleep(0.2)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  assert None not in ended, outputs
  assert all(p.returncode != 0 for p in procs), outputs
  assert "injected failure" in outputs[1], outputs[1][-3000:]
  assert "ending the job: process 1 failed: RuntimeError: injected failure" in outputs[0], outputs[0][-3000:]
  assert ended[0] - ended[1] < 60, ended
