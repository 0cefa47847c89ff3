"""Run a multi-process (multi-host) job on one machine: N processes of a script, the coordinator on 127.0.0.1.

  python -m rectify_moe.launch --processes=2 --devices_per_process=4 -- train.py --config=configs/default.py \
      --workdir=runs/two_hosts
  python -m rectify_moe.launch --processes=2 --devices_per_process=4 -- eval.py --workdir=runs/two_hosts

Each process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:<a free port>, JAX_NUM_PROCESSES, JAX_PROCESS_ID and (with
--devices_per_process) that many CPU devices. Their output is prefixed with `[p<id>]`. When one process fails, the
others are ended (SIGTERM, then SIGKILL after --grace_s) and the launcher exits with the failing code; SIGTERM /
SIGINT to the launcher are passed on to every process (the run saves a checkpoint and exits 0).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Optional


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict, *, index: int, count: int, port: int, devices: Optional[int]) -> dict:
  env = dict(base, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count),
             JAX_PROCESS_ID=str(index), PYTHONUNBUFFERED="1")
  if devices:
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
    env.pop("XLA_FLAGS", None)  # a --xla_force_host_platform_device_count there would override the count
  return env


def command_of(args: Sequence[str]) -> list[str]:
  """`train.py ARGS` -> [python, train.py, ARGS]; any other command is run as given."""
  args = list(args)
  if args and args[0] == "--":
    args = args[1:]
  if not args:
    raise SystemExit("error: give the command after --, e.g. -- train.py --workdir=runs/x")
  return [sys.executable, *args] if args[0].endswith(".py") else args


def _pump(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(f"{prefix}{line}")
    out.flush()
  stream.close()


def _end(procs: list[subprocess.Popen], grace_s: float) -> None:
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.time() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.time(), 0.1))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def launch(command: Sequence[str], *, processes: int, devices_per_process: Optional[int] = None,
           port: Optional[int] = None, grace_s: float = 10.0, out=None) -> int:
  """Runs `command` as `processes` processes; returns 0 when all exit 0, else the first failing exit code."""
  out = out or sys.stdout
  port = port or free_port()
  procs, pumps = [], []
  for index in range(processes):
    env = process_env(os.environ, index=index, count=processes, port=port, devices=devices_per_process)
    proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # signals reach them through the launcher only
    procs.append(proc)
    pump = threading.Thread(target=_pump, args=(proc.stdout, f"[p{index}] ", out), daemon=True)
    pump.start()
    pumps.append(pump)
  out.write(f"[launch] {processes} processes (pids {', '.join(str(p.pid) for p in procs)}), coordinator "
            f"127.0.0.1:{port}\n")
  out.flush()

  def forward(signum, frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
  code = 0
  try:
    while any(p.poll() is None for p in procs):
      failed = [p for p in procs if p.poll() not in (None, 0)]
      if failed:
        code = failed[0].returncode
        out.write(f"[launch] process {procs.index(failed[0])} exited with code {code}; ending the others.\n")
        out.flush()
        _end(procs, grace_s)
        break
      time.sleep(0.2)
    codes = [p.wait() for p in procs]
    code = code or next((c for c in codes if c != 0), 0)
  finally:
    _end(procs, grace_s)
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    for pump in pumps:
      pump.join(timeout=5)
  return code


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  split = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(prog="python -m rectify_moe.launch", description=__doc__.split("\n")[0])
  parser.add_argument("--processes", type=int, default=2, help="number of processes")
  parser.add_argument("--devices_per_process", type=int, default=None,
                      help="CPU devices per process (sets JAX_PLATFORMS=cpu); default: the machine's accelerators")
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  parser.add_argument("--grace_s", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
  options = parser.parse_args(argv[:split])
  if options.processes < 1:
    parser.error(f"--processes={options.processes} must be >= 1")
  if options.devices_per_process is not None and options.devices_per_process < 1:
    parser.error(f"--devices_per_process={options.devices_per_process} must be >= 1")
  return launch(command_of(argv[split:]), processes=options.processes,
                devices_per_process=options.devices_per_process, port=options.port, grace_s=options.grace_s)


if __name__ == "__main__":
  sys.exit(main())
