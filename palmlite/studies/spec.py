"""Study specs: a notebook, a grid of parameters and seeds, and the figures they feed.

    name: ablations
    notebook: notebooks/04_ablation.ipynb
    parameters: {preset: tiny, steps: 200}          # the same at every point
    grid:
      product: {block: [parallel, serial], position: [rope, learned]}   # every combination
      zip: {d_model: [64, 128], n_layers: [2, 4]}   # varied together, in step
    seeds: [0, 1]
    figures: [ablation]        # or {ablation: ablations}: figure -> file name in figures/

The points are product × zip × seeds. Each point has a key (``block=serial,seed=1,...``)
that names its executed notebook and its line in the results file. YAML is read with
``yaml.safe_load``: a spec can describe data, never run code.

A spec may instead hold ``parts``: a list of such studies run one after another (each
with its own name, results file and figures), as ``make study`` does with an ablation, a
scaling sweep and an MoE-vs-dense pair in one command.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import keyword
import re
from pathlib import Path
from typing import Any

import yaml

FIELDS = {"name", "notebook", "parameters", "grid", "seeds", "figures", "timeout_s", "description"}
SUITE_FIELDS = {"name", "description", "parts"}


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    notebook: Path
    parameters: dict[str, Any]
    product: dict[str, list]
    zipped: dict[str, list]
    seeds: list[int]
    figures: dict[str, str]  # figure function -> file name (no suffix) in figures/
    timeout_s: int
    path: Path

    def points(self) -> list[dict[str, Any]]:
        """Every grid point's parameters (fixed ones included), in a stable order: the whole
        grid at the first seed, then at the next, so that a sweep's workers compile each
        shape once and its other seeds find it in the compilation cache."""
        names = list(self.product)
        combos = [dict(zip(names, values)) for values in itertools.product(*self.product.values())]
        zipped = [dict(zip(self.zipped, values)) for values in zip(*self.zipped.values())] or [{}]
        return [{**self.parameters, **c, **z, "seed": s}
                for s in self.seeds for c in combos for z in zipped]

    def varied(self) -> list[str]:
        return [*self.product, *self.zipped, "seed"]

    def key(self, point: dict[str, Any]) -> str:
        """``k=v,...`` over the varied parameters: unique per point (checked when the spec is
        read), safe as a file name."""
        text = ",".join(f"{k}={point[k]}" for k in sorted(self.varied()))
        return re.sub(r"[^\w.=,+-]", "_", text)

    def is_done(self, row: dict, point: dict[str, Any]) -> bool:
        """Whether a results row is this point, finished: the same key, every parameter
        (the fixed ones too) and the same notebook. A row whose fixed parameters or
        notebook have since changed in the spec is stale, and the point runs again."""
        return (row.get("status") == "ok" and row.get("point") == self.key(point)
                and row.get("params") == json.loads(json.dumps(point))
                and row.get("source") == self.notebook.name)

    def changes(self, row: dict, point: dict[str, Any]) -> list[str]:
        """What differs between a stale row and the point now, in words (for --dry-run)."""
        now, then = json.loads(json.dumps(point)), row.get("params", {})
        text = lambda params, k: repr(params[k]) if k in params else "unset"
        diffs = [f"{k}: {text(then, k)} -> {text(now, k)}"
                 for k in sorted(set(now) | set(then)) if now.get(k, now) != then.get(k, now)]
        if row.get("source") != self.notebook.name:
            diffs.append(f"notebook: {row.get('source')!r} -> {self.notebook.name!r}")
        return diffs


def load_studies(path: str | Path) -> list[Study]:
    """The studies of a spec file: itself, or each of its ``parts``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"study spec {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:  # malformed, or a tag such as !!python/object (safe_load refuses)
        raise ValueError(f"{path}: not a valid study spec: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a study spec is a mapping, got {type(raw).__name__}")
    if "parts" not in raw:
        return [_parse(raw, path)]
    unknown = sorted(set(raw) - SUITE_FIELDS)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown} beside 'parts'; valid: {sorted(SUITE_FIELDS)}")
    parts = raw["parts"]
    if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) for p in parts):
        raise ValueError(f"{path}: 'parts' must be a non-empty list of study mappings")
    studies = [_parse(part, path) for part in parts]
    names = [s.name for s in studies]
    if len(set(names)) < len(names):
        raise ValueError(f"{path}: part names must be unique, got {names}")
    return studies


def load_study(path: str | Path) -> Study:
    """The one study of a spec file without ``parts``."""
    studies = load_studies(path)
    if len(studies) > 1:
        raise ValueError(f"{path} holds {len(studies)} parts; use load_studies")
    return studies[0]


def _parse(raw: dict, path: Path) -> Study:
    unknown = sorted(set(raw) - FIELDS)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown}; valid fields: {sorted(FIELDS)}")
    for name in ("name", "notebook"):
        if not isinstance(raw.get(name), str):
            raise ValueError(f"{path}: field {name!r} is required and must be a string")
    if not isinstance(raw.get("description", ""), str):
        raise ValueError(f"{path}: field 'description' must be a string")
    notebook = _notebook(raw["notebook"], path)
    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ValueError(f"{path}: field 'parameters' must be a mapping name -> value, got "
                         f"{type(parameters).__name__}")
    product, zipped = _grid(raw.get("grid") or {}, path)
    figures = _figures(raw.get("figures") or {}, raw["name"], path)
    _check_file_names(path, raw["name"], figures)
    _check_parameter_names(path, notebook, [*parameters, *product, *zipped])
    study = Study(name=raw["name"], notebook=notebook, parameters=dict(parameters),
                  product=product, zipped=zipped, seeds=_seeds(raw.get("seeds", [0]), path),
                  figures=figures, timeout_s=_timeout(raw.get("timeout_s", 1800), path), path=path)
    _check_keys_unique(study)
    return study


def _notebook(name: str, path: Path) -> Path:
    """The notebook, relative to the spec's folder (else to the working directory)."""
    if not name.endswith(".ipynb"):
        raise ValueError(f"{path}: field 'notebook' is {name!r}: expected a .ipynb file")
    notebook = Path(name) if Path(name).is_absolute() else (path.parent / name).resolve()
    if not notebook.is_file():
        notebook = Path(name).resolve()
    if not notebook.is_file():
        raise FileNotFoundError(f"{path}: notebook {name!r} does not exist (relative to the "
                                "spec's folder or the working directory)")
    return notebook


def _grid(grid, path: Path) -> tuple[dict, dict]:
    if not isinstance(grid, dict) or set(grid) - {"product", "zip"}:
        raise ValueError(f"{path}: 'grid' takes 'product' and/or 'zip' mappings of lists")
    product, zipped = grid.get("product") or {}, grid.get("zip") or {}
    for kind, table in (("product", product), ("zip", zipped)):
        if not isinstance(table, dict) or not all(isinstance(v, list) and v for v in table.values()):
            raise ValueError(f"{path}: grid.{kind} must map each parameter to a non-empty list")
    if len({len(v) for v in zipped.values()}) > 1:
        raise ValueError(f"{path}: grid.zip lists must have equal lengths, got "
                         f"{ {k: len(v) for k, v in zipped.items()} }")
    overlap = (set(product) & set(zipped)) | ((set(product) | set(zipped)) & {"seed"})
    if overlap:
        raise ValueError(f"{path}: parameter(s) {sorted(overlap)} appear twice in the grid/seeds")
    return product, zipped


def _figures(figures, name: str, path: Path) -> dict[str, str]:
    from palmlite.studies.figures import FIGURES
    if isinstance(figures, list):
        figures = {f: f"{name}_{f}" for f in figures}
    if not isinstance(figures, dict) or not all(isinstance(v, str) for v in figures.values()):
        raise ValueError(f"{path}: 'figures' is a list of figure names or a mapping figure -> file")
    unknown_figures = sorted(set(figures) - set(FIGURES))
    if unknown_figures:
        raise ValueError(f"{path}: unknown figure(s) {unknown_figures}; known: {sorted(FIGURES)}")
    return figures


def _seeds(seeds, path: Path) -> list[int]:
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ValueError(f"{path}: field 'seeds' is {seeds!r}: expected a non-empty list of "
                         "distinct integers >= 0")
    return seeds


def _timeout(timeout_s, path: Path) -> int:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"{path}: field 'timeout_s' is {timeout_s!r}: expected a number of "
                         "seconds > 0 (the longest one point may run)")
    return int(max(1, round(timeout_s)))


def _check_keys_unique(study: Study) -> None:
    """Two points with one key would share a results row and a notebook file: repeated
    values in a list or in ``seeds``, or values equal as text (1 and "1", "a/b" and "a_b")."""
    seen = {}
    for point in study.points():
        key = study.key(point)
        if key in seen:
            varied = lambda p: {k: p[k] for k in study.varied()}
            raise ValueError(f"{study.path}: points {varied(seen[key])} and {varied(point)} of "
                             f"study {study.name!r} have the same key {key!r}: the values of "
                             "each grid list and of 'seeds' must be distinct, also as text")
        seen[key] = point


FILE_NAME = re.compile(r"[A-Za-z0-9][\w.+-]*")


def _check_file_names(path: Path, name: str, figures: dict[str, str]) -> None:
    """A study's name and its figures' names become file names under studies/ and figures/:
    plain names only, so that no spec writes outside them."""
    for field, value in [("name", name)] + [(f"figures.{f}", v) for f, v in figures.items()]:
        if not FILE_NAME.fullmatch(value) or ".." in value:
            raise ValueError(f"{path}: {field} {value!r} is invalid: expected a plain file name "
                             "(letters, digits, _ . + -; no '/' or '..')")


def _check_parameter_names(path: Path, notebook: Path, names: list) -> None:
    """Papermill writes each parameter into the notebook as ``name = value``: a name must be
    an identifier that the notebook's ``parameters`` cell assigns (anything else would run
    as code, or be ignored while the point is recorded as if it had been set)."""
    defined = notebook_parameters(notebook)
    for name in names:
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"{path}: parameter name {name!r} is invalid: expected a Python "
                             "identifier")
        if name not in defined:
            raise ValueError(f"{path}: parameter {name!r} is not set in the parameters cell of "
                             f"{notebook.name}; its parameters: {sorted(defined)}")


def notebook_parameters(notebook: Path) -> set[str]:
    """The names the notebook's cell tagged ``parameters`` assigns."""
    import ast
    import json
    try:
        cells = json.loads(notebook.read_text()).get("cells", [])
        sources = ["".join(c.get("source", "")) for c in cells
                   if "parameters" in c.get("metadata", {}).get("tags", [])]
    except (json.JSONDecodeError, AttributeError, TypeError) as e:
        raise ValueError(f"{notebook}: not a Jupyter notebook ({e})") from None
    if not sources:
        raise ValueError(f"{notebook}: no cell tagged 'parameters' (papermill needs one)")
    try:
        tree = ast.parse(sources[0])
    except SyntaxError as e:
        raise ValueError(f"{notebook}: its parameters cell is not valid Python ({e})") from None
    return {t.id for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(t, ast.Name)}
