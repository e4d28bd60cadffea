"""Fuzz suite (#14): bad input never ends in a traceback, a hang, a changed file or silent garbage.

Hypothesis draws random arguments for the API (`pij.load`, `Engine.generate`, `Engine.logits`), random
flag values and types for every bin/ program (run in this process through `cli.invoke`), and random
byte- and JSON-level corruptions of config.json, tokenizer.json, safetensors headers and data, and a
prepared bundle's manifest, placements, predictors (orbax) and profile. Property: a correct result or
a documented one-line error (`fuzz_support`), within a time limit, with every file on disk unchanged.

Each test runs twice: a bounded "fast" run in the default suite (fixed seed) and a 10x "slow" run
(`-m slow`, random seeds). POWERINFER_JAX_FUZZ_REPORT=path collects the counts (WORKSPACE.md's table).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import os
import random
import shutil
import tempfile

import numpy as np
import pytest
from absl import flags
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import powerinfer_jax as pij
from fuzz_support import REPORT_ENV, api_case, cli_case, digest, files_changed, write_report
from hf_models import make_llama
from offline.pipeline import DEFAULT_CORPUS
from offline.train_model import train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(REPO, "models")
SCALES = [pytest.param(1, id="fast"), pytest.param(10, id="slow", marks=pytest.mark.slow)]


def check(strategy, body, examples: int, scale: int) -> None:
    """Runs `body(case)` over `examples * scale` cases drawn from `strategy` (fixed seed in the fast run)."""

    @settings(max_examples=examples * scale, deadline=None, database=None, derandomize=scale == 1,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(strategy)
    def prop(case):
        body(case)

    prop()


@pytest.fixture(scope="module", autouse=True)
def _report_and_repo_unchanged():
    """models/ must be byte-identical after the module; the counts go to the report when asked."""
    before = digest(MODELS)
    yield
    for f in [f for f in flags.FLAGS if _BASE_FLAGS and f not in _BASE_FLAGS]:  # leave absl's flags as found
        delattr(flags.FLAGS, f)
    if os.environ.get(REPORT_ENV):
        write_report(os.environ[REPORT_ENV])
    files_changed("repository models/", before, digest(MODELS))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random ReGLU LLaMA with a real BPE tokenizer (vocab 300, 256 positions)."""
    root = tmp_path_factory.mktemp("fuzz")
    tok = train_tokenizer(DEFAULT_CORPUS.read_text(encoding="utf-8")[:20000], 300)
    model_dir = str(root / "tiny")
    make_llama(model_dir, vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=256)
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    return model_dir


@pytest.fixture(scope="module")
def engine(tiny):
    return pij.load(tiny, max_seq_len=64)


# ---------------------------------------------------------------------------------------- values
# Values of every type a caller might pass by mistake.
ANY = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6),
                st.lists(st.integers(-3, 5), max_size=3), st.just(np.float32("nan")), st.just(np.int64(3)),
                st.just(object()))


@st.composite
def broken(draw, valid: dict, bad: dict, max_broken: int = 2):
    """A valid argument dict with up to `max_broken` entries replaced by bad ones; returns (case, broken keys)."""
    case = {k: draw(v) for k, v in valid.items()}
    keys = draw(st.lists(st.sampled_from(sorted(bad)), max_size=max_broken, unique=True))
    for k in keys:
        case[k] = draw(bad[k])
    return case, keys


# ---------------------------------------------------------------------------------------- API
GEN_VALID = {
    "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(0, 299), min_size=1, max_size=70)),
    "max_new_tokens": st.integers(1, 4),
    "temperature": st.sampled_from([0.0, 0.7]),
    "top_p": st.sampled_from([1.0, 0.9]),
    "top_k": st.sampled_from([0, 5]),
    "seed": st.integers(0, 3),
    "stop_at_eos": st.booleans(),
    "truncate_prompt": st.booleans(),
}
GEN_BAD = {
    "prompt": st.one_of(ANY, st.lists(st.integers(), min_size=1, max_size=5), st.just([]), st.just(""),
                        st.lists(st.floats(), min_size=1, max_size=3), st.just([[1, 2], [3, 4]]), st.binary(max_size=4),
                        st.just("\ud800 lone surrogate"), st.text(min_size=200, max_size=300)),
    "max_new_tokens": st.one_of(ANY, st.integers(-3, 0), st.integers(10**6, 10**20)),
    "temperature": st.one_of(ANY, st.floats(max_value=-1e-9), st.sampled_from([math.inf, math.nan, 1e-30, 1e30])),
    "top_p": st.one_of(ANY, st.sampled_from([0.0, -0.5, 1.5, math.nan, 1e-12])),
    "top_k": st.one_of(ANY, st.integers(-5, -1), st.just(10**9)),
    "seed": st.one_of(ANY, st.integers(2**63, 2**70), st.integers(-(2**70), -(2**63) - 1)),
    "stop_at_eos": ANY,
    "truncate_prompt": ANY,
}


@pytest.mark.parametrize("scale", SCALES)
def test_generate_arguments(engine, scale):
    """Random arguments to Engine.generate: a result within its limits, or one documented line."""

    def body(drawn):
        case, bad = drawn
        kind, value = api_case("API generate() arguments", lambda: engine.generate(**case))
        if kind == "result":
            assert isinstance(value.text, str) and len(value.token_ids) <= case["max_new_tokens"]
            assert all(0 <= t < engine.cfg.vocab_size for t in value.token_ids)
            assert len(value.prompt_ids) + case["max_new_tokens"] <= engine.max_seq_len
        elif not bad:  # valid arguments are refused only for a prompt that does not fit
            assert "exceeds the context" in str(value) and not case["truncate_prompt"], value

    check(broken(GEN_VALID, GEN_BAD), body, 40, scale)


@pytest.mark.parametrize("scale", SCALES)
def test_logits_arguments(engine, scale):
    """Random token sequences to Engine.logits: finite [T, vocab] logits or one documented line."""
    ids = st.one_of(st.lists(st.integers(0, 299), min_size=1, max_size=40), st.lists(st.integers(), max_size=5),
                    ANY, st.just(np.arange(5).reshape(1, 5)), st.just(np.arange(300, dtype=np.int64)))

    def body(case):
        kind, value = api_case("API logits() token ids", lambda: engine.logits(case))
        if kind == "result":
            assert value.shape == (len(case), engine.cfg.vocab_size) and np.isfinite(value).all()

    check(ids, body, 15, scale)


LOAD_VALID = {
    "dtype": st.sampled_from(["auto", "float32", "bfloat16"]),
    "quantize": st.sampled_from([None, "int8", "int4"]),
    "kv_dtype": st.sampled_from(["float32", "bfloat16"]),
    "max_seq_len": st.one_of(st.none(), st.integers(1, 400)),
    "sparsity": st.sampled_from([None, "dense", "oracle"]),
    "offload_layers": st.sampled_from([None, 0, 1, 2]),
    "device_kernel": st.sampled_from(["auto", "xla"]),
    "check_finite": st.sampled_from([True, False, "auto"]),
    "devices": st.sampled_from([None, 1]),
}
LOAD_BAD = {
    "model_dir": st.one_of(ANY, st.sampled_from(["/nonexistent/model", "/dev/null", "", "\x00", MODELS,
                                                 os.path.join(MODELS, "shakespeare-relu-llama", "config.json")])),
    "dtype": st.one_of(ANY, st.just("int8")), "quantize": st.one_of(ANY, st.just("int2")),
    "kv_dtype": ANY, "max_seq_len": st.one_of(ANY, st.integers(max_value=0)),
    "sparsity": st.one_of(ANY, st.just("predicted")), "device_memory_budget": st.one_of(
        ANY, st.sampled_from(["-1MiB", "nan", "1e400", "40MiB", "abc"])),
    "threshold": st.one_of(ANY, st.sampled_from([math.inf, math.nan])),
    "offload_layers": st.one_of(ANY, st.integers(-5, -1), st.integers(3, 10**6)),
    "placement_batch": st.one_of(ANY, st.integers(max_value=0)), "min_hot_per_split_layer": st.one_of(ANY, st.just(-1)),
    "device_kernel": st.one_of(ANY, st.just("cuda")), "verify_bundle": ANY, "check_finite": ANY,
    "devices": st.one_of(ANY, st.sampled_from([0, -1, 2, 1000, ["cpu"], [], (None,)])),
    "bundle_model_dir": st.one_of(ANY, st.just("/nonexistent/model")),
}


@pytest.mark.parametrize("scale", SCALES)
def test_load_arguments(tiny, scale):
    """Random arguments to pij.load: an engine, or one documented line."""

    def body(drawn):
        case, bad = drawn
        case.setdefault("model_dir", tiny)
        kind, value = api_case("API load() arguments", lambda: pij.load(**case))
        if kind == "result":
            assert value.cfg.vocab_size == 300 and value.max_seq_len <= 256
            if scale > 1:
                assert np.isfinite(value.logits([1, 2, 3][:value.max_seq_len])).all()
        else:
            assert bad, f"valid load arguments refused: {value}"

    check(broken(LOAD_VALID, LOAD_BAD), body, 25, scale)


# ---------------------------------------------------------------------------------------- files
def _mutate_bytes(data: bytes, rnd: random.Random, lo: int = 0, hi: int | None = None) -> bytes:
    """A byte-level corruption inside [lo, hi): flips, a truncation, an insertion or a deletion."""
    hi = len(data) if hi is None else hi
    op = rnd.choice(["flip", "flip", "truncate", "insert", "delete", "zero"])
    b = bytearray(data)
    at = rnd.randrange(lo, max(lo + 1, hi))
    if op == "flip":
        for _ in range(rnd.randint(1, 4)):
            i = rnd.randrange(lo, max(lo + 1, hi))
            if i < len(b):
                b[i] ^= 1 << rnd.randrange(8)
    elif op == "truncate":
        del b[at:]
    elif op == "insert":
        b[at:at] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
    elif op == "delete":
        del b[at:at + rnd.randint(1, 16)]
    else:
        b[at:at + rnd.randint(1, 64)] = bytes(len(b[at:at + rnd.randint(1, 64)]))
    return bytes(b)


JSON_VALUES = [None, True, -1, 0, 1, 3, 7, 10**12, -(10**12), 0.5, 1e308, -1e-5, "", "relu", "gelu", "NaN", [], [1, -2],
               {}, {"type": "linear"}, {"rope_type": "llama3", "factor": 0}]


def _mutate_json(data: bytes, rnd: random.Random) -> bytes:
    """A JSON-level corruption: a value replaced (any depth), a key dropped or renamed; bytes if unparseable."""
    try:
        obj = json.loads(data)
    except ValueError:
        return _mutate_bytes(data, rnd)
    paths = []

    def walk(node, path, depth):
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append(path + [k])
                if depth < 3:
                    walk(v, path + [k], depth + 1)
        elif isinstance(node, list) and node:
            i = rnd.randrange(len(node))
            paths.append(path + [i])
            if depth < 3:
                walk(node[i], path + [i], depth + 1)

    walk(obj, [], 0)
    if not paths:
        return _mutate_bytes(data, rnd)
    path = rnd.choice(paths)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    op = rnd.choice(["value", "value", "value", "drop", "rename"])
    if op == "value" or not isinstance(parent, dict):
        parent[path[-1]] = rnd.choice(JSON_VALUES)
    elif op == "drop":
        del parent[path[-1]]
    else:
        parent[str(path[-1]) + "_x"] = parent.pop(path[-1])
    return json.dumps(obj).encode()


def _header_span(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return 0, 8 + n


def _mutate_header(data: bytes, rnd: random.Random) -> bytes:
    """A safetensors header corruption: bytes of the length or JSON, or one entry's dtype/shape/offsets."""
    n = int.from_bytes(data[:8], "little")
    if rnd.random() < 0.5:
        return _mutate_bytes(data, rnd, 0, 8 + n)
    header = json.loads(data[8:8 + n])
    name = rnd.choice([k for k in header if k != "__metadata__"])
    field = rnd.choice(["dtype", "shape", "data_offsets"])
    header[name][field] = rnd.choice({"dtype": ["F16", "I8", "F64", "Q4", 5],
                                      "shape": [[], [3], [-1, 64], [10**15, 10**15], ["a"], header[name]["shape"][::-1]],
                                      "data_offsets": [[0, 0], [5, 1], [-8, 8], [0, 10**12], None]}[field])
    raw = json.dumps(header).encode()
    raw += b" " * ((-(8 + len(raw))) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


def _corrupt_copy(src: str, rel: str, how, seed: int, root: str) -> str:
    dst = os.path.join(root, "m")
    shutil.copytree(src, dst)
    path = os.path.join(dst, rel)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(how(data, random.Random(seed)))
    return dst


FILE_KINDS = {
    "config.json (bytes and JSON values)": ("config.json", lambda d, r: (_mutate_json if r.random() < 0.7
                                                                       else _mutate_bytes)(d, r)),
    "tokenizer.json (bytes and JSON values)": ("tokenizer.json", lambda d, r: (_mutate_json if r.random() < 0.5
                                                                             else _mutate_bytes)(d, r)),
    "safetensors header": ("model.safetensors", _mutate_header),
    "safetensors data": ("model.safetensors", lambda d, r: _mutate_bytes(d, r, int.from_bytes(d[:8], "little") + 8)),
}


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("kind", sorted(FILE_KINDS))
def test_corrupt_model_files(tiny, kind, scale):
    """A corrupted copy of one model file: load + score (+ generate in the slow run) gives a finite
    result or one documented line, and the corrupted files stay as they were."""
    rel, how = FILE_KINDS[kind]

    def body(case):
        seed, check_finite = case
        with tempfile.TemporaryDirectory() as root:
            path = _corrupt_copy(tiny, rel, how, seed, root)
            before = digest(path)

            def run():
                e = pij.load(path, max_seq_len=32, check_finite=check_finite)
                out = e.logits([1, 5, 7, 9])
                if scale > 1:
                    e.generate("To be", max_new_tokens=3)
                return out

            res, value = api_case(kind, run)
            if res == "result":
                assert np.isfinite(value).all()
            files_changed(kind, before, digest(path))

    check(st.tuples(st.integers(0, 2**32), st.sampled_from([True, False, "auto"])), body, 12, scale)


# ---------------------------------------------------------------------------------------- bundles
BUNDLE = "shakespeare-relu-llama-prepared"


def _bundle_targets(bundle_dir: str) -> list[list[str]]:
    """Files to corrupt, grouped by kind (so each kind is drawn about as often, whatever its file count)."""
    with open(os.path.join(bundle_dir, "manifest.json")) as f:
        current = json.load(f)["current_placement"]
    arrays = sorted(os.path.relpath(os.path.join(d, n), bundle_dir)
                    for d, _, ns in os.walk(os.path.join(bundle_dir, "predictors", "arrays")) for n in ns)
    return [["manifest.json"], [f"placements/{current}.json"], ["predictors/predictors.json"],
            ["profile/summary.json", "profile/counts.npy"], arrays]


# orbax leaves its reader coroutines unawaited when a damaged file stops a restore: noise, not a failure
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("scale", SCALES)
def test_corrupt_bundle(scale):
    """A corrupted copy of the bundled bundle (manifest, current placement, predictors, orbax arrays,
    profile) loaded with the predicted sparsity at its stored budget: an engine or one documented
    line; the copy and the model it points at stay unchanged."""
    src = os.path.join(MODELS, BUNDLE)
    targets = _bundle_targets(src)

    def body(case):
        target, seed, op = case
        with tempfile.TemporaryDirectory() as root:
            os.symlink(os.path.join(MODELS, "shakespeare-relu-llama"), os.path.join(root, "shakespeare-relu-llama"))
            dst = os.path.join(root, BUNDLE)
            shutil.copytree(src, dst)
            path = os.path.join(dst, target)
            rnd = random.Random(seed)
            if op == "delete":
                os.remove(path)
            else:
                with open(path, "rb") as f:
                    data = f.read()
                mutate = _mutate_json if target.endswith(".json") and op == "json" else _mutate_bytes
                with open(path, "wb") as f:
                    f.write(mutate(data, rnd))
            before = digest(dst)

            def run():
                e = pij.load(dst, sparsity="predicted", device_memory_budget=41943040, max_seq_len=1024)
                if scale > 1:
                    e.generate([1, 40, 41], max_new_tokens=2)
                return e

            api_case(f"bundle: {_target_kind(target)}", run)
            files_changed(f"bundle: {_target_kind(target)}", before, digest(dst))

    target = st.sampled_from(targets).flatmap(st.sampled_from)
    check(st.tuples(target, st.integers(0, 2**32), st.sampled_from(["json", "json", "bytes", "delete"])),
          body, 25, scale)


def _target_kind(target: str) -> str:
    if target.startswith("predictors/arrays"):
        return "orbax predictor arrays"
    return {"manifest.json": "manifest.json", "predictors/predictors.json": "predictors.json"}.get(
        target, "placement JSON" if target.startswith("placements") else "profile files")


# ---------------------------------------------------------------------------------------- CLIs
_BASE_FLAGS: set[str] = set()


def load_program(name: str):
    """bin/<name> as a module. absl flags are global, so the previous program's flags are removed first
    (everything beyond absl's own, recorded at the first call)."""
    FLAGS = flags.FLAGS
    if not _BASE_FLAGS:
        _BASE_FLAGS.update(FLAGS)
    for f in [f for f in FLAGS if f not in _BASE_FLAGS]:
        delattr(FLAGS, f)
    path = os.path.join(REPO, "bin", name)
    loader = importlib.machinery.SourceFileLoader(f"bin_{name}", path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module, sorted(f for f in FLAGS if f not in _BASE_FLAGS)


WEIRD = st.sampled_from(["", "-1", "0", "1", "2", "nan", "inf", "-inf", "1e309", "abc", "true", "3.5", "-0.5",
                         "99999999999999999999", "1KB", "40MiB", "-5MiB", "/nonexistent/x", "/dev/null", "/dev/null/x",
                         "\x00", "é", "int8", "float32", "dense", "predicted", "auto", "x,y", "-1,0,1"])
FLAG_VALUE = st.one_of(WEIRD, WEIRD, st.text(max_size=10), st.integers().map(str), st.floats().map(repr))

# Values each heavy program must refuse up front (before profiling, training or benchmarking).
POISON = {
    "prepare": ["--out=/dev/null/x", "--model=/nonexistent/m", "--corpus=/nonexistent/c.txt", "--budget=1KB",
                "--budget=abc", "--max_tokens=0"],
    "profile": ["--out=/dev/null/x", "--model=/nonexistent/m", "--corpus=/nonexistent/c.txt", "--window=1",
                "--window=100000", "--batch=0"],
    "train_predictors": ["--profile=/nonexistent/p", "--out=/dev/null/x", "--lr=0", "--max_epochs=0"],
    "train_default_model": ["--corpus=/nonexistent/c.txt", "--out=/dev/null/x", "--steps=0", "--vocab_size=5"],
    "bench": ["--budgets=2", "--models=nope", "--out_dir=/dev/null/x", "--suites=nope", "--repeats=0"],
    "eval": ["--text=/nonexistent/t.txt", "--out_dir=/dev/null/x", "--modes=nope", "--window=1",
             "--bundle=/nonexistent/b"],
    "solve_placement": ["--budget=1KB", "--bundle=/nonexistent/b", "--budget=abc", "--max_context=0"],
}
PROGRAMS = ["generate", *sorted(POISON)]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("program", PROGRAMS)
def test_cli_flags(program, tiny, tmp_path, scale):
    """Random flag values and types for one bin/ program: exit 0, or exit 2 with one `error:` line and
    no traceback; a value that must be refused up front is, within 30 s; nothing on disk changes."""
    module, names = load_program(program)
    bundle = str(tmp_path / "b")  # solve_placement writes into its bundle: a copy, never models/
    os.symlink(os.path.join(MODELS, "shakespeare-relu-llama"), tmp_path / "shakespeare-relu-llama")
    shutil.copytree(os.path.join(MODELS, BUNDLE), bundle)
    before = digest(tiny, bundle)
    # Valid defaults keep the runs that are allowed to succeed small (bin/generate on the tiny model).
    defaults = {"generate": ["--model=" + tiny, "--max_new_tokens=2", "--max_seq_len=64"],
                "solve_placement": ["--bundle=" + bundle]}.get(program, [])
    # Heavy programs always write (if anything) into tmp_path, never their defaults (models/, benchmarks/).
    outs = [f"--{n}={tmp_path / 'out'}" for n in ("out", "out_dir", "realsize_dir") if n in names]

    def body(case):
        chosen, extra, poison = case
        argv = [program, *defaults, *outs, *(f"--{n}={v}" for n, v in chosen), *extra]
        if program in POISON:
            argv.append(poison)
        rc, out, err = cli_case(f"CLI bin/{program} flags", module.main, argv, limit=90 if program == "generate" else 30,
                                expect_error=program in POISON)
        if program == "generate" and rc == 0:
            assert out.strip() and "tok/s" in err

    case = st.tuples(st.lists(st.tuples(st.sampled_from(names), FLAG_VALUE), max_size=4),
                     st.lists(st.sampled_from(["stray", "--unknown_flag=1", "--", "-x"]), max_size=1),
                     st.sampled_from(POISON.get(program, [""])))
    check(case, body, 12 if program == "generate" else 6, scale)
    files_changed(f"CLI bin/{program} flags", before, digest(tiny, bundle))
