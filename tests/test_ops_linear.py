"""ops.linear: every projection in every stored format, on both paths, against the plain reference.

Tolerance: the host kernels and the XLA path both compute in float32 from the same stored values,
so they match dequantize-then-float32 numpy within f32 rounding (rtol 1e-5, atol 1e-5 * max|y|).
"""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import linear as L
from ops.quant import FORMATS, GROUP, Weight, to_weight

ROWS, COLS = 200, 96


def _weight(fmt, rows=ROWS, cols=COLS, seed=0):
    rng = np.random.default_rng(seed)
    return to_weight(rng.standard_normal((rows, cols), dtype=np.float32), fmt)


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.fixture(params=["host", "xla"])
def path(request, monkeypatch):
    monkeypatch.setattr(L, "USE_HOST_KERNELS", request.param == "host")
    return request.param


@pytest.mark.parametrize("tokens", [1, 3, 9])  # 9: a prompt, through blocked dequantize + BLAS
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_and_linear_t_match_reference(path, fmt, tokens):
    w = _weight(fmt)
    wj = jax.tree.map(jnp.asarray, w)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((tokens, COLS), dtype=np.float32)
    h = rng.standard_normal((tokens, ROWS), dtype=np.float32)
    b = rng.standard_normal(ROWS, dtype=np.float32)
    _close(jax.jit(L.linear)(jnp.asarray(x), wj, jnp.asarray(b)), L.linear_ref(x, w, b))
    _close(jax.jit(L.linear_t)(jnp.asarray(h), wj), L.linear_t_ref(h, w))
    # Leading axes are kept: [B, T, K] -> [B, T, R].
    y3 = jax.jit(L.linear)(jnp.asarray(x)[None], wj)
    assert y3.shape == (1, tokens, ROWS)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("tokens", [1, 2, 8, 16])
def test_bf16_rows_take_xla_own_dot_where_the_cpu_has_one(native, tokens, monkeypatch):
    """Several rows against a bf16 weight: XLA's bf16 dot with the activations split in bf16 parts
    (`linear` from 2 rows, `linear_t` from 8) where the CPU multiplies bf16; the host kernel elsewhere.
    Either way within 1e-5 of the reference (one bf16 rounding of x would miss by ~2e-3).
    """
    monkeypatch.setattr(L, "cpu_has_bf16_dot", lambda: native)
    w = _weight("bfloat16", rows=384, cols=256)
    wj = jax.tree.map(jnp.asarray, w)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((tokens, 256), dtype=np.float32)
    h = rng.standard_normal((tokens, 384), dtype=np.float32)
    for fn, arg, want, least in ((L.linear, x, L.linear_ref(x, w), L.NATIVE_BF16_MIN_ROWS),
                                 (L.linear_t, h, L.linear_t_ref(h, w), L.NATIVE_BF16_T_MIN_ROWS)):
        fresh = jax.jit(lambda a, w, fn=fn: fn(a, w))  # a new trace: the path is chosen while tracing
        _close(fresh(jnp.asarray(arg), wj), want)
        hlo = fresh.lower(jnp.asarray(arg), wj).as_text()
        xla_dot = native and tokens >= least
        assert ("callback" not in hlo) == xla_dot, (fn.__name__, tokens)
        if xla_dot:
            assert "dot_general" in hlo and "bf16" in hlo


def test_bf16_split_parts_trade_exactness_for_arithmetic(monkeypatch):
    """`_bf16_split_dot` splits f32 activations into bf16 parts: three hold all 24 bits (the f32 product up
    to summation order, within 1.5e-6 of a float64 product here), two hold 16 (the default: within 1e-5,
    and one dot of 2N rows, not 3N), one is a plain bf16 rounding (~2e-3). `linear(exact=True)` takes three
    parts whatever the default; POWERINFER_BF16_SPLIT_PARTS overrides the default and is checked."""
    w = _weight("bfloat16", rows=384, cols=256)
    wj = jax.tree.map(jnp.asarray, w)
    x = np.random.default_rng(7).standard_normal((16, 256), dtype=np.float32)
    want = x.astype(np.float64) @ np.asarray(L.dequantize(w), np.float64).T
    err = {}
    for parts in (1, 2, 3):
        got = jax.jit(lambda a, w, k=parts: L._bf16_split_dot(a, w, parts=k))(jnp.asarray(x), wj)
        err[parts] = float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())
    assert err[3] <= 1.5e-6 and err[2] <= 1e-5 and err[1] > 1e-4, err
    assert err[3] < err[2] < err[1], err
    monkeypatch.setattr(L, "cpu_has_bf16_dot", lambda: True)
    monkeypatch.setattr(L, "cpu_has_amx", lambda: True)
    monkeypatch.delenv("POWERINFER_BF16_SPLIT_PARTS", raising=False)
    assert L.bf16_split_parts() == L.BF16_SPLIT_PARTS == 2

    def three_parts(**kw):  # the dot's operand: the 16 rows' parts stacked
        hlo = jax.jit(lambda a, w: L.linear(a, w, **kw)).lower(jnp.asarray(x), wj).as_text()
        assert "tensor<32x256xbf16>" in hlo or "tensor<48x256xbf16>" in hlo
        return "tensor<48x256xbf16>" in hlo

    assert three_parts(exact=True) and not three_parts()
    monkeypatch.setenv("POWERINFER_BF16_SPLIT_PARTS", "3")
    assert L.bf16_split_parts() == 3 and three_parts()
    monkeypatch.setenv("POWERINFER_BF16_SPLIT_PARTS", "7")
    with pytest.raises(ValueError, match="POWERINFER_BF16_SPLIT_PARTS"):
        L.bf16_split_parts()


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("prompt_from", [0, 5, 16])
def test_prompt_rows_take_fewer_bf16_parts_when_asked(prompt_from, transposed, monkeypatch):
    """Rows from `prompt_from` on (prompt tokens) take `prompt_bf16_parts()` parts: by default the decode rows'
    two; with POWERINFER_PROMPT_BF16_PARTS=1 (`--prompt_activations=bfloat16`) one, the product of their
    bf16-rounded activations (as a GPU engine computes a bf16 checkpoint), while the rows before it keep two,
    each row exactly as the split dot gives it alone; the dot's operand shrinks to match; `exact=True` keeps
    three parts on every row; a bad value is refused."""
    w = _weight("bfloat16", rows=384, cols=256)
    wj = jax.tree.map(jnp.asarray, w)
    n, k = 16, (384 if transposed else 256)
    x = np.random.default_rng(8).standard_normal((n, k), dtype=np.float32)
    monkeypatch.delenv("POWERINFER_PROMPT_BF16_PARTS", raising=False)
    monkeypatch.delenv("POWERINFER_BF16_SPLIT_PARTS", raising=False)
    assert L.PROMPT_BF16_PARTS is None and L.prompt_bf16_parts() == L.bf16_split_parts() == 2
    monkeypatch.setattr(L, "cpu_has_bf16_dot", lambda: True)
    monkeypatch.setattr(L, "cpu_has_amx", lambda: True)
    fn = L.linear_t if transposed else L.linear

    def operand_rows(**kw):  # rows of each dot's first operand (the stacked bf16 parts)
        hlo = jax.jit(lambda a, w: fn(a, w, **kw)).lower(jnp.asarray(x), wj).as_text()
        return [int(m) for m in re.findall(r"dot_general.*?\(tensor<(\d+)x\d+xbf16>", hlo)]

    assert operand_rows(prompt_from=prompt_from) == [2 * n] == operand_rows()
    monkeypatch.setenv("POWERINFER_PROMPT_BF16_PARTS", "1")
    assert L.prompt_bf16_parts() == 1
    assert operand_rows(prompt_from=prompt_from) == [n + prompt_from] and operand_rows() == [2 * n]
    assert operand_rows(prompt_from=prompt_from, exact=True) == [3 * n]
    split = jax.jit(lambda a, w, pf, parts=None: L._bf16_split_dot(a, w, transposed, parts, pf),
                    static_argnums=(2, 3))
    got = np.asarray(split(jnp.asarray(x), wj, prompt_from))
    decode = np.asarray(split(jnp.asarray(x), wj, None, 2))
    prompt = np.asarray(split(jnp.asarray(x), wj, None, 1))
    np.testing.assert_allclose(got[:prompt_from], decode[:prompt_from], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(got[prompt_from:], prompt[prompt_from:], rtol=1e-6, atol=1e-5)
    wf = np.asarray(L.dequantize(w), np.float64)
    rounded = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    want = rounded @ wf if transposed else rounded @ wf.T
    np.testing.assert_allclose(got[prompt_from:], want[prompt_from:], rtol=1e-5, atol=1e-4)
    if 0 < prompt_from:  # the two parts differ from the rounding where they are kept
        assert np.abs(got[:prompt_from] - want[:prompt_from]).max() > 1e-3
    monkeypatch.setenv("POWERINFER_PROMPT_BF16_PARTS", "0")
    with pytest.raises(ValueError, match="POWERINFER_PROMPT_BF16_PARTS"):
        L.prompt_bf16_parts()


@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("tokens", [4, 16, 64])
def test_large_bf16_weight_at_few_rows_stays_on_the_host_without_amx(amx, tokens, monkeypatch):
    """A bf16 CPU without AMX: a weight of NO_AMX_HOST_MIN_BYTES or more at up to NO_AMX_HOST_MAX_ROWS rows
    goes through the host kernel (XLA's split bf16 dot is compute-bound there); with AMX, or at more
    rows, XLA's dot. Either way within f32 rounding of the reference."""
    monkeypatch.setattr(L, "cpu_has_bf16_dot", lambda: True)
    monkeypatch.setattr(L, "cpu_has_amx", lambda: amx)
    cols = 1024
    rows = L.NO_AMX_HOST_MIN_BYTES // (2 * cols)  # exactly the threshold
    w = _weight("bfloat16", rows=rows, cols=cols)
    wj = jax.tree.map(jnp.asarray, w)
    x = np.random.default_rng(6).standard_normal((tokens, cols), dtype=np.float32)
    fresh = jax.jit(lambda a, w: L.linear(a, w))
    _close(fresh(jnp.asarray(x), wj), L.linear_ref(x, w))
    host = not amx and tokens <= L.NO_AMX_HOST_MAX_ROWS
    assert ("callback" in fresh.lower(jnp.asarray(x), wj).as_text()) == host
    small = jax.tree.map(jnp.asarray, _weight("bfloat16", rows=384, cols=256))  # small weights keep XLA's dot
    assert "callback" not in jax.jit(lambda a, w: L.linear(a, w)).lower(jnp.ones((tokens, 256)), small).as_text()


def test_bf16_weight_data_is_bf16_typed_and_uint16_bits_are_viewed():
    """A bf16 Weight holds bf16-typed data (XLA's bf16 dot reads it as is; a uint16 array would be
    copied to reinterpret it every call); bit patterns passed in are viewed, not copied."""
    from ops.quant import BF16

    w = _weight("bfloat16")
    assert w.data.dtype == BF16
    bits = np.asarray(w.data).view(np.uint16)
    again = Weight(bits, None, "bfloat16", COLS)
    assert again.data.dtype == BF16 and np.shares_memory(again.data, bits)


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "float16", "int8"])
def test_linear_relu_linear_matches_reference(path, fmt, tokens):
    """The predictors' fc2(relu(fc1 x)): one fused callback on the host path, two linears on XLA."""
    w1, w2 = _weight(fmt, 64, COLS, seed=2), _weight(fmt, ROWS, 64, seed=3)
    x = np.random.default_rng(4).standard_normal((tokens, COLS), dtype=np.float32)
    got = jax.jit(L.linear_relu_linear)(jnp.asarray(x), jax.tree.map(jnp.asarray, w1), jax.tree.map(jnp.asarray, w2))
    _close(got, L.linear_relu_linear_ref(x, w1, w2))


@pytest.mark.parametrize("fmt", FORMATS)
def test_take_rows_dequantizes_gathered_rows(fmt):
    from ops.quant import dequantize

    w = _weight(fmt)
    ids = jnp.asarray([[0, 7], [199, 7]])
    _close(L.take_rows(jax.tree.map(jnp.asarray, w), ids), dequantize(w)[np.asarray(ids)])


@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "int4"])
def test_xla_path_lowers_for_cuda(fmt, monkeypatch):
    """What a GPU runs: the stored weight dequantized inside the jitted function (XLA fuses it)."""
    monkeypatch.setattr(L, "USE_HOST_KERNELS", False)
    sds = jax.ShapeDtypeStruct
    R, K = 11008, 4096
    if fmt == "bfloat16":
        w = Weight(sds((R, K), jnp.uint16), None, fmt, K)
    elif fmt == "int8":
        w = Weight(sds((R, K), jnp.int8), sds((R,), jnp.float32), fmt, K)
    else:
        w = Weight(sds((R, K // 2), jnp.uint8), sds((R, K // GROUP), jnp.uint16), fmt, K)
    exp = jax.export.export(jax.jit(lambda x, w: L.linear_t(L.linear(x, w), w)), platforms=["cuda"])(
        sds((1, K), jnp.float32), w)
    assert "stablehlo.dot_general" in exp.mlir_module()


@pytest.mark.parametrize("kind", ["reglu", "swiglu"])
def test_activation_threshold_models_keep_exact_dots(kind, monkeypatch):
    """An activation-threshold FFN (SwiGLU/GeGLU: |a| > threshold decides) takes three-part dots for gate,
    up and down (a 2e-6 difference moved CATS decisions: tests/test_mesh.py); a ReLU-family FFN the
    default two. Both within 1e-5 of the f32 reference."""
    from powerinfer_jax.ffn import dense_ffn, ffn_activation, ffn_output
    from powerinfer_jax.params import FFNParams

    monkeypatch.setattr(L, "cpu_has_bf16_dot", lambda: True)
    monkeypatch.setattr(L, "cpu_has_amx", lambda: True)
    monkeypatch.delenv("POWERINFER_BF16_SPLIT_PARTS", raising=False)
    d, n_ff, rows = 128, 256, 16
    ws = [_weight("bfloat16", rows=n_ff, cols=d, seed=s) for s in (1, 2, 3)]
    p = FFNParams(w_up=ws[0], w_down_t=ws[1], w_gate=ws[2])
    pj = jax.tree.map(jnp.asarray, p)
    x = np.random.default_rng(8).standard_normal((rows, d), dtype=np.float32)
    fn = jax.jit(lambda a, p: dense_ffn(p, kind, a))
    hlo = fn.lower(jnp.asarray(x), pj).as_text()
    parts = 3 if kind == "swiglu" else 2
    assert hlo.count(f"tensor<{parts * rows}x") >= 3 and f"tensor<{(5 - parts) * rows}x" not in hlo
    L.USE_HOST_KERNELS, before = False, L.USE_HOST_KERNELS  # the f32 reference: dequantized weights, XLA dots
    try:
        want = np.asarray(jax.jit(lambda a, p: ffn_output(p, ffn_activation(p, kind, a)[0]))(jnp.asarray(x), pj))
    finally:
        L.USE_HOST_KERNELS = before
    np.testing.assert_allclose(np.asarray(fn(jnp.asarray(x), pj)), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_prompt_activations_flag_becomes_a_load_argument(monkeypatch):
    """`--prompt_activations` of the bin/ programs becomes pij.load's `prompt_activations` (None without the flag,
    so that POWERINFER_PROMPT_BF16_PARTS still applies), and the process setting is left alone; `--int4_activations`
    becomes `int4_activations`."""
    import functools
    import types

    from absl import flags

    from powerinfer_jax.cli_flags import define_precision_flags, precision_kwargs

    monkeypatch.setenv("POWERINFER_PROMPT_BF16_PARTS", "")
    for argv, want, int4 in ((["x"], None, "float32"), (["x", "--prompt_activations=bfloat16"], "bfloat16", "float32"),
                             (["x", "--prompt_activations=float32", "--int4_activations=int8"], "float32", "int8")):
        fv = flags.FlagValues()
        define_precision_flags(types.SimpleNamespace(DEFINE_enum=functools.partial(flags.DEFINE_enum, flag_values=fv)))
        fv(argv)
        assert precision_kwargs(fv) == {"dtype": "auto", "quantize": None, "kv_dtype": "auto",
                                        "prompt_activations": want, "int4_activations": int4}
        assert os.environ.get("POWERINFER_PROMPT_BF16_PARTS") == ""
        assert L.prompt_bf16_parts() == L.bf16_split_parts()


def test_prompt_parts_scope_wins_over_the_process_setting(monkeypatch):
    """Inside `prompt_parts_scope` (an engine's programs while traced) its value decides: 1, or 0 for the decode
    rows' parts; None defers to POWERINFER_PROMPT_BF16_PARTS; the scope ends with its block."""
    monkeypatch.setenv("POWERINFER_PROMPT_BF16_PARTS", "1")
    with L.prompt_parts_scope(0):
        assert L.prompt_bf16_parts() == L.bf16_split_parts() == 2
    with L.prompt_parts_scope(None):
        assert L.prompt_bf16_parts() == 1
    monkeypatch.setenv("POWERINFER_PROMPT_BF16_PARTS", "")
    with L.prompt_parts_scope(1):
        assert L.prompt_bf16_parts() == 1
    assert L.prompt_bf16_parts() == 2


@pytest.mark.parametrize("kind,fmt,rows", [("reglu", "bfloat16", 1), ("reglu", "int8", 5), ("relu", "float16", 3),
                                           ("drelu", "int4", 2)])
def test_dense_decode_ffn_is_one_host_callback(kind, fmt, rows, monkeypatch):
    """A dense FFN at decode on the CPU backend is one callback (`cpu_sparse.dense_ffn_rows`: gate/up and down in
    one host call, every down row read), biases included (OPT's relu), and equals the XLA reference's dots."""
    from powerinfer_jax.ffn import dense_ffn
    from powerinfer_jax.params import FFNParams

    d, n_ff = 64, 192
    rng = np.random.default_rng(4)
    gated = kind != "relu"
    p = FFNParams(w_up=_weight(fmt, n_ff, d, 1), w_down_t=_weight(fmt, n_ff, d, 2),
                  w_gate=_weight(fmt, n_ff, d, 3) if gated else None,
                  b_up=None if gated else jnp.asarray(rng.standard_normal(n_ff), jnp.float32),
                  b_down=None if gated else jnp.asarray(rng.standard_normal(d), jnp.float32))
    pj = jax.tree.map(jnp.asarray, p)
    x = jnp.asarray(rng.standard_normal((rows, d), dtype=np.float32))
    fn = jax.jit(lambda a, p: dense_ffn(p, kind, a))
    assert fn.lower(x, pj).as_text().count("custom_call") == 1
    got = fn(x, pj)
    monkeypatch.setattr(L, "USE_HOST_KERNELS", False)  # the f32 reference: dequantized weights, XLA dots
    _close(got, np.asarray(jax.jit(lambda a, p: dense_ffn(p, kind, a))(x, pj)))
