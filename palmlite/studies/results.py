"""The results file of a study: one JSON line per grid point, rewritten atomically.

Every write replaces the whole file by rename, so a killed sweep leaves either the old or
the new file, never half a line. Writers take a lock file beside it (``filelock``) for the
read-modify-rename, so sweeps of one study running at once (on one machine, or on several
that share the folder) lose no rows. A point appears at most once: a re-run replaces its
line (a failure retried, for example).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from filelock import FileLock

from palmlite.files import atomic_write_text


def read_results(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_result(path: str | Path, row: dict) -> None:
    """Insert or replace ``row`` (by its ``point`` key), keeping the others in order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock", timeout=600):
        rows = [r for r in read_results(path) if r["point"] != row["point"]] + [row]
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def record(metrics: dict, result_path: str | os.PathLike | None = None) -> None:
    """Called by a notebook's last cell: hands its metrics to the sweep that runs it.

    Outside a sweep (``result_path`` None) it does nothing, so the same notebook runs by
    hand unchanged (and its last cell prints nothing: the metrics are for the sweep).
    """
    if result_path is not None:
        atomic_write_text(result_path, json.dumps(metrics, default=_jsonable))


def _jsonable(value):
    if hasattr(value, "tolist"):  # numpy / jax scalars and arrays
        return value.tolist()
    return str(value)
