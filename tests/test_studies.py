import json
from pathlib import Path

import nbformat
import pytest

from palmlite.studies import load_study, read_results, run_study, write_result


def make_notebook(path):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("x = 1\ny = 0\nmode = 'a'\nblock = 'parallel'\n"
                                       "steps = 1\na = b = d = L = None\nseed = 0\n"
                                       "result_path = None")
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "from palmlite.studies import record\n"
        "if x == 3:\n    raise ValueError('boom at x=3')\n"
        "record({'y': x * 10 + seed, 'mode': mode}, result_path)")
    nb.cells = [nbformat.v4.new_markdown_cell("# test"), params, body]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def make_study(tmp_path, text):
    make_notebook(tmp_path / "nb.ipynb")
    spec = tmp_path / "study.yaml"
    spec.write_text(text)
    return spec


SPEC = """
name: toy
notebook: nb.ipynb
parameters: {mode: b}
grid:
  product: {x: [1, 2]}
seeds: [0, 5]
"""


def test_grid_is_product_times_zip_times_seeds(tmp_path):
    spec = make_study(tmp_path, """
name: g
notebook: nb.ipynb
parameters: {steps: 10}
grid:
  product: {a: [1, 2], b: [x, y]}
  zip: {d: [64, 128], L: [2, 4]}
seeds: [0, 1]
""")
    study = load_study(spec)
    points = study.points()
    assert len(points) == 2 * 2 * 2 * 2
    assert {(p["d"], p["L"]) for p in points} == {(64, 2), (128, 4)}  # zipped, not crossed
    assert all(p["steps"] == 10 for p in points)
    assert len({study.key(p) for p in points}) == len(points)


@pytest.mark.parametrize("text,match", [
    ("name: x\nnotebook: nb.ipynb\ngrid: {zip: {a: [1, 2], b: [1]}}\n", "equal lengths"),
    ("name: x\nnotebook: nb.ipynb\nbogus: 1\n", "unknown field"),
    ("name: x\nnotebook: nb.ipynb\nseeds: []\n", "seeds"),
    ("name: x\nnotebook: nb.ipynb\ngrid: {product: {seed: [1]}}\n", "twice"),
    ("notebook: nb.ipynb\n", "name"),
    # Issue 13, item 10: every field error names the file and the field.
    ("name: x\nnotebook: nb.ipynb\nseeds: [true]\n", "field 'seeds' is \\[True\\]"),
    ("name: x\nnotebook: nb.ipynb\nseeds: [-1]\n", "field 'seeds'"),
    ("name: x\nnotebook: nb.ipynb\ntimeout_s: 0\n", "field 'timeout_s' is 0"),
    ("name: x\nnotebook: nb.ipynb\ntimeout_s: -5\n", "field 'timeout_s' is -5"),
    ("name: x\nnotebook: nb.ipynb\ntimeout_s: abc\n", "field 'timeout_s' is 'abc'"),
    ("name: x\nnotebook: nb.ipynb\nparameters: [1, 2]\n", "field 'parameters' must be a mapping"),
    ("name: x\nnotebook: nb.ipynb\ndescription: [1]\n", "field 'description'"),
    ("name: x\nnotebook: nb.ipynb\ngrid: {product: {x: [1\n", "not a valid study spec"),
    ("!!python/object/apply:os.system ['echo hi']\n", "not a valid study spec"),
    # Issue 13, item 9: two points with one key would share a row and a notebook.
    ("name: x\nnotebook: nb.ipynb\nseeds: [0, 0]\n", "same key 'seed=0'"),
    ("name: x\nnotebook: nb.ipynb\ngrid: {product: {x: [1, '1']}}\n", "same key"),
    ("name: x\nnotebook: nb.ipynb\ngrid: {product: {mode: [a/b, a_b]}}\n", "same key"),
    ("name: x\nnotebook: nb.ipynb\ngrid: {zip: {x: [1, 1], y: [2, 2]}}\n", "same key"),
])
def test_bad_specs(tmp_path, text, match):
    with pytest.raises(ValueError, match=match) as error:
        load_study(make_study(tmp_path, text))
    assert str(tmp_path / "study.yaml") in str(error.value)  # the file, too
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_study(tmp_path / "missing.yaml")


def test_results_file_has_one_line_per_point(tmp_path):
    path = tmp_path / "r.jsonl"
    write_result(path, {"point": "a", "status": "failed"})
    write_result(path, {"point": "b", "status": "ok"})
    write_result(path, {"point": "a", "status": "ok"})
    assert [(r["point"], r["status"]) for r in read_results(path)] == [("b", "ok"), ("a", "ok")]


@pytest.mark.slow
def test_sweep_runs_resumes_and_records_failures(tmp_path, capsys):
    spec = make_study(tmp_path, SPEC.replace("[1, 2]", "[1, 2, 3]"))
    failed = run_study(spec, workers=2, root=tmp_path)
    assert failed == 2  # x=3 at both seeds
    out = capsys.readouterr().out  # a line per point, and a bar over the points
    assert "  ok     seed=5,x=2  (" in out and "  failed seed=0,x=3  (ValueError: boom at x=3" in out
    assert "6/6" in out and "failed=2" in out
    rows = {r["point"]: r for r in read_results(tmp_path / "studies/results/toy.jsonl")}
    assert len(rows) == 6
    assert rows["seed=5,x=2"]["metrics"] == {"y": 25, "mode": "b"}
    bad = rows["seed=0,x=3"]
    assert bad["status"] == "failed" and "boom at x=3" in bad["error"]
    assert (tmp_path / "studies/runs/toy/seed=0,x=3.ipynb").exists()
    # A re-run skips the completed points and retries only the failures.
    capsys.readouterr()
    assert run_study(spec, only=["x=1"], root=tmp_path) == 0
    assert "2 done, 0 to run" in capsys.readouterr().out
    assert run_study(spec, dry_run=True, root=tmp_path) == 0
    assert "4 done, 2 to run" in capsys.readouterr().out
    lines = (tmp_path / "studies/results/toy.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(l)["point"] for l in lines)


@pytest.mark.slow
def test_a_point_whose_fixed_parameters_or_notebook_changed_runs_again(tmp_path, capsys):
    """A point's identity is all its parameters and its notebook, not only its key: after
    the spec's fixed parameters change, the old row is stale (--dry-run says what changed)
    and the point runs again."""
    spec = make_study(tmp_path, "name: toy\nnotebook: nb.ipynb\nparameters: {mode: b}\n"
                                "grid: {product: {x: [1]}}\nseeds: [0]\n")
    assert run_study(spec, root=tmp_path) == 0
    capsys.readouterr()
    spec.write_text(spec.read_text().replace("mode: b", "mode: c"))
    assert run_study(spec, dry_run=True, root=tmp_path) == 0
    out = capsys.readouterr().out
    assert "0 done, 1 to run" in out and "stale seed=0,x=1  (mode: 'b' -> 'c')" in out
    assert run_study(spec, root=tmp_path) == 0
    rows = read_results(tmp_path / "studies/results/toy.jsonl")
    assert [r["metrics"]["mode"] for r in rows] == ["c"]
    (tmp_path / "other.ipynb").write_bytes((tmp_path / "nb.ipynb").read_bytes())
    spec.write_text(spec.read_text().replace("nb.ipynb", "other.ipynb"))
    capsys.readouterr()
    assert run_study(spec, dry_run=True, root=tmp_path) == 0
    assert "notebook: 'nb.ipynb' -> 'other.ipynb'" in capsys.readouterr().out


def test_figures_are_drawn_from_rows_with_a_provenance_caption(tmp_path):
    from palmlite.studies.figures import caption, make_figures
    spec = make_study(tmp_path, "name: abl\nnotebook: nb.ipynb\ngrid: {product: {block: [a, b]}}\n"
                                "seeds: [0, 1]\nfigures: [ablation, loss_curves]\n")
    study = load_study(spec)
    rows = [dict(point=study.key(p), status="ok", params=p, metrics=dict(
        val_bits_per_byte=1.0 + 0.1 * (p["block"] == "b") + 0.01 * p["seed"],
        val_loss=2.0 + 0.1 * (p["block"] == "b") + 0.01 * p["seed"],
        device={"kind": "cpu"}, corpus={"name": "pystdlib", "fingerprint": "abcdef1234567"},
        history=[{"tokens": 100, "val_loss": 3.0}, {"tokens": 200, "val_loss": 2.5}]))
        for p in study.points()]
    rows.append(dict(point="x", status="failed", params={}, metrics={}))
    files = make_figures(study, rows, tmp_path / "figures")
    assert sorted(f.name for f in files) == ["abl_ablation.png", "abl_ablation.svg",
                                             "abl_loss_curves.png", "abl_loss_curves.svg"]
    assert all(f.stat().st_size > 1000 for f in files)
    assert "cpu" in caption(rows[:4]) and "pystdlib (abcdef1234)" in caption(rows[:4])
    with pytest.raises(ValueError, match="unknown figure"):
        load_study(make_study(tmp_path, "name: x\nnotebook: nb.ipynb\nfigures: [nope]\n"))


SUITE = """
name: suite
parts:
  - {name: one, notebook: nb.ipynb, grid: {product: {x: [1, 2]}}, figures: {ablation: first}}
  - {name: two, notebook: nb.ipynb, parameters: {mode: c}, grid: {product: {y: [1]}}}
"""


def test_a_spec_with_parts_is_several_studies(tmp_path):
    from palmlite.studies import load_studies
    one, two = load_studies(make_study(tmp_path, SUITE))
    assert (one.name, two.name) == ("one", "two")
    assert one.figures == {"ablation": "first"} and two.figures == {}
    assert [p["x"] for p in one.points()] == [1, 2] and two.points() == [{"mode": "c", "y": 1, "seed": 0}]
    with pytest.raises(ValueError, match="parts"):
        load_study(tmp_path / "study.yaml")
    for text, match in [("name: s\nparts: []\n", "non-empty"),
                        ("name: s\nnotebook: nb.ipynb\nparts: [{name: a, notebook: nb.ipynb}]\n", "beside"),
                        ("name: s\nparts: [{name: a, notebook: nb.ipynb}, {name: a, notebook: nb.ipynb}]\n",
                         "unique")]:
        with pytest.raises(ValueError, match=match):
            load_studies(make_study(tmp_path, text))


def test_only_must_name_a_parameter_of_some_part(tmp_path, capsys):
    spec = make_study(tmp_path, SUITE)
    assert run_study(spec, only=["y=1"], dry_run=True, root=tmp_path) == 0
    out = capsys.readouterr().out
    assert "study one: 0 points" in out and "study two: 1 points" in out
    with pytest.raises(ValueError, match="no parameter 'z'"):
        run_study(spec, only=["z=1"], dry_run=True, root=tmp_path)


def test_part_selects_parts_by_name(tmp_path, capsys):
    from palmlite.studies import draw_figures
    spec = make_study(tmp_path, SUITE)
    assert run_study(spec, parts=["two"], dry_run=True, root=tmp_path) == 0
    out = capsys.readouterr().out
    assert "study two: 1 points" in out and "study one" not in out
    for call in (lambda: run_study(spec, parts=["three"], dry_run=True, root=tmp_path),
                 lambda: draw_figures(spec, root=tmp_path, parts=["three"])):
        with pytest.raises(ValueError, match=r"--part 'three' .* its parts: \['one', 'two'\]"):
            call()
    with pytest.raises(FileNotFoundError, match="two.jsonl"):  # only the named part is read
        draw_figures(spec, root=tmp_path, parts=["two"])


def test_figures_are_redrawn_from_results_alone(tmp_path):
    from palmlite.studies import draw_figures
    spec = make_study(tmp_path, SUITE)
    with pytest.raises(FileNotFoundError, match="one.jsonl"):
        draw_figures(spec, root=tmp_path)
    from palmlite.studies import load_studies
    for study in load_studies(spec):
        for p in study.points():
            write_result(tmp_path / f"studies/results/{study.name}.jsonl", dict(
                point=study.key(p), status="ok", params=p, source="nb.ipynb",
                metrics={"val_bits_per_byte": 1.0 + p.get("x", 0), "val_loss": 2.0 + p.get("x", 0)}))
    files = draw_figures(spec, root=tmp_path)
    assert sorted(f.name for f in files) == ["first.png", "first.svg"]
    # Rows from other settings stay in the file but out of the figure: none current, none drawn.
    spec.write_text(SUITE.replace("x: [1, 2]", "x: [3]"))
    assert draw_figures(spec, root=tmp_path) == []


@pytest.mark.slow
def test_a_killed_sweep_loses_nothing_and_duplicates_nothing(tmp_path):
    """Kill a sweep (its whole process group) while a point runs; the re-run keeps the
    finished point, reruns the killed one and writes each point exactly once."""
    import os
    import signal
    import subprocess
    import sys
    import time
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("x = 1\nseed = 0\nresult_path = None")
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "import os, time\nfrom palmlite.studies import record\n"
        f"while x == 2 and os.path.exists({str(tmp_path / 'hold')!r}):\n    time.sleep(0.2)\n"
        "record({'y': x}, result_path)")
    nb.cells = [params, body]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "nb.ipynb")
    (tmp_path / "study.yaml").write_text("name: k\nnotebook: nb.ipynb\ngrid: {product: {x: [1, 2, 3]}}\n")
    (tmp_path / "hold").touch()
    results = tmp_path / "studies/results/k.jsonl"
    sweep = subprocess.Popen([sys.executable, "-m", "palmlite.cli", "sweep", "study.yaml"],
                             cwd=tmp_path, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (results.exists() and results.read_text().count("\n") == 1):
        assert time.time() < deadline and sweep.poll() is None, "the first point never finished"
        time.sleep(0.2)
    time.sleep(1)  # the second point is now running (held)
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.wait()
    assert [r["point"] for r in read_results(results)] == ["seed=0,x=1"]
    (tmp_path / "hold").unlink()
    assert run_study(tmp_path / "study.yaml", root=tmp_path) == 0
    rows = read_results(results)
    assert sorted(r["point"] for r in rows) == ["seed=0,x=1", "seed=0,x=2", "seed=0,x=3"]
    assert {r["metrics"]["y"] for r in rows} == {1, 2, 3}


@pytest.mark.slow
def test_workers_and_kernels_die_with_a_killed_sweep(tmp_path):
    """kill -9 of the sweep process alone (not its group): its worker and the worker's kernel
    exit too, instead of finishing the point and taking the next (issue 13)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("x = 1\nseed = 0\nresult_path = None")
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "import os, time\nfrom pathlib import Path\n"
        f"Path({str(tmp_path)!r}, f'pid{{x}}').write_text(f'{{os.getpid()}} {{os.getppid()}}')\n"
        "time.sleep(600 if x == 1 else 0)")
    nb.cells = [params, body]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "nb.ipynb")
    (tmp_path / "study.yaml").write_text("name: d\nnotebook: nb.ipynb\ngrid: {product: {x: [1, 2]}}\n")
    sweep = subprocess.Popen([sys.executable, "-m", "palmlite.cli", "sweep", "study.yaml"],
                             cwd=tmp_path, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "pid1").exists():
        assert time.time() < deadline and sweep.poll() is None, "the first point never started"
        time.sleep(0.2)
    kernel, worker = map(int, (tmp_path / "pid1").read_text().split())
    os.kill(sweep.pid, signal.SIGKILL)
    sweep.wait()
    deadline = time.time() + 30
    while any(_alive(pid) for pid in (kernel, worker)) and time.time() < deadline:
        time.sleep(0.2)
    alive = [pid for pid in (kernel, worker) if _alive(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "the worker or its kernel outlived the sweep"
    assert not (tmp_path / "pid2").exists()  # nobody took the next point


def _alive(pid: int) -> bool:
    import os
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.parametrize("spec", sorted((Path(__file__).parent.parent / "studies").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_study_sets_only_parameters_its_notebook_has(spec):
    """papermill only warns about an unknown parameter; a typo in a study would silently
    run the notebook's default instead."""
    from palmlite.studies import load_studies
    for study in load_studies(spec):
        cell = next(c for c in nbformat.read(study.notebook, as_version=4).cells
                    if "parameters" in c.metadata.get("tags", []))
        names = {line.split("=")[0].strip() for line in cell.source.splitlines() if "=" in line}
        unknown = {k for p in study.points() for k in p} - names
        assert not unknown, f"{spec.name}: {study.name} sets {sorted(unknown)} unknown to {study.notebook.name}"


@pytest.mark.slow
def test_an_isoflop_sweep_through_papermill_hits_the_compilation_cache(tmp_path, monkeypatch):
    """Notebook 04 at one FLOP budget, two sizes x two seeds, from an empty cache: the
    budget picks each model and its tokens; a size's second seed loads its compiled train
    step from the persistent cache (counted in the results, not timed); each point reports
    its training and other seconds; the IsoFLOP figure draws from the results."""
    monkeypatch.setenv("PALMLITE_CACHE", str(tmp_path / "cache"))
    notebook = Path(__file__).parent.parent / "notebooks" / "04_ablation.ipynb"
    spec = tmp_path / "iso.yaml"
    spec.write_text(f"""
name: iso
notebook: {notebook}
parameters: {{flops_budget: 1.0e+9, tokenizer: bytes, batch_size: 4, seq_len: 32}}
grid:
  product: {{size_index: [-2, 2]}}
seeds: [0, 1]
figures: {{isoflop: iso}}
""")
    assert run_study(spec, root=tmp_path) == 0
    rows = {r["point"]: r for r in read_results(tmp_path / "studies/results/iso.jsonl")}
    small, large = rows["seed=0,size_index=-2"], rows["seed=0,size_index=2"]
    assert small["metrics"]["params"] < large["metrics"]["params"]
    assert small["metrics"]["tokens"] > large["metrics"]["tokens"]  # same budget: fewer tokens
    for r in rows.values():
        C = 6 * r["metrics"]["params"] * r["metrics"]["tokens"]
        assert C == pytest.approx(1e9, rel=0.1)  # tokens rounded to whole batches
        assert r["seconds_training"] > 0 and r["seconds_other"] > 0
        assert r["seconds_training"] + r["seconds_other"] == pytest.approx(r["duration_s"])
    first, second = rows["seed=0,size_index=-2"], rows["seed=1,size_index=-2"]
    assert first["metrics"]["compilation_cache"]["hits"] < second["metrics"]["compilation_cache"]["hits"]
    assert (tmp_path / "figures" / "iso.png").exists()


@pytest.mark.parametrize("reuse", [True, False])
def test_a_worker_reuses_its_kernel_with_an_empty_namespace(tmp_path, reuse, capfd, monkeypatch):
    """One worker, three points: with kernel reuse all run in one kernel process, yet no
    point sees the previous point's variables (the namespace is reset in between), and the
    results equal those of a kernel per point. The kernels talk over Unix sockets in a
    private directory (removed afterwards), so they print no TCP warning."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # where the spawned worker's sockets go
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("x = 1\nseed = 0\nresult_path = None")
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "import os\nfrom palmlite.studies import record\n"
        "leaked = 'previous_x' in globals()\nprevious_x = x\n"
        "record({'y': x * 10 + seed, 'pid': os.getpid(), 'leaked': leaked}, result_path)")
    nb.cells = [params, body]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "nb.ipynb")
    spec = tmp_path / "study.yaml"
    spec.write_text("name: reuse\nnotebook: nb.ipynb\ngrid: {product: {x: [1, 2, 3]}}\nseeds: [0]\n")
    assert run_study(spec, workers=1, root=tmp_path, reuse_kernel=reuse) == 0
    metrics = [r["metrics"] for r in read_results(tmp_path / "studies/results/reuse.jsonl")]
    assert sorted(m["y"] for m in metrics) == [10, 20, 30]
    assert not any(m["leaked"] for m in metrics)
    assert len({m["pid"] for m in metrics}) == (1 if reuse else 3)
    assert "without encryption" not in capfd.readouterr().err
    assert list((tmp_path / "tmp").iterdir()) == []


def test_concurrent_writers_lose_no_rows(tmp_path):
    """Two processes (two sweeps of one study) inserting 200 rows each into one results
    file at the same time, started together: all 400 rows are there, each once. (Without
    the lock, a read-modify-rename race kept 223 of 400 in a trial.)"""
    import subprocess
    import sys
    path = tmp_path / "results.jsonl"
    code = ("import sys, time\nfrom pathlib import Path\n"
            "from palmlite.studies.results import write_result\n"
            "path, name = sys.argv[1], sys.argv[2]\n"
            "Path(f'{path}.{name}.ready').touch()\n"
            "while not all(Path(f'{path}.{n}.ready').exists() for n in 'ab'):\n"
            "    time.sleep(0.001)\n"
            "for i in range(200):\n"
            "    write_result(path, dict(point=f'{name}{i}', status='ok'))\n")
    writers = [subprocess.Popen([sys.executable, "-c", code, str(path), name]) for name in "ab"]
    assert [w.wait(timeout=300) for w in writers] == [0, 0]
    points = [r["point"] for r in read_results(path)]
    assert sorted(points) == sorted(f"{n}{i}" for n in "ab" for i in range(200))


@pytest.mark.parametrize("text, match", [
    # A parameter name papermill would write into the notebook as code (issue 13).
    ("name: s\nnotebook: nb.ipynb\nparameters: {\"x = 1\\nimport os\\n_y\": 0}\n",
     "identifier"),
    ("name: s\nnotebook: nb.ipynb\ngrid: {product: {stepz: [1, 2]}}\n",
     "'stepz' is not set in the parameters cell"),  # a typo would run the defaults
    ("name: /abs/path\nnotebook: nb.ipynb\n", "plain file name"),
    ("name: ../up\nnotebook: nb.ipynb\n", "plain file name"),
    ("name: s\nnotebook: nb.ipynb\nfigures: {ablation: ../../x}\n", "figures.ablation"),
])
def test_specs_cannot_run_code_or_write_outside_their_folders(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        load_study(make_study(tmp_path, text))


@pytest.mark.parametrize("content,match", [
    ("{not json", "not a Jupyter notebook"),
    ('{"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "x = ("}]}',
     "parameters cell is not valid Python"),
    ('{"cells": []}', "no cell tagged 'parameters'"),
])
def test_a_spec_naming_a_broken_notebook_gets_a_clear_error(tmp_path, content, match):
    (tmp_path / "nb.ipynb").write_text(content)
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\nnotebook: nb.ipynb\n")
    with pytest.raises(ValueError, match=match):
        load_study(spec)
    spec.write_text("name: s\nnotebook: ''\n")
    with pytest.raises(ValueError, match="expected a .ipynb file"):
        load_study(spec)
