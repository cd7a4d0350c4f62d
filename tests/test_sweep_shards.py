"""Sweeps on many machines (issue 15): ``palmlite sweep STUDY --shard I/N`` and ``--merge``."""

import json
import os
import signal
import subprocess
import sys
import time

import nbformat
import pytest

from palmlite import cli
from palmlite.studies import read_results, run_study, write_result
from palmlite.studies.runner import draw_figures, merge_study
from palmlite.studies.shards import in_shard, parse_shard, shard_of


def make_notebook(path, hold=None):
    """A notebook that records y = 10 x + seed without importing palmlite (a kernel starts
    in about a second). It writes ``started-<x>`` with its kernel's pid; with ``hold``, the
    point x = 5 waits while that file exists (so a test can kill it mid-run)."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("x = 1\nseed = 0\nresult_path = None")
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "import json, os, time\n"
        f"open(os.path.join({str(path.parent)!r}, f'started-{{x}}'), 'w').write(str(os.getpid()))\n"
        f"while x == 5 and {str(hold)!r} != 'None' and os.path.exists({str(hold)!r}):\n"
        "    time.sleep(0.1)\n"
        "if result_path:\n"
        "    open(result_path, 'w').write(json.dumps({'y': 10 * x + seed}))")
    nb.cells = [params, body]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def make_spec(tmp_path, xs=(1, 2, 3, 4, 5, 6), hold=None):
    make_notebook(tmp_path / "nb.ipynb", hold)
    spec = tmp_path / "study.yaml"
    spec.write_text(f"name: toy\nnotebook: nb.ipynb\ngrid: {{product: {{x: {list(xs)}}}}}\n")
    return spec


def test_every_point_is_in_exactly_one_shard_and_the_split_is_stable(tmp_path):
    keys = [f"seed={s},x={x}" for s in range(4) for x in range(50)]
    for n in (1, 2, 3, 5, 8, 64):
        owners = [[i for i in range(n) if in_shard(k, (i, n))] for k in keys]
        assert all(len(o) == 1 for o in owners), n
        if n <= 8:
            assert {o[0] for o in owners} == set(range(n))  # 200 keys: no shard left empty
    # Fixed values: a change of the hash would split a running sweep differently on the
    # machines still running the old version.
    assert [shard_of(f"seed=0,x={x}", 3) for x in range(1, 7)] == [2, 0, 1, 0, 1, 1]
    assert shard_of("seed=0,x=1", 8) == 7
    # Not Python's salted hash: another process, another PYTHONHASHSEED, the same split.
    code = ("from palmlite.studies.shards import shard_of\n"
            f"print([shard_of(k, 7) for k in {keys[:40]!r}])")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == [shard_of(k, 7) for k in keys[:40]]


@pytest.mark.parametrize("value", ["3/3", "4/3", "-1/3", "0/0", "1", "a/b", "1/3/2", "1.0/3", ""])
def test_a_bad_shard_is_refused_with_the_allowed_form(tmp_path, capsys, value):
    spec = make_spec(tmp_path)
    assert cli.main(["sweep", str(spec), f"--shard={value}", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--shard {value!r} is invalid: expected I/N with integers 0 <= I < N" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "studies").exists()  # refused before anything ran
    with pytest.raises(ValueError, match="--shard"):
        parse_shard(value)
    assert parse_shard("7/8") == (7, 8) and parse_shard(None) is None


def test_merge_takes_no_run_options(tmp_path, capsys):
    spec = make_spec(tmp_path)
    assert cli.main(["sweep", str(spec), "--merge", "--shard", "0/2", "--dry-run"]) == 2
    assert "--merge gathers the rows of every shard and runs nothing: it takes --part and " \
           "--out, not --shard, --dry-run" in capsys.readouterr().err


def test_dry_run_lists_a_shards_points(tmp_path, capsys):
    spec = make_spec(tmp_path)
    assert cli.main(["sweep", str(spec), "--dry-run", "--shard", "1/3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "study toy: 6 points, shard 1/3: 3 of them, 0 done, 3 to run" in out
    listed = [line.split()[-1] for line in out.splitlines() if line.startswith("  todo")]
    assert listed == ["seed=0,x=3", "seed=0,x=5", "seed=0,x=6"]


def _row(x, status="ok", finished="2025-01-01T00:00:00Z", **extra):
    return dict(point=f"seed=0,x={x}", study="toy", params={"x": x, "seed": 0}, source="nb.ipynb",
                status=status, finished=finished, metrics={"y": 10 * x}, **extra)


def _shard_file(tmp_path, row):
    folder = tmp_path / "studies/results/toy.shards"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{row['point']}.json").write_text(json.dumps(row))


def test_merge_keeps_one_row_per_point_by_its_rule(tmp_path, capsys):
    """Current settings first, then ok over failed, then the latest finish; repeating the
    merge changes nothing; an unsharded sweep and ``figures`` merge first."""
    spec = make_spec(tmp_path, xs=(1, 2, 3, 4, 5))
    results = tmp_path / "studies/results/toy.jsonl"
    _shard_file(tmp_path, _row(1))                                        # only in a shard
    write_result(results, _row(2, finished="2025-01-01T00:00:00Z", run="old"))
    _shard_file(tmp_path, _row(2, finished="2025-01-02T00:00:00Z", run="new"))  # newer wins
    write_result(results, _row(3))
    _shard_file(tmp_path, _row(3, status="failed", finished="2025-02-01T00:00:00Z"))  # ok wins
    stale = _row(4, finished="2025-03-01T00:00:00Z")
    stale["params"] = {"x": 4, "seed": 0, "mode": "old"}
    write_result(results, stale)
    _shard_file(tmp_path, _row(4, status="failed", finished="2025-01-01T00:00:00Z"))  # current
    write_result(results, _row(9))                           # no longer in the grid: kept
    assert draw_figures(spec, root=tmp_path) == []  # `palmlite figures` merged first
    rows = {r["point"]: r for r in read_results(results)}
    assert sorted(rows) == [f"seed=0,x={x}" for x in (1, 2, 3, 4, 9)]
    assert rows["seed=0,x=2"]["run"] == "new" and rows["seed=0,x=3"]["status"] == "ok"
    assert rows["seed=0,x=4"]["status"] == "failed" and "mode" not in rows["seed=0,x=4"]["params"]
    before = results.read_text()
    assert merge_study(spec, root=tmp_path) == [] and results.read_text() == before
    assert "0 row(s) merged" in capsys.readouterr().out
    _shard_file(tmp_path, _row(5))  # a shard finished one more: a plain sweep merges it
    assert run_study(spec, root=tmp_path, only=["x=5"]) == 0
    assert "1 points, 1 done, 0 to run" in capsys.readouterr().out
    assert read_results(results)[-1]["point"] == "seed=0,x=5"
    assert len(read_results(results)) == 6


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.slow
def test_three_shards_in_three_processes_one_killed_and_rerun_then_merged(tmp_path, capsys):
    """Shards 0/3, 1/3 and 2/3 of a 6-point study run as three processes (their points:
    x = 2, 4 | 3, 5, 6 | 1). Shard 1 is killed (SIGKILL, its process group) while x = 5
    runs: x = 3 has its file, x = 5 none. Rerun, it runs x = 5 and 6 only. ``--merge``
    then writes each point once, all ok, also where the results file already held another
    row of the point (a second machine's run, older; a failure)."""
    hold = tmp_path / "hold"
    hold.touch()
    spec = make_spec(tmp_path, hold=hold)
    shards = tmp_path / "studies/results/toy.shards"
    procs = [subprocess.Popen([sys.executable, "-m", "palmlite.cli", "sweep", "study.yaml",
                               "--shard", f"{i}/3"], cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    try:
        assert procs[0].wait(timeout=120) == 0 and procs[2].wait(timeout=120) == 0
        deadline = time.time() + 120
        while not (tmp_path / "started-5").exists():
            assert time.time() < deadline and procs[1].poll() is None, procs[1].stderr.read()
            time.sleep(0.1)
        os.killpg(procs[1].pid, signal.SIGKILL)  # x = 5 is running, held
        procs[1].wait()
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    kernel = int((tmp_path / "started-5").read_text())
    assert sorted(p.name for p in shards.iterdir()) == [f"seed=0,x={x}.json" for x in (1, 2, 3, 4)]
    assert not (tmp_path / "studies/results/toy.jsonl").exists()  # shards write only their files
    assert not (tmp_path / "figures").exists()
    hold.unlink()
    capsys.readouterr()
    assert run_study(spec, root=tmp_path, shard="1/3") == 0  # the killed shard, rerun
    assert "shard 1/3: 3 of them, 1 done, 2 to run" in capsys.readouterr().out
    assert len(list(shards.glob("*.json"))) == 6
    # Another machine ran x = 2 earlier, and x = 4 failed somewhere: both in the results file.
    results = tmp_path / "studies/results/toy.jsonl"
    twice = json.loads((shards / "seed=0,x=2.json").read_text())
    write_result(results, dict(twice, finished="2000-01-01T00:00:00Z", metrics={"y": -1}))
    write_result(results, dict(twice, point="seed=0,x=4", params={"x": 4, "seed": 0},
                               status="failed", finished="2999-01-01T00:00:00Z"))
    assert cli.main(["sweep", str(spec), "--merge", "--out", str(tmp_path)]) == 0
    rows = read_results(results)
    assert sorted(r["point"] for r in rows) == [f"seed=0,x={x}" for x in range(1, 7)]
    assert all(r["status"] == "ok" for r in rows)
    assert {r["point"]: r["metrics"]["y"] for r in rows} == {f"seed=0,x={x}": 10 * x
                                                            for x in range(1, 7)}
    merged = results.read_text()
    assert cli.main(["sweep", str(spec), "--merge", "--out", str(tmp_path)]) == 0
    assert results.read_text() == merged  # a repeated merge changes nothing
    capsys.readouterr()
    assert run_study(spec, root=tmp_path, dry_run=True) == 0
    assert "6 points, 6 done, 0 to run" in capsys.readouterr().out
    if _alive(kernel):  # the killed shard's kernel, if it outlived it (not under test here)
        os.kill(kernel, signal.SIGKILL)
