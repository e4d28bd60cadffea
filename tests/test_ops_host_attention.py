"""ops.host_attention: batched decode attention on the host against its numpy reference and XLA's.

Tolerance: float32 dot products and softmax in another order than the float64 reference and
XLA's einsums: rtol 1e-5, atol 1e-5 * max|out|.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import host_attention as HA


def _close(got, want):
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("window", [None, 5])
# plain heads; groups of 2 (the two-head path), 4 (four-head), 7 (four, two, then one) and 8 (two four-head blocks)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 4), (8, 2), (14, 2), (16, 2)])
def test_decode_attention_matches_reference(hq, hkv, window, cache_dtype):
    """f32 and half-precision caches (the kernel widens their bits; the reference reads the same stored values)."""
    rng = np.random.default_rng(0)
    rows, cache_rows, S, hd = 5, 8, 32, 16
    q = rng.standard_normal((rows, hq, hd), dtype=np.float32)
    k = rng.standard_normal((cache_rows, hkv, S, hd), dtype=np.float32).astype(jnp.dtype(cache_dtype))
    v = rng.standard_normal((cache_rows, hkv, S, hd), dtype=np.float32).astype(jnp.dtype(cache_dtype))
    positions = np.array([0, 7, 31, S, 12], np.int32)  # S: a padding row, which gets zeros
    got = jax.jit(HA.decode_attention, static_argnums=4)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                                         jnp.asarray(positions), window)
    _close(got, HA.decode_attention_ref(q, k, v, positions, window))
    assert not np.asarray(got)[3].any()


def test_exp_neg_is_float32_exp_for_softmax_arguments():
    """The kernel's vectorised exp against float64's over [-87, 0] (every exponent step): within 2 ulp
    (relative 2.5e-7); below -87, where the softmax weight is < 2e-38 of the top slot's, no more than exp(-87)."""
    from numba import njit

    @njit
    def run(xs, out):
        for i in range(xs.shape[0]):
            out[i] = HA._exp_neg(xs[i])

    xs = np.concatenate([np.linspace(-87.0, 0.0, 200_001), -np.logspace(-8, 0, 1001), [0.0, -1e-30]])
    xs = xs.astype(np.float32)
    got = np.empty_like(xs)
    run(xs, got)
    want = np.exp(xs.astype(np.float64))
    assert np.max(np.abs(got / want - 1.0)) < 2.5e-7
    far = np.array([-87.5, -100.0, -1e4, -np.inf], np.float32)
    out = np.empty_like(far)
    run(far, out)
    assert np.all((out >= 0) & (out <= np.exp(np.float32(-87.0)) * 1.000001))


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_long_spans_and_peaked_scores_at_model_head_sizes(cache_dtype):
    """Head dims 64 and 128 over 1-203 slots (every remainder of the two-, four- and eight-slot passes; multi-head,
    and groups of 2, 4 and 5 query heads a kv head), with queries scaled so most softmax weights underflow (scores
    spanning hundreds): the reference's result."""
    rng = np.random.default_rng(5)
    for hd, hq, hkv in ((64, 6, 6), (128, 4, 2), (128, 8, 2), (128, 10, 2)):
        S = 208
        q = 8.0 * rng.standard_normal((8, hq, hd), dtype=np.float32)
        k = rng.standard_normal((8, hkv, S, hd), dtype=np.float32).astype(jnp.dtype(cache_dtype))
        v = rng.standard_normal((8, hkv, S, hd), dtype=np.float32).astype(jnp.dtype(cache_dtype))
        positions = np.array([0, 1, 6, 7, 8, 100, 201, 202], np.int32)
        got = jax.jit(HA.decode_attention)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(positions))
        _close(got, HA.decode_attention_ref(q, k, v, positions))


@pytest.mark.parametrize("serial_max_bytes", [0, 1 << 40])
def test_serial_and_parallel_kernels_agree(monkeypatch, serial_max_bytes):
    """A call reading few K/V bytes runs the serial twin (no thread wake), a larger one the parallel kernel:
    both give the reference's result, and the size rule picks as stated."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((3, 8, 16), dtype=np.float32)
    k, v = (rng.standard_normal((3, 2, 32, 16), dtype=np.float32) for _ in range(2))
    positions = np.array([3, 31, 9], np.int32)
    monkeypatch.setattr(HA, "SERIAL_MAX_BYTES", serial_max_bytes)
    starts, ends = (np.asarray(a) for a in HA._slot_ranges(jnp.asarray(positions), 32, None))
    picked = HA._attention_kernel(k, starts, ends)
    assert picked is (HA._decode_attention_serial if serial_max_bytes else HA._decode_attention)
    got = jax.jit(HA.decode_attention)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(positions))
    _close(got, HA.decode_attention_ref(q, k, v, positions))


def test_queries_read_the_cache_rows_they_are_mapped_to():
    """`cache_rows`: query b reads cache row cache_rows[b] (a packed prompt chunk: several queries a row,
    rows in any order, a padding query past the cache), against the reference and against each query
    run alone on its own row."""
    rng = np.random.default_rng(3)
    hq, hkv, S, hd = 8, 2, 32, 16
    q = rng.standard_normal((6, hq, hd), dtype=np.float32)
    k = rng.standard_normal((3, hkv, S, hd), dtype=np.float32)
    v = rng.standard_normal((3, hkv, S, hd), dtype=np.float32)
    rows = np.array([2, 2, 2, 0, 0, 1], np.int32)
    positions = np.array([4, 5, 6, 0, 1, S], np.int32)
    got = np.asarray(jax.jit(HA.decode_attention)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                                  jnp.asarray(positions), cache_rows=jnp.asarray(rows)))
    _close(got, HA.decode_attention_ref(q, k, v, positions, cache_rows=rows))
    for b in range(5):
        alone = HA.decode_attention_ref(q[b:b + 1], k[rows[b]:rows[b] + 1], v[rows[b]:rows[b] + 1], positions[b:b + 1])
        _close(got[b:b + 1], alone)
    assert not got[5].any()


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_batched_decode_step_equals_xla_attention(monkeypatch, cache_dtype):
    """A forward decode step of 4 rows at different positions: the host attention and XLA's agree (over an
    f32 and a bf16 cache), and the step's attention really went through the callback."""
    from powerinfer_jax.config import ModelConfig
    from powerinfer_jax.model import forward, init_cache
    from powerinfer_jax.params import init_params

    cfg = ModelConfig(architecture="LlamaForCausalLM", family="llama", ffn_kind="reglu", vocab_size=64,
                      hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      max_position_embeddings=64, norm_eps=1e-5)
    params = init_params(cfg, jax.random.PRNGKey(0))
    cache = init_cache(cfg, 4, 16, jnp.dtype(cache_dtype))
    rng = np.random.default_rng(1)
    prompt = jnp.asarray(rng.integers(0, 64, (4, 9)), jnp.int32)
    _, cache, _ = forward(params, cfg, prompt, jnp.broadcast_to(jnp.arange(9), (4, 9)), cache, 16)
    tokens = jnp.asarray(rng.integers(0, 64, (4, 1)), jnp.int32)
    positions = jnp.asarray([[9], [4], [8], [16]], jnp.int32)  # 16: a padding row (past the cache)

    def step():
        fn = jax.jit(lambda p, t, pos, c: forward(p, cfg, t, pos, c, 16)[0])  # a new trace per path
        return fn, np.asarray(fn(params, tokens, positions, cache))

    monkeypatch.setattr(HA, "USE_HOST_ATTENTION", True)
    host_fn, host = step()
    assert "callback" in host_fn.lower(params, tokens, positions, cache).as_text()
    monkeypatch.setattr(HA, "USE_HOST_ATTENTION", False)
    xla_fn, xla = step()
    assert "callback" not in xla_fn.lower(params, tokens, positions, cache).as_text()
    _close(host[:3], xla[:3])  # the padding row's logits are not compared (XLA's are NaN there)


def test_one_row_long_span_attends_on_the_host(monkeypatch):
    """A one-row decode step attends here once its span's K+V bytes reach the threshold (lowered to
    this tiny model's span), matches XLA's attention, and below the threshold stays on XLA."""
    from powerinfer_jax.config import ModelConfig
    from powerinfer_jax.model import forward, init_cache
    from powerinfer_jax.params import init_params

    cfg = ModelConfig(architecture="LlamaForCausalLM", family="llama", ffn_kind="reglu", vocab_size=64,
                      hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      max_position_embeddings=64, norm_eps=1e-5)
    params = init_params(cfg, jax.random.PRNGKey(0))
    span = 32
    rng = np.random.default_rng(2)
    prompt = jnp.asarray(rng.integers(0, 64, (1, 20)), jnp.int32)
    _, cache, _ = forward(params, cfg, prompt, jnp.arange(20)[None], init_cache(cfg, 1, span), span)
    token, position = jnp.asarray([[5]], jnp.int32), jnp.asarray([[20]], jnp.int32)
    span_bytes = 2 * cfg.num_kv_heads * span * cfg.head_dim * 4

    def step(threshold):
        monkeypatch.setattr(HA, "HOST_ATTENTION_MIN_SPAN_BYTES", threshold)
        fn = jax.jit(lambda p, t, pos, c: forward(p, cfg, t, pos, c, span)[0])  # a new trace per threshold
        return "callback" in fn.lower(params, token, position, cache).as_text(), np.asarray(fn(params, token,
                                                                                               position, cache))

    host_called, host = step(span_bytes)
    xla_called, xla = step(span_bytes + 1)
    assert host_called and not xla_called
    _close(host, xla)


def test_small_steps_and_prompts_stay_on_xla():
    assert not HA.uses_host_attention(1, 1, jnp.float32)
    assert not HA.uses_host_attention(1, 1, jnp.float32, HA.HOST_ATTENTION_MIN_SPAN_BYTES - 1)
    assert not HA.uses_host_attention(8, 4, jnp.float32, 1 << 30)  # a prompt chunk
    assert not HA.uses_host_attention(8, 1, jnp.int8)  # no kernel for it
    on_cpu = jax.default_backend() == "cpu"
    for cache_dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        assert HA.uses_host_attention(HA.HOST_ATTENTION_MIN_ROWS, 1, cache_dtype) == on_cpu
    assert HA.uses_host_attention(1, 1, jnp.float32, HA.HOST_ATTENTION_MIN_SPAN_BYTES) == on_cpu
