"""The install descriptions agree: environment.yml (conda-forge) lists what pyproject.toml's
dependencies and [dev] extra list, with the same version bounds."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"matplotlib": "matplotlib-base"}  # conda-forge's name for the same package


def _split(requirement: str) -> tuple[str, str]:
    name, bounds = re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*(.*)", requirement).groups()
    return name.lower(), bounds.replace(" ", "")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = dict(_split(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = dict(_split(d) for d in env["dependencies"] if isinstance(d, str))
    assert "conda-forge" in env["channels"]
    for name, bounds in wanted.items():
        assert conda.get(CONDA_NAMES.get(name, name)) == bounds, (name, bounds)
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip == ["-e ."]


def test_the_install_has_jupyterlab_and_widget_progress_bars():
    """Issue 14, item 1: the notebooks are the main interface; `make lab` needs no extra
    install, and tqdm.auto draws widgets (not text under an "IProgress not found" box)."""
    import ipywidgets
    import jupyterlab
    from tqdm.notebook import IProgress
    assert IProgress is not None and jupyterlab.__version__ >= "4" and ipywidgets.__version__ >= "8"
