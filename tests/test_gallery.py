"""The gallery renders: the committed executed notebooks become HTML pages and an index
(CI builds the pages; executing the notebooks is `make gallery`'s job, not the suite's)."""

from pathlib import Path

import nbformat
import pytest

from palmlite.studies import gallery


def test_the_committed_gallery_renders_and_covers_every_notebook(tmp_path):
    executed = sorted((gallery.GALLERY / "notebooks").glob("*.ipynb"))
    notebooks = sorted(gallery.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    assert [p.name for p in executed] == [p.name for p in notebooks]
    for path in executed:  # executed, without errors, with their plots
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count for c in code), f"{path.name} has unexecuted cells"
        assert not [o for c in code for o in c.outputs if o.output_type == "error"], path.name
    pages = gallery.render(site=tmp_path / "site")
    assert pages[0].name == "index.html" and len(pages) == len(notebooks) + 1
    index = pages[0].read_text()
    assert all(f'href="{p.stem}.html"' in index for p in notebooks)
    assert all(p.stat().st_size > 10_000 for p in pages[1:])


def test_render_names_the_fix_when_nothing_was_executed(tmp_path):
    with pytest.raises(FileNotFoundError, match="make gallery"):
        gallery.render(executed=tmp_path, site=tmp_path / "site")
