"""Where palmlite keeps downloaded and derived files, and how it writes them safely.

Everything derived (downloads, trained vocabularies, token caches) lives under one cache
directory: ``$PALMLITE_CACHE`` or ``~/.cache/palmlite``. Files are written to a temporary
name in the same directory and renamed into place, so an interrupted write never leaves a
half-file that a later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def cache_dir(*parts: str) -> Path:
    """``$PALMLITE_CACHE`` (default ``~/.cache/palmlite``, also when set but empty, which
    would otherwise mean the working directory) joined with ``parts``, created."""
    root = Path(os.environ.get("PALMLITE_CACHE") or Path.home() / ".cache" / "palmlite")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
