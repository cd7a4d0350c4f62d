import subprocess
import sys
from pathlib import Path

from palmlite import cli, presets


def test_presets_table_lists_every_preset_with_its_counts(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in presets.names():
        assert name in out
    row = next(line for line in out.splitlines() if line.startswith("gpt2-124m"))
    assert "124.44M" in row
    row = next(line for line in out.splitlines() if line.startswith("palm-8b"))
    assert "8.63B" in row and "32.77kB" in row  # 2 x 32 layers x 1 kv head x 256 x 2 bytes


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "palmlite.cli", "presets"],
                            capture_output=True, text=True, check=True)
    assert "palm-540b" in result.stdout


def test_unknown_command_exits_non_zero():
    result = subprocess.run([sys.executable, "-m", "palmlite.cli", "trian"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "invalid choice" in result.stderr


def test_train_mesh_errors_name_the_problem(capsys):
    """`--mesh` is checked before any data is read: bad syntax, or more devices than exist."""
    base = ["train", "--preset", "tiny", "--steps", "1", "--out", "unused-run-dir"]
    assert cli.main(base + ["--mesh", "data=2,model=2"]) == 2
    assert "TrainConfig.mesh='data=2,model=2' is invalid: unknown axis ['model']" in \
        capsys.readouterr().err
    assert cli.main(base + ["--mesh", "data=2"]) == 2  # this process has one CPU device
    assert "needs 2 devices but 1 are available" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly():
    """`palmlite presets | true`: the reader is gone before palmlite writes (it exits at
    once, palmlite takes a second to import); no BrokenPipe traceback, status 0."""
    cmd = f"{sys.executable} -m palmlite.cli presets | true"
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True,
                         timeout=120)
    assert out.stderr == "" and out.returncode == 0


def test_a_zero_token_budget_is_refused_not_ignored(capsys):
    """Issue 13, item 12: `--tokens 0` was dropped in favour of --steps."""
    args = ["train", "--preset", "tiny", "--tokens", "0", "--out", "unused-run-dir"]
    assert cli.main(args) == 2
    assert "TrainConfig.tokens=0 is invalid: expected a positive integer" in capsys.readouterr().err


def _bad_inputs(tmp):
    """Issue 13, item 11: (files to make, arguments) for each bad input."""
    (tmp / "x.model").write_text("garbage")
    (tmp / "afile").write_text("")
    for name, text in (("empty", "{}"), ("torn", '{"model": {"d_')):
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_text(text)
    train = ["train", "--preset", "tiny", "--steps", "1", "--tokenizer", "bytes"]
    return {
        "a garbage tokenizer model": ([*train, "--tokenizer", str(tmp / "x.model"), "--out", str(tmp / "r")],
                                      "is not a SentencePiece model"),
        "arithmetic:n=abc": ([*train, "--corpus", "arithmetic:n=abc", "--out", str(tmp / "r")],
                             "n='abc' is invalid: expected an integer"),
        "arithmetic:max_digits=-3": ([*train, "--corpus", "arithmetic:max_digits=-3", "--out", str(tmp / "r")],
                                     "digits (1, -3) are invalid"),
        "cuDNN attention on a CPU": ([*train, "--set", "train.precision=bf16", "--set",
                                     "model.attention_impl=cudnn", "--out", str(tmp / "r")],
                                    "attention_impl='cudnn' needs an NVIDIA GPU"),
        "--out is a file": ([*train, "--out", str(tmp / "afile")], "is a file, not a run directory"),
        "config.json of {}": (["generate", "--run", str(tmp / "empty"), "--prompt", "x"],
                              "is not a palmlite run's config: it lacks ['model', 'train', 'data']"),
        "a torn config.json": (["generate", "--run", str(tmp / "torn"), "--prompt", "x"],
                               "config.json' is not valid JSON"),
        "generate --seed 2**70": (["generate", "--run", str(tmp / "empty"), "--prompt", "x",
                                   "--seed", str(2**70)], "seed=1180591620717411303424 is invalid"),
        "train.seed=2**64": ([*train, "--set", f"train.seed={2**64}", "--out", str(tmp / "r")],
                             "TrainConfig.seed=18446744073709551616 is invalid"),
        "sweep --workers 0": (["sweep", str(Path(__file__).resolve().parents[1] / "studies" /
                                            "quick.yaml"), "--workers", "0", "--dry-run"],
                              "workers=0 is invalid: expected an integer >= 1"),
    }


def test_every_bad_input_gets_one_clear_line_and_no_traceback(tmp_path, capsys):
    for name, (args, message) in _bad_inputs(tmp_path).items():
        assert cli.main(args) == 2, name
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
    assert not (tmp_path / "r" / "checkpoints").exists()  # refused before any training


def test_a_missing_optional_dependency_says_what_to_install(capsys, monkeypatch, tmp_path):
    import builtins
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    args = ["train", "--preset", "tiny", "--steps", "1", "--corpus", "hf:wikitext", "--out",
            str(tmp_path / "run")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "`pip install datasets`" in err and len(err.splitlines()) == 1


def test_ctrl_c_during_training_says_where_and_how_to_resume(tmp_path):
    """Issue 14, item 4: SIGINT mid-run exits 130 with one line, no traceback, naming the
    step and the command that resumes; that command then continues the run."""
    import os
    import signal
    import shlex
    import time
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--tokenizer", "bytes", "--steps", "100000", "--out",
            str(run), "--set", "train.batch_size=2", "--set", "train.seq_len=16",
            "--set", "train.checkpoint_every=5", "--set", "train.log_every=5", "--quiet"]
    env = dict(os.environ, PALMLITE_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "palmlite.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not any(p.name.isdigit() for p in (run / "checkpoints").glob("*")) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert last.startswith("palmlite train: interrupted near step ") and "newest checkpoint is step" in last
    command = shlex.split(last.split("resume with: ")[1])
    assert command[0] == "palmlite" and command[-1] == "--resume"
    newest = int(last.split("newest checkpoint is step ")[1].split(",")[0])
    command = [w if w != "100000" else str(newest + 10) for w in command[1:]]  # 10 more steps
    resumed = subprocess.run([sys.executable, "-m", "palmlite.cli", *command], env=env,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {newest + 10}: loss" in resumed.stdout


def test_sweep_and_figures_write_under_out(tmp_path, capsys):
    """Issue 14, item 3: a user's runs go to their own folder; the committed results in
    studies/results are the reference (all done) and stay untouched."""
    repo = Path(__file__).resolve().parents[1]
    quick = str(repo / "studies" / "quick.yaml")
    assert cli.main(["sweep", quick, "--dry-run", "--part", "quick-moe", "--out", str(repo)]) == 0
    assert "8 done, 0 to run" in capsys.readouterr().out  # the committed reference is complete
    assert cli.main(["sweep", quick, "--dry-run", "--part", "quick-moe", "--out", str(tmp_path)]) == 0
    assert "0 done, 8 to run" in capsys.readouterr().out
    assert cli.main(["figures", quick, "--part", "quick-moe", "--out", str(tmp_path)]) == 2
    assert str(tmp_path / "studies" / "results" / "quick-moe.jsonl") in capsys.readouterr().err
