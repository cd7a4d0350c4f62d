"""Orbax checkpoints of the whole training state, and the fallback when one is damaged.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoint intact and the half-written one is never
listed. If the newest checkpoint is unreadable anyway (a damaged disk, a file removed by
hand), ``restore_latest`` warns and falls back to the next older one; when resuming, the
damaged step is moved aside into ``<run>/checkpoints-damaged/`` (kept for inspection, no
longer listed), so the run can save that step again. If checkpoints exist but none is
readable, it raises rather than let a resume silently start again from step 0.

Arrays sharded over a device mesh are saved shard by shard, and restored onto whatever
shardings the target carries: a run saved on one mesh resumes on another (``palmlite.sharding``).
With several processes every one of them calls ``save`` and ``restore`` (orbax's barriers go
through ``jax.distributed``): each writes the shards its devices hold, process 0 the metadata,
so the directory must be one that every process sees; a run saved by 2 processes resumes on 1
or 4 (``tests/test_multiprocess.py``).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


@contextlib.contextmanager
def _sigint_deferred():
    """Hold a SIGINT (Ctrl-C) until the block ends, then raise it as KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives signals
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Write step ``step``; a Ctrl-C meanwhile takes effect once it is written (a save
        cut short leaves orbax's threads failing at exit and the step half-written)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        with _sigint_deferred():
            self.manager.save(step, args=args, force=True)
            self.manager.wait_until_finished()

    def restore_latest(self, target: Any, move_damaged: bool = False
                       ) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest readable checkpoint, or None if there is none.

        ``target`` (arrays or ShapeDtypeStructs) gives the structure, and the shardings to
        restore onto; a leaf without one goes to this process's first device (orbax would
        otherwise reuse the saved layout, whose devices this process may not have). ``move_damaged``
        (a resume, which will save again): unreadable steps are moved aside. Raises
        ``FileNotFoundError`` when there are checkpoints and none of them is readable.
        """
        one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda x: x if getattr(x, "sharding", None) is not None else
                              jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device), target)
        damaged = []
        for step in reversed(self.steps()):
            args = ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                      meta=ocp.args.JsonRestore())
            try:
                restored = self.manager.restore(step, args=args)
            except Exception as e:  # noqa: BLE001 - any failure means "not usable"
                where = self._move_aside(step) if move_damaged else None
                damaged.append(step)
                warnings.warn(f"checkpoint at step {step} in {self.directory} is unreadable "
                              f"({type(e).__name__}: {str(e)[:200]})"
                              f"{f'; moved to {where}' if where else ''}; trying an older one",
                              RuntimeWarning, stacklevel=2)
                continue
            return step, restored["state"], restored["meta"]
        if damaged:
            raise FileNotFoundError(
                f"no readable checkpoint in {self.directory}: steps {sorted(damaged)} are all "
                "damaged (see the warnings above). Start a new run (another --out), or delete "
                "the run directory to start this one again from step 0")
        return None

    @property
    def directory(self) -> Path:
        return Path(self.manager.directory)

    def _move_aside(self, step: int) -> Path:
        """Move a damaged step out of the listed checkpoints, keeping it for inspection.
        Several processes: process 0 moves it, the others wait for that before rereading."""
        aside = self.directory.parent / f"{self.directory.name}-damaged"
        dest = aside / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        if jax.process_index() == 0:
            aside.mkdir(exist_ok=True)
            shutil.move(str(self.directory / str(step)), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"palmlite: checkpoint {step} moved aside")
        self.manager.reload()
        return dest

    def close(self) -> None:
        self.manager.close()
