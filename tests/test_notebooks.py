"""Every teaching notebook: committed clean, one papermill parameters cell, and it runs.

Each notebook stores the parameters of its smallest run in its metadata
(``palmlite.smoke_parameters``); the slow test executes it with those through papermill
on the python3 kernel, the way ``palmlite sweep`` does.
"""

import json
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]


def test_the_eight_teaching_notebooks_exist():
    numbers = {p.name[:2] for p in NOTEBOOKS}
    assert {f"{i:02d}" for i in range(1, 9)} <= numbers


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_clean_with_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} parameters cells"
    assert "result_path = None" in tagged[0].source
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert "record(" in code[-1].source, f"{path.name}: the last cell hands metrics to a sweep"
    smoke = nb.metadata["palmlite"]["smoke_parameters"]
    assert set(smoke) <= _parameter_names(tagged[0].source), f"{path.name}: unknown smoke parameter"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_the_colab_cell_never_installs_a_bare_package_name(path):
    """Issue 14, item 6: `pip install palmlite` would fetch whatever PyPI holds under that
    name. The first cell installs only a URL or path the reader set, and refuses otherwise."""
    first = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    assert 'PALMLITE_SOURCE = ""' in first.source
    assert 'if "/" not in PALMLITE_SOURCE:' in first.source and "raise SystemExit" in first.source
    assert first.source.index("raise SystemExit") < first.source.index("subprocess.run(")


def _parameter_names(source: str) -> set[str]:
    return {line.split("=")[0].strip() for line in source.splitlines()
            if "=" in line and not line.lstrip().startswith("#")}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_with_its_smallest_parameters(path, tmp_path):
    import papermill
    nb = nbformat.read(path, as_version=4)
    result_path = tmp_path / "result.json"
    parameters = {**nb.metadata["palmlite"]["smoke_parameters"], "result_path": str(result_path)}
    tagged = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    if "run_dir" in _parameter_names(tagged.source):  # keep test runs out of the repository
        parameters["run_dir"] = str(tmp_path / "run")
    papermill.execute_notebook(
        str(path), str(tmp_path / path.name), kernel_name="python3", cwd=str(path.parent),
        parameters=parameters,
        progress_bar=False, execution_timeout=300)
    assert json.loads(result_path.read_text()), f"{path.name} recorded no metrics"
    if path.name == "03_train.ipynb":  # issue 14, item 5: one seed per prompt, so prompts
        # never share a continuation (they did with seed=0 for all on a weak model)
        executed = nbformat.read(tmp_path / path.name, as_version=4)
        cell = next(c for c in executed.cells if "generate(" in c.source)
        samples = "".join(o.get("text", "") for o in cell.outputs).splitlines()
        assert len(samples) == 3 and len(set(samples)) == 3, samples
