"""Orbax checkpoints of the whole training state, and the fallback when one is damaged.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoint intact and the half-written one is never
listed. If the newest checkpoint is unreadable anyway (a damaged disk, a file removed by
hand), ``restore_latest`` warns and falls back to the next older one.

Arrays sharded over a device mesh are saved shard by shard, and restored onto whatever
shardings the target carries: a run saved on one mesh resumes on another (``palmlite.sharding``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def restore_latest(self, target: Any) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest readable checkpoint, or None if there is none.

        ``target`` (arrays or ShapeDtypeStructs) gives the structure, and the shardings to
        restore onto; a leaf without one goes to the default device (orbax would otherwise
        reuse the saved layout, whose devices this process may not have).
        """
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda x: x if getattr(x, "sharding", None) is not None else
                              jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device), target)
        for step in reversed(self.steps()):
            args = ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                      meta=ocp.args.JsonRestore())
            try:
                restored = self.manager.restore(step, args=args)
            except Exception as e:  # noqa: BLE001 - any failure means "not usable"
                warnings.warn(f"checkpoint at step {step} in {self.manager.directory} is "
                              f"unreadable ({type(e).__name__}: {e}); trying an older one",
                              RuntimeWarning, stacklevel=2)
                continue
            return step, restored["state"], restored["meta"]
        return None

    def close(self) -> None:
        self.manager.close()
