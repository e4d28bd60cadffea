"""The bin/ programs as a user runs them: --help explains every flag; bad input gives a clear error."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = ["generate", "serve", "prepare", "profile", "solve_placement", "train_predictors", "train_default_model", "eval",
            "bench"]


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


@pytest.mark.parametrize("program", ["generate", "eval", "serve"])
def test_help_lists_the_shared_precision_flags(program):
    text = _run(os.path.join("bin", program), "--help").stdout
    for flag in ("--dtype", "--quantize", "--kv_dtype"):
        assert f"  {flag}:" in text, f"{program} --help does not list {flag}"


def test_generate_missing_model_is_a_clear_error(tmp_path):
    out = _run("bin/generate", "--model", str(tmp_path / "nope"), "--max_new_tokens", "2")
    assert out.returncode == 2
    assert "model folder not found" in out.stderr


def test_generate_streams_text_from_the_default_model():
    out = _run("bin/generate", "--prompt", "ROMEO:", "--max_new_tokens", "12", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ROMEO:") and len(out.stdout) > len("ROMEO:") + 5
    assert "decode" in out.stderr and "tok/s" in out.stderr


@pytest.mark.parametrize("args", [["--quantize", "int4"], ["--dtype", "float32", "--kv_dtype", "bfloat16"]])
def test_generate_precision_flags(args):
    out = _run("bin/generate", "--prompt", "ROMEO:", "--max_new_tokens", "8", "--temperature", "0", *args)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ROMEO:") and "tok/s" in out.stderr


def test_prepare_writes_engine_weights_that_loads_map(tmp_path):
    """bin/prepare --quantize stores the quantized engine-layout weights once; a load of the bundle
    in that format maps them and gives the same logits as quantizing at load."""
    import json

    import numpy as np

    sys.path.insert(0, REPO)
    import powerinfer_jax as pij

    bundle = str(tmp_path / "b")
    out = _run("bin/prepare", "--out", bundle, "--quantize", "int8", "--max_tokens", "4000", "--max_samples", "2000",
               timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    path = os.path.join(bundle, "weights_int8.safetensors")
    assert os.path.isfile(path)
    ids = [1, 40, 41, 42, 43]
    mapped = pij.load(bundle, quantize="int8")
    np.testing.assert_array_equal(mapped.logits(ids), pij.load(quantize="int8").logits(ids))
    from test_precision import _mapped_file_of

    ptr = mapped.params.layers[0].ffn.w_down_t.data.unsafe_buffer_pointer()
    assert _mapped_file_of(ptr) == os.path.realpath(path)
    with open(os.path.join(bundle, "manifest.json")) as f:
        assert json.load(f)["model"]["sha256"]
