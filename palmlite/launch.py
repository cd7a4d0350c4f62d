"""``palmlite launch``: several processes of one training run on this machine, for learning
what a multi-host job is without a cluster.

    palmlite launch --processes 2 --devices-per-process 4 -- \\
        train --preset tiny --mesh data=-1 --out runs/two

starts P copies of ``palmlite train ...``, each with its own D CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=D``) and three variables,
``PALMLITE_COORDINATOR`` (process 0's host:port), ``PALMLITE_NUM_PROCESSES`` and
``PALMLITE_PROCESS_ID``, which ``sharding.initialize_distributed`` passes to
``jax.distributed.initialize``. The processes then form one JAX job: one mesh over P × D
devices, one compiled step, XLA's collectives between processes over gloo (TCP on
localhost), each process reading only its own rows of every batch.

This is the local stand-in for a cluster. On SLURM (``srun``) or a TPU pod slice
(``--worker=all``) the scheduler starts one process per host instead, and
``jax.distributed.initialize()`` with no arguments finds the coordinator, the process count
and this process's id in their environment itself: the training code path is the same.

Process 0's output is streamed; the others' goes to ``<log_dir>/process-I.log``. When any
process fails the others are ended (a process whose peer is gone would wait in its next
collective) and launch returns the failed one's exit status, with its last lines.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from palmlite.sharding import COORDINATOR, NUM_PROCESSES, PROCESS_ID

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
POLL_SECONDS = 0.2
GRACE_SECONDS = 10  # a stopped process's time to exit (orbax finishing a save) before a kill


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now: the OS picks one for a socket bound to port 0.
    (Another program could take it before the coordinator binds it; unlikely, and then
    the processes fail to connect and launch says so.)"""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_env(base: dict, process_id: int, processes: int, devices: int,
                coordinator: str) -> dict:
    """The environment of process ``process_id``: ``base`` plus its devices and, with more
    than one process, the PALMLITE_* variables that make it join the others. JAX_PLATFORMS
    defaults to the CPU: D fake devices per process are a CPU notion (a GPU machine would
    hand each process its own GPUs instead, e.g. CUDA_VISIBLE_DEVICES)."""
    flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env = dict(base, XLA_FLAGS=" ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices}"]))
    env.setdefault("JAX_PLATFORMS", "cpu")
    for name in (COORDINATOR, NUM_PROCESSES, PROCESS_ID):
        env.pop(name, None)
    if processes > 1:
        env.update({COORDINATOR: coordinator, NUM_PROCESSES: str(processes),
                    PROCESS_ID: str(process_id)})
    return env


def launch(args: list[str], processes: int, devices_per_process: int = 4,
           log_dir: str | Path | None = None, timeout: float | None = None) -> int:
    """Run ``palmlite <args>`` (a ``train`` command) in ``processes`` local processes, each
    with ``devices_per_process`` CPU devices; the exit status of the first to fail, 124 if
    ``timeout`` seconds pass first, else 0. See the module docstring."""
    _check(args, processes, devices_per_process)
    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="palmlite-launch-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    coordinator = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "palmlite.cli", *args]
    procs, logs = [], []
    try:
        for i in range(processes):
            env = process_env(os.environ, i, processes, devices_per_process, coordinator)
            log = None if i == 0 else open(log_dir / f"process-{i}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(command, env=env, stdout=log,
                                          stderr=None if log is None else subprocess.STDOUT))
        return _wait(procs, log_dir, timeout)
    finally:  # also after Ctrl-C (every process got it too) or a failure: none outlives us
        _stop(procs)
        for log in logs:
            if log is not None:
                log.close()


def _check(args: list[str], processes: int, devices_per_process: int) -> None:
    if processes < 1:
        raise ValueError(f"--processes={processes} is invalid: expected an integer >= 1")
    if devices_per_process < 1:
        raise ValueError(f"--devices-per-process={devices_per_process} is invalid: expected "
                         "an integer >= 1")
    if not args or args[0] != "train":
        raise ValueError(f"launch runs a `palmlite train ...` command in every process, got "
                         f"{' '.join(args) or 'nothing'!r}: e.g. palmlite launch --processes 2 "
                         "-- train --preset tiny --mesh data=-1 --out runs/two")


def _wait(procs: list[subprocess.Popen], log_dir: Path, timeout: float | None) -> int:
    """Poll until every process has succeeded (0), one has failed (its status, after a
    report naming it) or ``timeout`` has passed (124)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            i, code = failed[0]
            _report(f"process {i} of {len(procs)} exited with status {code}", i, log_dir)
            return code
        if all(c == 0 for c in codes):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            _report(f"timed out after {timeout:g} s", 1 if len(procs) > 1 else 0, log_dir)
            return 124
        time.sleep(POLL_SECONDS)


def _report(what: str, process: int, log_dir: Path, lines: int = 20) -> None:
    """Say what went wrong, with the last lines of a process's log (process 0's output has
    already been streamed)."""
    print(f"palmlite launch: {what}; stopping the others (logs of processes 1.. in {log_dir})",
          file=sys.stderr)
    log = log_dir / f"process-{process}.log"
    if process > 0 and log.exists():
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- last lines of {log} ---", *tail, sep="\n", file=sys.stderr)


def _stop(procs: list[subprocess.Popen]) -> None:
    """End the processes still running: SIGTERM, then SIGKILL after a grace period."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.terminate()
    for p in running:
        try:
            p.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
