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
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a file others may read honours the umask
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (/proc)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore
    os.umask(mask)
    return mask


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


COMPILATION_CACHE_BYTES = 2 << 30  # 2 GiB of compiled executables, least recently used evicted


def use_compilation_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache in ``cache_dir("jax")``, once per process.

    Every point of a sweep, and every rerun of a notebook, then loads the compiled train
    step from disk instead of compiling it again (seconds per point on a 2-core CPU).
    Called when palmlite is imported, before anything is compiled: JAX reads the setting at
    its first compilation. A cache directory the user set (``jax_compilation_cache_dir``,
    ``JAX_COMPILATION_CACHE_DIR``) is kept; ``PALMLITE_COMPILATION_CACHE=0`` leaves the cache
    off. JAX trusts what it loads from this directory: keep it private to you.
    """
    import jax
    _count_cache_events()
    if os.environ.get("PALMLITE_COMPILATION_CACHE", "1") == "0":
        return None
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    path = cache_dir("jax")
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every executable: the tiny models of a study compile in well under JAX's
    # default 1 s threshold, yet a point compiles several of them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # A size limit makes JAX evict old entries and take a file lock around each read and
    # write (without one, a sweep's concurrent workers could read a half-written entry).
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)
    repair_compilation_cache(path)
    return path


def repair_compilation_cache(path: Path) -> list[str]:
    """Delete entries a killed process left half-written: an executable (``KEY-cache``)
    without its access time (``KEY-atime``), or the reverse. JAX writes the two one after
    the other, and its eviction reads every entry's access time, so one orphan made every
    later cache write fail (JAX 0.10) and the cache silently stop growing. Runs under the
    cache's own file lock; skipped if another process holds it. Returns the keys removed."""
    import filelock
    try:
        with filelock.FileLock(path / ".lockfile", timeout=1):
            names = {p.name for p in path.iterdir()}
            keys = {n.rsplit("-", 1)[0] for n in names if n.endswith(("-cache", "-atime"))}
            broken = sorted(k for k in keys if f"{k}-cache" not in names or f"{k}-atime" not in names)
            for key in broken:
                for suffix in ("-cache", "-atime"):
                    (path / f"{key}{suffix}").unlink(missing_ok=True)
            return broken
    except (filelock.Timeout, OSError):
        return []


# Compilations that asked the persistent cache, and those it answered, in this process.
COMPILATION_CACHE_COUNTS = {"requests": 0, "hits": 0}
_EVENTS = {"/jax/compilation_cache/compile_requests_use_cache": "requests",
           "/jax/compilation_cache/cache_hits": "hits"}


def _count_cache_events() -> None:
    """Count JAX's compilation-cache events (``COMPILATION_CACHE_COUNTS``), once per process."""
    import jax
    if getattr(_count_cache_events, "done", False):
        return
    _count_cache_events.done = True

    def listener(event: str, **kwargs) -> None:
        if event in _EVENTS:
            COMPILATION_CACHE_COUNTS[_EVENTS[event]] += 1
    jax.monitoring.register_event_listener(listener)
