"""train.py as one process of a multi-process test, with an optional fault injected into one process.

  TEST_FAULT=sigterm@3 or raise@3   at the 3rd training batch of this run (counted from the start or the resume)
  TEST_FAULT_PROCESS=1              the process that gets it (default 1)
"""

import os
import runpy
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rectify_moe import train_lib  # noqa: E402


def _inject(kind: str, at: int) -> None:
  original, calls = train_lib.global_batch, [0]

  def global_batch(local, mesh):
    calls[0] += 1
    if calls[0] == at:
      if kind == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
      else:
        raise RuntimeError("injected failure")
    return original(local, mesh)

  train_lib.global_batch = global_batch


fault = os.environ.get("TEST_FAULT")
if fault and os.environ.get("JAX_PROCESS_ID") == os.environ.get("TEST_FAULT_PROCESS", "1"):
  kind, at = fault.split("@")
  _inject(kind, int(at))

os.chdir(REPO)
sys.argv = [os.path.join(REPO, "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
