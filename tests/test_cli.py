import subprocess
import sys

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
