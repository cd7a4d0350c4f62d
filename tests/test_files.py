import os
import stat

import pytest

from palmlite.files import atomic_write_text


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    """Issue 13: results, config.json and caches were 0600 whatever the umask, unreadable
    by a group sharing the storage."""
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == mode
    assert (tmp_path / "f.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temporary left


def test_a_half_written_compilation_cache_entry_is_removed_and_the_cache_works_again(tmp_path):
    """A process killed between JAX's two writes of an entry left an executable with no
    access time; JAX's eviction then failed on every later write (JAX 0.10)."""
    from palmlite.files import repair_compilation_cache
    for key in ("whole", "no_atime", "no_cache"):
        if key != "no_cache":
            (tmp_path / f"jit_f-{key}-cache").write_bytes(b"x")
        if key != "no_atime":
            (tmp_path / f"jit_f-{key}-atime").write_bytes(b"\0" * 8)
    assert repair_compilation_cache(tmp_path) == ["jit_f-no_atime", "jit_f-no_cache"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lockfile", "jit_f-whole-atime",
                                                         "jit_f-whole-cache"]
    from jax._src.lru_cache import LRUCache  # the cache JAX uses with a size limit
    cache = LRUCache(str(tmp_path), max_size=2)
    cache.put("jit_g-new", b"yz")  # evicts: it reads every entry's access time
    assert not (tmp_path / "jit_f-whole-cache").exists()
