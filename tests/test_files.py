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
