"""``palmlite sweep``: run a study's notebook at every grid point with papermill.

Each point runs in its own worker process (papermill's ``cwd`` handling is not
thread-safe), at most ``workers`` at a time, into ``studies/runs/<study>/<point>.ipynb``.
The notebook's ``record(...)`` writes its metrics to a file the runner names; the runner
adds parameters, device, versions and duration and stores one line per point in
``studies/results/<study>.jsonl``. Completed points are skipped on a re-run; a failing
point is recorded with its error and executed-notebook path, the others still run, and the
sweep ends with a non-zero status. With ``shard="I/N"`` it runs one machine's share of the
points and stores each row in a file of its own, folded into the results file by
``merge_study`` (``palmlite.studies.shards``).
"""

from __future__ import annotations

import atexit
import concurrent.futures as futures
import functools
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from palmlite.studies.figures import make_figures
from palmlite.studies.results import read_results, write_result
from palmlite.studies.shards import (best_rows, in_shard, merge_shards, parse_shard,
                                     write_shard_row)
from palmlite.studies.spec import Study, load_studies

KERNEL_START_ERRORS = ("Kernel died before replying", "Address already in use", "ZMQError",
                       "Kernel didn't respond")


def run_point(notebook: str, output: str, parameters: dict, timeout_s: int, env: dict,
              reuse_kernel: bool = True) -> dict:
    """Execute one point in this (worker) process; returns the recorded metrics and the
    execution time (measured here, so time spent queued for a worker is not counted).

    With ``reuse_kernel`` the worker keeps its kernel from one point to the next and empties
    its namespace in between (``%reset -f``): the ~3 s of kernel start and imports (jax, flax,
    optax) are paid once per worker, not once per point. The results are the same (tested):
    a point's computation depends only on its parameters. A point that fails takes its
    kernel down with it, so the next one starts clean.
    """
    import papermill
    os.environ.update(env)
    start = time.time()
    fd, result_path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        try:
            papermill.execute_notebook(notebook, output, kernel_name="python3", km=_worker_kernel(),
                                       parameters={**parameters, "result_path": result_path},
                                       execution_timeout=timeout_s, progress_bar=False,
                                       log_output=False)
        except BaseException:
            _stop_worker_kernel()  # its state is unknown: the next point starts a new one
            raise
        if not reuse_kernel:
            _stop_worker_kernel()
        text = Path(result_path).read_text()
        if not text:
            raise RuntimeError("the notebook finished without calling palmlite.studies.record()")
        return dict(metrics=json.loads(text), duration_s=time.time() - start)
    finally:
        os.unlink(result_path)


_KERNEL = None  # this worker's kernel manager, kept between points


def _worker_kernel():
    """This worker's running kernel, its namespace emptied; started on first use (or after a
    failure)."""
    global _KERNEL
    if _KERNEL is not None and _KERNEL.is_alive() and _reset_namespace(_KERNEL):
        return _KERNEL
    _stop_worker_kernel()
    _KERNEL = start_kernel()
    atexit.register(_stop_worker_kernel)
    return _KERNEL


def start_kernel(cwd: str | None = None):
    """A started python3 kernel (``jupyter_client.KernelManager``) on private Unix sockets,
    working in ``cwd`` (default: this process's); stop it with ``stop_kernel``. Kernels started at once can race for TCP ports (Windows):
    up to three attempts."""
    from jupyter_client.manager import KernelManager
    for attempt in range(3):
        km = KernelManager(kernel_name="python3", **_kernel_transport())
        try:
            km.start_kernel(**({} if cwd is None else dict(cwd=cwd)))
            return km
        except Exception as e:  # noqa: BLE001 - only kernel-start races are retried
            stop_kernel(km)
            if attempt == 2 or not any(s in str(e) for s in KERNEL_START_ERRORS):
                raise


def stop_kernel(km) -> None:
    """Shut the kernel down (it may be dead already) and remove its sockets' directory."""
    try:
        km.shutdown_kernel(now=True)
    except Exception:  # noqa: BLE001 - it may be dead already, or never have started
        pass
    if km.transport == "ipc":
        shutil.rmtree(os.path.dirname(km.ip), ignore_errors=True)


def _kernel_transport() -> dict:
    """Unix sockets in a private directory where the OS has them: no TCP ports to race for,
    and no "[IPKernelApp] WARNING | Kernel is running over TCP without encryption" line per
    point. Windows keeps TCP on localhost."""
    if os.name == "nt":
        return {}
    return dict(transport="ipc", ip=os.path.join(tempfile.mkdtemp(prefix="palmlite-kernel-"), "k"))


def _reset_namespace(km) -> bool:
    """Empty the kernel's namespace (the previous point's variables, models and arrays)."""
    kc = km.client()
    try:
        kc.start_channels()  # the kernel is known to be up: no wait_for_ready (0.2 s)
        reply = kc.execute_interactive("%reset -f\nimport gc as _gc; _gc.collect(); del _gc",
                                       timeout=60, output_hook=lambda msg: None)
        return reply["content"]["status"] == "ok"
    except Exception:  # noqa: BLE001 - a kernel that cannot reset is replaced
        return False
    finally:
        kc.stop_channels()


def _stop_worker_kernel() -> None:
    global _KERNEL
    if _KERNEL is not None:
        stop_kernel(_KERNEL)
        _KERNEL = None


def run_study(spec: str | Path, *, workers: int = 1, only: list[str] = (), dry_run: bool = False,
              root: str | Path = ".", parts: list[str] = (), reuse_kernel: bool = True,
              shard: str | None = None) -> int:
    """Run the pending points of a study (each part in turn, or only the named ``parts``);
    returns the failed count. ``shard="I/N"`` (0-based) runs only machine I's share of
    them, each row into its own file and no figures (a shard has only part of the points:
    they are drawn by ``merge_study``); an unsharded run first merges what shards wrote."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} is invalid: expected an integer >= 1")
    shard = parse_shard(shard)
    studies = _select_parts(spec, parts)
    _check_only(studies, only)
    return sum(_run_one(study, workers, only, dry_run, Path(root), reuse_kernel, shard)
               for study in studies)


def merge_study(spec: str | Path, root: str | Path = ".", parts: list[str] = ()) -> list[Path]:
    """Fold the rows that ``--shard`` sweeps wrote into each part's results file
    (``shards.merge_shards``: one row per point), then draw its figures; returns them."""
    written = []
    for study in _select_parts(spec, parts):
        results_path = _results_path(Path(root), study)
        changed = merge_shards(study, results_path)
        print(f"study {study.name}: {changed} row(s) merged from {results_path.stem}.shards/")
        if results_path.exists():
            written += make_figures(study, _current_rows(study, results_path),
                                    Path(root) / "figures")
    return written


def _results_path(root: Path, study: Study) -> Path:
    return root / "studies" / "results" / f"{study.name}.jsonl"


def _select_parts(spec: str | Path, parts: list[str]) -> list[Study]:
    """The spec's parts, or only those named (``--part``; an unknown name raises)."""
    studies = load_studies(spec)
    names = [study.name for study in studies]
    unknown = [p for p in parts if p not in names]
    if unknown:
        raise ValueError(f"--part {unknown[0]!r} is not a part of {str(spec)!r}; its parts: {names}")
    return [study for study in studies if not parts or study.name in parts]


def draw_figures(spec: str | Path, root: str | Path = ".", parts: list[str] = ()) -> list[Path]:
    """Regenerate a study's figures (or its named ``parts``') from its results files alone
    (no training), after merging the rows that ``--shard`` sweeps wrote."""
    written = []
    for study in _select_parts(spec, parts):
        results_path = _results_path(Path(root), study)
        merge_shards(study, results_path)  # points that shards ran are drawn too
        if not results_path.exists():
            raise FileNotFoundError(f"no results for study {study.name!r}: {str(results_path)!r} "
                                    f"is missing (run `palmlite sweep {spec}` first)")
        written += make_figures(study, _current_rows(study, results_path), Path(root) / "figures")
    return written


def _run_one(study: Study, workers: int, only: list[str], dry_run: bool, root: Path,
             reuse_kernel: bool = True, shard: tuple[int, int] | None = None) -> int:
    results_path = _results_path(root, study)
    runs_dir = root / "studies" / "runs" / study.name
    if shard is None and not dry_run:
        merge_shards(study, results_path)  # what shards finished is done, and drawn
    rows = best_rows(study, results_path)
    points = [p for p in study.points() if _matches(p, only)]
    mine = [p for p in points if in_shard(study.key(p), shard)]
    pending = [p for p in mine if not study.is_done(rows.get(study.key(p), {}), p)]
    share = "" if shard is None else f", shard {shard[0]}/{shard[1]}: {len(mine)} of them"
    print(f"study {study.name}: {len(points)} points{share}, {len(mine) - len(pending)} done, "
          f"{len(pending)} to run with {workers} worker(s)")
    if dry_run:
        _list_points(study, mine, rows)
        return 0
    store = functools.partial(write_result if shard is None else write_shard_row, results_path)
    failed = _run_points(study, pending, workers, reuse_kernel, runs_dir, store)
    if shard is None:
        for path in make_figures(study, _current_rows(study, results_path), root / "figures"):
            print(f"  figure {path}")
    else:
        print(f"study {study.name}: shard {shard[0]}/{shard[1]} finished; when every shard has, "
              f"`palmlite sweep {study.path} --merge` gathers the results and draws the figures")
    if failed:
        print(f"study {study.name}: {failed} point(s) failed; see their notebooks in {runs_dir}")
    return failed


def _run_points(study: Study, pending: list[dict], workers: int, reuse_kernel: bool,
                runs_dir: Path, store) -> int:
    """Run the points, at most ``workers`` at once, handing each finished point's row to
    ``store`` as it comes; returns the failed count."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} if workers > 1 else {}
    failed = 0
    # Spawned, not forked: a fork of a process that has started JAX's threads can deadlock.
    spawn = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=spawn,
                                     initializer=_init_worker,
                                     initargs=(spawn.Value("i", 0), workers)) as pool:
        jobs = {}
        for p in pending:
            output = runs_dir / f"{study.key(p)}.ipynb"
            job = pool.submit(run_point, str(study.notebook), str(output), p, study.timeout_s,
                              env, reuse_kernel)
            jobs[job] = (p, output)
        bar = _points_bar(study.name, len(jobs), workers)
        for job in futures.as_completed(jobs):
            p, output = jobs[job]
            row = _row(study, p, output)
            try:
                row.update(status="ok", **job.result())
                row.update(_time_split(row["metrics"], row["duration_s"]))
            except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                failed += 1
                row.update(status="failed", duration_s=None, error=f"{type(e).__name__}: {e}"[:2000])
            store(row)
            bar.write(_point_text(row))
            bar.update(1)
            bar.set_postfix(running=min(workers, bar.total - bar.n), failed=failed)
        bar.close()
    return failed


def _points_bar(name: str, total: int, workers: int):
    """A bar over the sweep's points: done / total, running, failed, and the ETA."""
    from tqdm.std import tqdm
    bar = tqdm(total=total, desc=f"  {name}", unit="point", ascii=True, dynamic_ncols=True,
               mininterval=1, file=sys.stdout)
    bar.set_postfix(running=min(workers, total), failed=0)
    return bar


def _current_rows(study: Study, results_path: Path) -> list[dict]:
    """The results of the spec's points as it is now: a row left from other settings (a
    stale row not yet rerun, a point no longer in the grid) stays in the file, out of the
    figures."""
    rows = {r["point"]: r for r in read_results(results_path)}
    return [rows[study.key(p)] for p in study.points()
            if study.key(p) in rows and study.is_done(rows[study.key(p)], p)]


def _list_points(study: Study, points: list[dict], rows: dict[str, dict]) -> None:
    """done / todo / stale (finished with other settings: what changed) for each point."""
    for p in points:
        row = rows.get(study.key(p))
        if row is not None and study.is_done(row, p):
            print("  done  " + study.key(p))
        elif row is not None and row.get("status") == "ok":
            print(f"  stale {study.key(p)}  ({'; '.join(study.changes(row, p))})")
        else:
            print("  todo  " + study.key(p))


def _init_worker(counter, workers: int) -> None:
    """A worker dies with its sweep, and (several workers) gets its own cores."""
    _die_with_parent()
    if workers > 1:
        _pin_worker(counter, workers)


def _die_with_parent() -> None:
    """If the sweep's process is killed (even ``kill -9``), stop this worker's kernel and
    exit: an orphaned worker would finish its point and take the next, running points twice
    beside a re-run."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        _stop_worker_kernel()
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="palmlite-parent-watch").start()


def _pin_worker(counter, workers: int) -> None:
    """Give each of the sweep's workers its own share of the CPU cores (their kernels
    inherit it). Tiny models make many small XLA ops whose threads mostly wait on each
    other: on a 2-core CPU two one-core workers train ~1.3x more tokens per second than
    one two-core worker (benchmarks/NOTES.md)."""
    if not hasattr(os, "sched_setaffinity"):  # macOS, Windows: the OS schedules
        return
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    cores = sorted(os.sched_getaffinity(0))
    if workers > len(cores):
        return
    share = len(cores) // workers
    os.sched_setaffinity(0, cores[index % workers * share:(index % workers + 1) * share])


def _time_split(metrics: dict, duration_s: float) -> dict:
    """``seconds_training`` (train steps, summed over the point's runs) and ``seconds_other``
    (kernel start, imports, data, compilation, evaluation: the rest of the point)."""
    runs = metrics.get("runs", [metrics])
    training = [r.get("seconds_training") for r in runs]
    if not training or any(t is None for t in training):
        return {}
    return dict(seconds_training=sum(training), seconds_other=duration_s - sum(training))


def _point_text(row: dict) -> str:
    """One line per finished point: its key, its final validation loss (where the notebook
    recorded one) and its time; or why it failed."""
    if row["status"] != "ok":
        reason = row["error"].strip().splitlines()[-1][:160] if row.get("error") else "failed"
        return f"  failed {row['point']}  ({reason})"
    metrics = row.get("metrics") or {}
    runs = metrics.get("runs") or [metrics]
    losses = [r["val_loss"] for r in runs if isinstance(r, dict) and "val_loss" in r]
    loss = f"val_loss {', '.join(f'{v:.4f}' for v in losses)}; " if losses else ""
    return f"  ok     {row['point']}  ({loss}{_time_text(row)})"


def _time_text(row: dict) -> str:
    if "seconds_training" not in row:
        return f"{row['duration_s'] or 0:.0f} s"
    return (f"{row['duration_s']:.1f} s: {row['seconds_training']:.1f} training, "
            f"{row['seconds_other']:.1f} other")


def _check_only(studies: list[Study], only: list[str]) -> None:
    """``--only KEY=VALUE`` must name a parameter that some part has."""
    names = {k for study in studies for p in study.points() for k in p}
    for condition in only:
        key, sep, _ = condition.partition("=")
        if not sep:
            raise ValueError(f"--only expects KEY=VALUE, got {condition!r}")
        if key not in names:
            raise ValueError(f"--only {condition!r}: no parameter {key!r}; parameters: {sorted(names)}")


def _matches(point: dict, only: list[str]) -> bool:
    """Whether the point has every KEY=VALUE of ``only`` (validated by ``_check_only``)."""
    return all(key in point and str(point[key]) == value
               for key, _, value in (c.partition("=") for c in only))


def _row(study: Study, point: dict, output: Path) -> dict:
    from palmlite import __version__
    return dict(point=study.key(point), study=study.name, params=point, source=study.notebook.name,
                notebook=str(output),
                finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                versions=dict(palmlite=__version__, python=platform.python_version()))
