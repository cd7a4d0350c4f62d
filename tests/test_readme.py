"""The README's command blocks run as written, in order, from a fresh directory.

Every fenced block is ```python, ```bash or ```text. The python and bash blocks become one
script, in the README's order (a python block may use what an earlier one defined, as in a
reader's session; a bash line calls the `palmlite` console script's ``cli.main``), which
must finish without an error. What is changed: training steps, divided by 100 (at least 2), so the whole
README runs in about a minute; blocks that cannot run here carry a
``<!-- readme-test: skip (why) -->`` line.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: skip \((?P<why>[^)]+)\) -->\n)?"
                   r"^```(?P<lang>\w*)\n(?P<body>.*?)^```$", re.S | re.M)
LANGUAGES = ("python", "bash", "text")


def blocks(text: str) -> list[dict]:
    return [m.groupdict() for m in BLOCK.finditer(text)]


def fewer_steps(code: str) -> str:
    """--steps N / steps=N -> N // 100 (at least 2): the README's runs, shortened."""
    short = lambda m: f"{m[1]}{max(2, int(m[2]) // 100)}"
    return re.sub(r"(--steps |\bsteps=)(\d+)", short, code)


def shell_lines(body: str) -> list[list[str]]:
    """The commands of a bash block, continuations joined, comments dropped."""
    joined = body.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines()
            if shlex.split(line, comments=True)]


def script(text: str) -> str:
    """One Python script running the README's blocks in order."""
    parts = ["from palmlite import cli as _cli",
             "def _palmlite(*args):  # the console script's entry point, in this process",
             "    print('$ palmlite', *args, flush=True)",
             "    assert _cli.main(list(args)) == 0, args"]
    for block in blocks(text):
        if block["why"] or block["lang"] == "text":
            continue
        body = fewer_steps(block["body"])
        if block["lang"] == "python":
            parts.append(body)
            continue
        for words in shell_lines(body):
            assert words[0] == "palmlite", f"a bash block runs palmlite only, got {words}"
            parts.append(f"_palmlite(*{words[1:]!r})")
    return "\n".join(parts) + "\n"


def test_every_block_says_what_it_is():
    found = blocks(README.read_text())
    assert found and all(b["lang"] in LANGUAGES for b in found), \
        [b["body"][:40] for b in found if b["lang"] not in LANGUAGES]
    assert README.read_text().count("```") == 2 * len(found)  # no block missed by the pattern


def test_fewer_steps_shortens_runs_only():
    assert fewer_steps("--steps 300 --max-new-tokens 60, steps=600)") == \
        "--steps 3 --max-new-tokens 60, steps=6)"
    assert fewer_steps("--steps 50") == "--steps 2"


@pytest.mark.slow
def test_the_readme_runs_as_written(tmp_path):
    (tmp_path / "readme.py").write_text(script(README.read_text()))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               MPLBACKEND="Agg")  # the mesh examples want 8 devices, as the README says
    out = subprocess.run([sys.executable, "readme.py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "runs" / "small" / "config.json").exists()
