"""The gallery: every teaching notebook executed with its default parameters, readable
without installing anything.

``execute`` runs each notebook of ``notebooks/`` through papermill on the python3 kernel
(the path ``palmlite sweep`` uses), from the notebooks' folder, and writes the executed
copy to ``gallery/notebooks/`` (committed: GitHub and any notebook viewer show them with
their outputs and plots; ``notebooks/`` itself stays output-free). ``render`` turns the
executed copies into static HTML pages with nbconvert, plus an ``index.html`` that links
them with each notebook's title and run time. ``make gallery`` does both.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
GALLERY = ROOT / "gallery"


def execute(notebooks: list[Path] | None = None, out: Path = GALLERY / "notebooks") -> list[Path]:
    """Execute each notebook with its default parameters into ``out``; returns the copies.
    A notebook that fails stops the build with papermill's error (naming cell and notebook)."""
    import papermill
    from palmlite.studies.runner import start_kernel, stop_kernel
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks or sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        target, t0 = out / path.name, time.perf_counter()
        print(f"executing {path.name} ...", flush=True)
        km = start_kernel(cwd=str(path.parent))  # a fresh kernel each: a notebook may set
        # XLA_FLAGS before JAX starts
        try:
            papermill.execute_notebook(str(path), str(target), kernel_name="python3", km=km,
                                       cwd=str(path.parent), progress_bar=False)
        finally:
            stop_kernel(km)
        nb = json.loads(target.read_text())
        nb["metadata"].setdefault("palmlite", {})["gallery"] = dict(
            seconds=round(time.perf_counter() - t0, 1),
            executed=time.strftime("%Y-%m-%d", time.gmtime()))
        target.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        written.append(target)
    return written


def render(executed: Path = GALLERY / "notebooks", site: Path = GALLERY / "site") -> list[Path]:
    """HTML pages of the executed notebooks and an index; returns the pages written."""
    import nbformat
    from nbconvert import HTMLExporter
    paths = sorted(executed.glob("*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no executed notebooks in {str(executed)!r}: run `make gallery`")
    site.mkdir(parents=True, exist_ok=True)
    exporter, entries, pages = HTMLExporter(template_name="lab"), [], []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        body, _ = exporter.from_notebook_node(nb)
        page = site / f"{path.stem}.html"
        page.write_text(body)
        pages.append(page)
        entries.append((page.name, _title(nb), nb.metadata.get("palmlite", {}).get("gallery", {})))
    index = site / "index.html"
    index.write_text(_index(entries))
    return [index, *pages]


def _title(nb) -> str:
    first = next((c.source for c in nb.cells if c.cell_type == "markdown"), "")
    return first.splitlines()[0].lstrip("# ").strip() if first else "(untitled)"


def _index(entries: list[tuple[str, str, dict]]) -> str:
    rows = "\n".join(
        f'<li><a href="{html.escape(name)}">{html.escape(title)}</a>'
        + (f" <small>(executed {info['executed']} in {info['seconds']:.0f} s on a CPU)</small>"
           if info else "") + "</li>" for name, title, info in entries)
    return ("<!doctype html>\n<html><head><meta charset='utf-8'><title>palmlite gallery</title>"
            "</head>\n<body><h1>palmlite: the notebooks, executed</h1>\n<p>Each notebook run "
            "with its default parameters by <code>make gallery</code>.</p>\n<ol>\n"
            f"{rows}\n</ol></body></html>\n")


def main() -> None:
    import argparse
    parser = argparse.ArgumentParser(description="execute the notebooks and render the gallery")
    parser.add_argument("--render-only", action="store_true",
                        help="render the committed executed notebooks (no execution)")
    args = parser.parse_args()
    if not args.render_only:
        execute()
    for page in render():
        print(f"page {page}")


if __name__ == "__main__":
    main()
