"""Sweeps on many machines: ``palmlite sweep STUDY.yaml --shard I/N`` and ``--merge``.

Machine I of N (0-based, 0 <= I < N, as ``SLURM_ARRAY_TASK_ID`` and ``TPU_WORKER_ID``
count) runs the points whose key hashes to I. The split is a pure function of each point's
key (SHA-256, not Python's per-process salted ``hash``), so every machine computes it alone,
the N shards together hold each point exactly once, and a point keeps its shard when the
grid grows or ``--only`` narrows it. Being a hash, it balances a large grid, not a small
one: 6 points over 3 shards may split 3/2/1 (``--dry-run --shard I/N`` shows each share).

A shard writes each finished point's row to a file of its own,
``studies/results/<study>.shards/<point>.json``, atomically: machines sharing a network
folder never wait on one file's lock, and a point killed mid-run leaves no file, so a rerun
of the shard runs it again. ``merge_shards`` folds those files into ``<study>.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from filelock import FileLock

from palmlite.files import atomic_write_text
from palmlite.studies.results import read_results
from palmlite.studies.spec import Study

SHARD = re.compile(r"(\d+)/(\d+)")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> ``(I, N)``, validated before anything runs; None stays None."""
    if text is None:
        return None
    match = SHARD.fullmatch(str(text).strip())
    if match is None or not int(match[1]) < int(match[2]):
        raise ValueError(f"--shard {text!r} is invalid: expected I/N with integers 0 <= I < N "
                         "(0-based, as SLURM_ARRAY_TASK_ID and TPU_WORKER_ID count), "
                         "e.g. --shard 0/8 to --shard 7/8")
    return int(match[1]), int(match[2])


def shard_of(key: str, n: int) -> int:
    """The shard (0 to n-1) that runs the point with this key: its SHA-256, modulo n."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n


def in_shard(key: str, shard: tuple[int, int] | None) -> bool:
    return shard is None or shard_of(key, shard[1]) == shard[0]


def shard_dir(results_path: Path) -> Path:
    """``<study>.shards/`` beside ``<study>.jsonl``: one file per point run by a shard."""
    return results_path.with_name(results_path.stem + ".shards")


def write_shard_row(results_path: Path, row: dict) -> None:
    """Store a point's row in its own file (renamed into place: whole or absent). Two
    machines that ran the same point write the same file; the last one stays."""
    text = json.dumps(row, sort_keys=True) + "\n"
    atomic_write_text(shard_dir(results_path) / f"{row['point']}.json", text)


def read_shard_rows(results_path: Path) -> list[dict]:
    """The rows the shards wrote. A temporary file of a write in progress (``.<point>.json.
    *.tmp``) does not end in ``.json`` and is not read."""
    folder = shard_dir(results_path)
    if not folder.is_dir():
        return []
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))
            if not path.name.startswith(".")]


def row_rank(study: Study):
    """The order in which rows of one point are preferred (highest kept), when it has
    several (two machines ran it, or a shard and an unsharded sweep did): first a row of the
    spec's current settings (parameters and notebook: an old success must not hide a rerun
    after the spec changed), then status ok over failed, then the latest ``finished`` time.
    On a full tie the first row given is kept (the results file's: a repeated merge changes
    nothing)."""
    points = {study.key(p): json.loads(json.dumps(p)) for p in study.points()}

    def rank(row: dict) -> tuple:
        current = (row.get("params") == points.get(row["point"], row.get("params"))
                   and row.get("source") == study.notebook.name)
        return current, row.get("status") == "ok", row.get("finished") or ""
    return rank


def best_rows(study: Study, results_path: Path) -> dict[str, dict]:
    """Each point's preferred row among the results file and the shards' files, without
    writing anything (what a sweep and ``--dry-run`` count as done)."""
    best, rank = {}, row_rank(study)
    for row in read_results(results_path) + read_shard_rows(results_path):
        if row["point"] not in best or rank(row) > rank(best[row["point"]]):
            best[row["point"]] = row
    return best


def merge_shards(study: Study, results_path: Path) -> int:
    """Fold the shards' rows into the results file, one row per point (``row_rank``), in a
    single rewrite under the file's lock (``write_result``'s); returns the rows it changed.

    The shards' files are left in place: a merge repeated, or two run at once, or one run
    while shards are still writing, gives the same file and loses nothing; deleting them
    would race with a shard rewriting one. Rows of points no longer in the grid are kept,
    as ``write_result`` keeps them.
    """
    shard_rows = read_shard_rows(results_path)
    if not shard_rows:
        return 0
    rank = row_rank(study)
    with FileLock(f"{results_path}.lock", timeout=600):
        rows = {r["point"]: r for r in read_results(results_path)}
        changed = 0
        for row in shard_rows:
            if row["point"] not in rows or rank(row) > rank(rows[row["point"]]):
                rows[row["point"]] = row
                changed += 1
        if changed:
            atomic_write_text(results_path, "".join(json.dumps(r, sort_keys=True) + "\n"
                                                    for r in rows.values()))
    return changed
