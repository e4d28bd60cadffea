"""The bin/ programs as a user runs them: --help explains every flag; bad input gives a clear error."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = ["generate", "prepare", "profile", "solve_placement", "train_predictors", "train_default_model", "eval", "bench"]


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_documents_every_flag(program):
    out = _run(os.path.join("bin", program), "--help")
    assert out.returncode in (0, 1), out.stderr  # absl exits 1 after printing --help
    text = out.stdout
    assert text.splitlines()[0].strip(), "the program's docstring heads --help"
    flag_lines = [l for l in text.splitlines() if re.match(r"^  --[\w\[\]]+:", l)]
    assert flag_lines, text
    for line in flag_lines:  # absl prints "--name: help text"; a bare "--name:" has none
        assert line.split(":", 1)[1].strip(), f"{program}: flag without help text: {line}"


def test_generate_missing_model_is_a_clear_error(tmp_path):
    out = _run("bin/generate", "--model", str(tmp_path / "nope"), "--max_new_tokens", "2")
    assert out.returncode == 2
    assert "model folder not found" in out.stderr


def test_generate_streams_text_from_the_default_model():
    out = _run("bin/generate", "--prompt", "ROMEO:", "--max_new_tokens", "12", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ROMEO:") and len(out.stdout) > len("ROMEO:") + 5
    assert "decode" in out.stderr and "tok/s" in out.stderr
