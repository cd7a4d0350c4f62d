"""Several processes, for real: ``palmlite launch`` on this machine's CPU (issue #15).

One training run, six ways, through the command line as a reader would start it:

- ``ref``: 1 process with 8 CPU devices, the mesh ``fsdp=8`` (ZeRO-3: every weight split
  8 ways, so the gathers and reduce-scatters cross processes, and so do checkpoint shards);
- ``two``: 2 processes x 4 devices joined by ``jax.distributed`` (gloo collectives), the same
  mesh over all 8 devices, checkpoints at steps 2 and 4;
- ``on_one`` and ``on_four``: ``two``'s step-2 checkpoint resumed on 1 process x 8 devices
  and on 4 processes x 2 devices (the same mesh, so the same arithmetic);
- ``pods``: 2 processes x 4 devices as PaLM's two pods (``pod=2,fsdp=4``: one process a pod);
- ``four_pods``: 4 processes x 4 devices, 16 devices as ``pod=4,fsdp=2,tensor=2``.

The runs happen once (a module fixture); the tests assert on their files. The data caches
are the test's own; compiled programs come from the user's compilation cache, as for any
palmlite run (the first time, compiling adds ~15-20 s on 2 cores). Every launch has a
timeout and runs in its own session, so a hung process group is killed whole. The
launcher's own failure handling is checked on stand-in processes.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from palmlite import launch, sharding
from palmlite.train import load_run

STEPS, SAVE_EVERY, BATCH, SEQ = 4, 2, 8, 16
MESH = "fsdp=8"  # ZeRO-3 over all 8 devices, whichever processes hold them
POD_MESH = "pod=2,fsdp=4"  # two "pods" (one per process), ZeRO-3 inside each
FOUR_POD_MESH = "pod=4,fsdp=2,tensor=2"  # 4 processes x 4 devices: 16 devices, 2-D inside each
REL = 1e-5
LAUNCH_TIMEOUT_S = 240
# Every run compiles the same way, and a third faster (11 -> 7 CPU s a process): each
# process but 0 compiles every program itself (JAX 0.10 on the CPU: its persistent-cache key
# hashes the process's own devices, and only process 0 writes entries).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def _train_args(docs: Path, out: Path, resume: bool = False, mesh: str = MESH) -> list[str]:
    sets = dict(batch_size=BATCH, seq_len=SEQ, log_every=1, eval_every=0, eval_batches=1,
                checkpoint_every=SAVE_EVERY, keep_checkpoints=STEPS // SAVE_EVERY,
                steps_per_call=1, val_fraction=0.2)
    return ["train", "--preset", "tiny", "--corpus", str(docs), "--tokenizer", "bytes",
            "--steps", str(STEPS), "--out", str(out), "--quiet", "--mesh", mesh,
            "--set", "model.n_layers=1", *[f"--set=train.{k}={v}" for k, v in sets.items()],
            *(["--resume"] if resume else [])]


def _launch(tmp: Path, processes: int, devices: int, train_args: list[str]) -> str:
    """``palmlite launch`` as a subprocess in its own session: on a timeout the whole
    process group (the launcher and every training process) is killed."""
    env = dict(os.environ, PALMLITE_CACHE=str(tmp / "cache"), JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest", XLA_FLAGS=FAST_COMPILE)
    if jax.config.jax_compilation_cache_dir:  # compiled steps from this user's cache, as in
        env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir  # any run
    argv = [sys.executable, "-m", "palmlite.cli", "launch", "--processes", str(processes),
            "--devices-per-process", str(devices), "--log-dir", str(tmp / f"logs-{processes}"),
            "--timeout", str(LAUNCH_TIMEOUT_S - 20), "--", *train_args]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"palmlite launch --processes {processes} hung:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    docs = tmp / "docs"
    docs.mkdir()
    for i in range(12):  # repetitive text, as in test_train
        (docs / f"{i:02d}.txt").write_text("the cat sat on the mat. " * (20 + i))
    paths = {name: tmp / name for name in ("ref", "two", "on_one", "on_four", "pods", "four_pods")}
    _launch(tmp, 1, 8, _train_args(docs, paths["ref"]))
    _launch(tmp, 2, 4, _train_args(docs, paths["two"]))
    _launch(tmp, 2, 4, _train_args(docs, paths["pods"], mesh=POD_MESH))
    _launch(tmp, 4, 4, _train_args(docs, paths["four_pods"], mesh=FOUR_POD_MESH))
    for name, (processes, devices) in dict(on_one=(1, 8), on_four=(4, 2)).items():
        shutil.copytree(paths["two"], paths[name])  # resumed from two's first checkpoint
        shutil.rmtree(paths[name] / "checkpoints" / str(STEPS))
        _launch(tmp, processes, devices, _train_args(docs, paths[name], resume=True))
    return paths


def _assert_same_training(rows: list[dict], ref: list[dict]) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for row, want in zip(rows, ref):
        for key in ("loss", "z_loss", "grad_norm"):
            assert math.isclose(row[key], want[key], rel_tol=REL), (row["step"], key)
    assert math.isclose(rows[-1]["val_loss"], ref[-1]["val_loss"], rel_tol=REL)


@pytest.mark.slow
def test_two_processes_train_as_one_does(runs):
    _assert_same_training(_metrics(runs["two"]), _metrics(runs["ref"]))
    # Final parameters: both runs' last checkpoints restored here, on this one device.
    ref, _, _ = load_run(runs["ref"])
    two, _, info = load_run(runs["two"])
    assert info["device"]["count"] == 8
    leaves = lambda m: jax.tree.leaves(jax.tree.map(np.asarray, m))
    for a, b in zip(leaves(two), leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=REL, atol=REL * np.abs(b).max())


@pytest.mark.slow
def test_a_checkpoint_of_two_processes_resumes_on_one_and_on_four(runs):
    ref = _metrics(runs["ref"])
    for name in ("on_one", "on_four"):
        _assert_same_training(_metrics(runs[name]), ref)


@pytest.mark.slow
def test_two_pods_of_one_process_each_train_as_one_mesh_does(runs):
    """PaLM §4's layout: the pod axis is the processes (the slow network), ZeRO-3 inside
    each pod; the gradients cross pods once a step and the training is the same."""
    _assert_same_training(_metrics(runs["pods"]), _metrics(runs["ref"]))
    mesh = json.loads((runs["pods"] / "config.json").read_text())["device"]["mesh"]
    assert mesh["axes"] == dict(pod=2, data=1, fsdp=4, tensor=1, expert=1)
    owner = np.asarray(mesh["process_index"]).reshape(2, 4)  # pod x fsdp
    assert (owner == [[0] * 4, [1] * 4]).all()  # each pod one process's devices


@pytest.mark.slow
def test_four_processes_of_four_devices_as_four_pods_train_as_one_does(runs):
    """16 devices: batch over 4 pods x 2 (fsdp), heads over tensor=2 inside each pod."""
    _assert_same_training(_metrics(runs["four_pods"]), _metrics(runs["ref"]))
    info = json.loads((runs["four_pods"] / "config.json").read_text())["device"]
    assert (info["count"], info["processes"]) == (16, 4)
    owner = np.asarray(info["mesh"]["process_index"]).reshape(4, 4)  # pod x (fsdp, tensor)
    assert (owner == np.arange(4)[:, None]).all()


@pytest.mark.slow
def test_each_process_reads_only_its_rows(runs):
    """Each of P processes read B·T/P tokens a step (its rows), the P together the batch."""
    for name, processes, start in (("ref", 1, 0), ("two", 2, 0), ("on_four", 4, SAVE_EVERY)):
        rows = [r for r in _metrics(runs[name]) if r["step"] > start]  # this invocation's
        for r in rows:
            read = (r["step"] - start) * BATCH * SEQ  # counted from the process's start
            assert r["tokens_read_per_process"] == [read // processes] * processes, (name, r)


@pytest.mark.slow
def test_process_0_writes_the_run_files(runs):
    """One line per logged step in metrics.jsonl (not one per process), one config.json."""
    lines = (runs["two"] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS
    assert {p.name for p in runs["two"].iterdir()} - {".lock"} == {
        "checkpoints", "config.json", "metrics.jsonl"}


# ---- the launcher, on stand-in processes (no JAX): fast ----------------------------------
def test_launch_stops_the_others_when_one_fails(tmp_path, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    failing = subprocess.Popen([sys.executable, "-c", "print('bad config'); raise SystemExit(3)"],
                               stdout=open(tmp_path / "process-1.log", "w"))
    try:
        assert launch._wait([sleeper, failing], tmp_path, timeout=60) == 3
    finally:
        launch._stop([sleeper, failing])
    assert sleeper.poll() is not None  # ended, not left waiting for its peer
    err = capsys.readouterr().err
    assert "process 1 of 2 exited with status 3" in err and "bad config" in err


def test_launch_gives_each_process_its_devices_and_id():
    base = {"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8",
            "PALMLITE_PROCESS_ID": "7"}
    env = launch.process_env(base, 1, 2, 4, "127.0.0.1:1234")
    assert env["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=4"
    assert (env["PALMLITE_COORDINATOR"], env["PALMLITE_NUM_PROCESSES"],
            env["PALMLITE_PROCESS_ID"]) == ("127.0.0.1:1234", "2", "1")
    alone = launch.process_env(base, 0, 1, 8, "127.0.0.1:1234")  # one process: no job to join
    assert "PALMLITE_PROCESS_ID" not in alone and alone["JAX_PLATFORMS"] == "cpu"


@pytest.mark.parametrize("env, message", [
    (dict(PALMLITE_COORDINATOR="127.0.0.1:1"),
     r"\['PALMLITE_NUM_PROCESSES', 'PALMLITE_PROCESS_ID'\] unset"),
    (dict(PALMLITE_COORDINATOR="h:1", PALMLITE_NUM_PROCESSES="two", PALMLITE_PROCESS_ID="0"),
     "must be integers"),
    (dict(PALMLITE_COORDINATOR="h:1", PALMLITE_NUM_PROCESSES="2", PALMLITE_PROCESS_ID="2"),
     "0 <= PALMLITE_PROCESS_ID < PALMLITE_NUM_PROCESSES"),
])
def test_bad_process_variables_are_named(env, message):
    with pytest.raises(ValueError, match=message):
        sharding._explicit_processes(env)
