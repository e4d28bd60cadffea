"""The hybrid runtime's state and scheduling: plans as static pytree metadata, predictor outputs in
(hot, cold) order, overflow keeping the best-scoring neurons, kernels reading the arrays they are
passed, host/device overlap (launch/collect) equal to the serial path, counters at any batch size."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import powerinfer_jax as pij
from hf_models import VOCAB, make_llama
from powerinfer_jax.hybrid import build_hybrid_engine
from powerinfer_jax.loading import load_params
from powerinfer_jax.sparse_ffn import (LayerPlan, PredictorParams, engine_predictor, merge_prefix, permute_outputs,
                                       predict_logits, select_top)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("runtime"))
    make_llama(path, act="relu")
    dense = pij.load(path, max_seq_len=64)
    host = load_params(path, dense.cfg, on_host=True)
    rng = np.random.default_rng(0)
    cfg = dense.cfg
    hot = [np.sort(rng.choice(cfg.intermediate_size, cfg.intermediate_size // 3, replace=False)).astype(np.int32)
           for _ in range(cfg.num_layers)]
    preds = [PredictorParams(fc1=rng.standard_normal((cfg.hidden_size, 16)).astype(np.float32),
                             fc2=rng.standard_normal((16, cfg.intermediate_size)).astype(np.float32))
             for _ in range(cfg.num_layers)]
    return dense, host, hot, preds


def _ids(n=12, seed=0):
    return [1] + np.random.default_rng(seed).integers(3, VOCAB, n - 1).tolist()


def test_select_top_keeps_all_in_order_or_the_best_scoring():
    score = jnp.asarray([0.5, 3.0, -1.0, 2.0, 0.7, 9.0, 0.1, 4.0])
    mask = score > 0.2
    idx, kept, count = select_top(mask, score, 8)
    assert int(kept) == int(count) == 6 and list(np.asarray(idx)[:6]) == [0, 1, 3, 4, 5, 7]
    idx, kept, count = select_top(mask, score, 3)  # overflow: the three highest scores, in position order
    assert int(kept) == 3 and int(count) == 6 and list(np.asarray(idx)) == [1, 5, 7]


def test_merge_prefix_puts_both_lists_at_the_front():
    out = merge_prefix(jnp.asarray([4, 7, 0, 0], jnp.int32), jnp.int32(2), jnp.asarray([1, 2, 3], jnp.int32),
                       jnp.int32(3))
    assert list(np.asarray(out)[:5]) == [4, 7, 1, 2, 3]


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8"])
def test_permuted_predictor_scores_neurons_in_the_given_order(fmt):
    rng = np.random.default_rng(1)
    fc1, fc2 = rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal((4, 12)).astype(np.float32)
    p = PredictorParams(jnp.asarray(fc1), jnp.asarray(fc2)) if fmt == "float32" else engine_predictor(fc1, fc2, fmt)
    order = rng.permutation(12).astype(np.int32)
    x = jnp.asarray(rng.standard_normal((2, 8)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(predict_logits(permute_outputs(p, order), x)),
                                  np.asarray(predict_logits(p, x))[:, order])


def test_layer_plans_are_static_metadata_of_the_params(tiny):
    dense, host, hot, preds = tiny
    eng = build_hybrid_engine(dense.cfg, host, mode="predicted", hot_indices=hot, predictors=preds,
                              thresholds=[0.5] * dense.cfg.num_layers, max_seq_len=64)
    ffn = eng.params.layers[0].ffn
    assert isinstance(ffn.plan, LayerPlan) and ffn.plan.n_hot == len(hot[0]) and ffn.plan.threshold == 0.5
    assert not any(isinstance(leaf, LayerPlan) for leaf in jax.tree.leaves(eng.params))
    assert not hasattr(eng.runtime, "plans") and not hasattr(eng.runtime, "host_ffn")


@pytest.mark.parametrize("kernel", ["numba", "xla"])
def test_kernels_read_the_arrays_they_are_passed(tiny, kernel):
    """Replacing a layer's weights in engine.params changes the result (nothing reads captured copies
    on the device side)."""
    dense, host, hot, preds = tiny
    cfg = dense.cfg
    eng = build_hybrid_engine(cfg, host, mode="oracle", hot_indices=hot, max_seq_len=64, device_kernel=kernel)
    ids = _ids()
    before = eng.logits_stepwise(ids, {})
    layers = list(eng.params.layers)
    ffn = layers[0].ffn
    where = "shared" if ffn.shared is not None else "hot"
    part = getattr(ffn, where)
    part = dataclasses.replace(part, w_up=jax.tree.map(jnp.zeros_like, part.w_up))
    layers[0] = dataclasses.replace(layers[0], ffn=dataclasses.replace(ffn, **{where: part}))
    eng.params = dataclasses.replace(eng.params, layers=layers)
    after = eng.logits_stepwise(ids, {})
    assert np.abs(after - before).max() > 1e-3


@pytest.mark.parametrize("mode", ["oracle", "predicted"])
def test_overlapped_host_part_equals_the_serial_one(tiny, mode):
    """Accelerator layout on the CPU (xla device kernel): launch/collect around the hot kernel gives
    the serial callback's results; oracle also equals dense."""
    dense, host, hot, preds = tiny
    cfg = dense.cfg
    kw = dict(mode=mode, hot_indices=hot, max_seq_len=64, device_kernel="xla",
              predictors=preds if mode == "predicted" else None,
              thresholds=[1.0] * cfg.num_layers if mode == "predicted" else None)
    on = build_hybrid_engine(cfg, host, overlap=True, **kw)
    off = build_hybrid_engine(cfg, host, overlap=False, **kw)
    assert on.params.layers[0].ffn.host is not None
    ids = _ids(seed=2)
    s_on, s_off = {}, {}
    a, b = on.logits_stepwise(ids, s_on), off.logits_stepwise(ids, s_off)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())
    assert s_on == s_off
    if mode == "oracle":
        ref = dense.logits(ids)
        assert np.abs(a - ref).max() / np.abs(ref).max() <= 1e-5


@pytest.mark.parametrize("mode", ["dense", "predicted"])
def test_counters_mean_the_same_at_batch_one_and_more(tiny, mode):
    """Per step: neurons computed (the union over the batch), total neurons: two copies of one prompt
    give the single prompt's counts, in dense and in sparse mode."""
    dense, host, hot, preds = tiny
    cfg = dense.cfg
    eng = build_hybrid_engine(cfg, host, mode=mode, hot_indices=hot, predictors=preds,
                              thresholds=[1.0] * cfg.num_layers, max_seq_len=64)
    one = eng.generate([1, 5, 9], max_new_tokens=6, temperature=0.0, stop_at_eos=False).stats
    two = eng.generate_batch([[1, 5, 9], [1, 5, 9]], max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    two = two[0].stats
    for k in ("ffn_computed", "ffn_hot", "ffn_total"):
        assert one[k] == two[k], k
    assert one["ffn_total"] == one["decode_steps"] * cfg.num_layers * cfg.intermediate_size


def test_host_int8_weights_through_the_overlapped_path(tiny):
    """The host handle reads quantized rows (the accelerator layout with int8 weights)."""
    dense, host, hot, preds = tiny
    cfg = dense.cfg
    q = load_params(dense.model_dir, cfg, quantize="int8", on_host=True)
    eng = build_hybrid_engine(cfg, q, mode="oracle", hot_indices=hot, max_seq_len=64, device_kernel="xla")
    ref = build_hybrid_engine(cfg, q, mode="oracle", hot_indices=hot, max_seq_len=64, device_kernel="numba")
    ids = _ids(seed=4)
    a, b = eng.logits_stepwise(ids, {}), ref.logits_stepwise(ids, {})
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_launch_precedes_the_device_work_which_precedes_collect():
    """The order XLA must keep for overlap, by data dependencies (an optimization barrier was not
    enough: XLA:CPU ran the device part first). The trace records every launch and collect."""
    from jax.experimental import io_callback

    from ops import host_async

    rng = np.random.default_rng(0)
    w = [rng.standard_normal((256, 64)).astype(np.float32) for _ in range(3)]
    handle = host_async.HostFFN("reglu", *w)
    events = []

    def device_part(x):
        # A marker on the device part's input: it runs when the device work can start.
        x = io_callback(lambda a: (events.append(("device", 0, 0.0)), a)[1], jax.ShapeDtypeStruct(x.shape, x.dtype), x)
        return x @ jnp.ones((64, 64), jnp.float32)

    @jax.jit
    def layer(x, ids, count):
        ticket, xd = host_async.launch(handle, x, ids, count)
        y = device_part(xd)
        return y + host_async.collect(handle, ticket, x.shape[0], after=y)

    host_async.TRACE = events
    try:
        x = jnp.asarray(rng.standard_normal((1, 64)), jnp.float32)
        ids = jnp.arange(256, dtype=jnp.int32)
        for _ in range(3):
            y = layer(x, ids, jnp.int32(100))
    finally:
        host_async.TRACE = None
    names = [e[0] for e in events if e[0] in ("launch", "device", "collect")]
    assert names == ["launch", "device", "collect"] * 3
    ref = handle.compute(np.asarray(x), np.asarray(ids), 100)[0] + np.asarray(x) @ np.ones((64, 64), np.float32)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


def test_generation_compiles_every_span_before_the_first_token(tiny):
    """No compilation pauses the token stream: every attention span a run can reach is compiled
    before the first token is handed out, and a second run compiles nothing."""
    from powerinfer_jax.engine import decode_spans

    from powerinfer_jax.loop_programs import programs

    dense, _, _, _ = tiny
    eng = pij.load(dense.model_dir, max_seq_len=512)
    seen = []

    def on_token(_id, _text):
        seen.append(sum(1 for sig in programs(eng).executables if sig[0] == "step"))

    res = eng.generate([1, 5, 9], max_new_tokens=200, temperature=0.0, stop_at_eos=False, on_token=on_token)
    spans = decode_spans(4, 3 + 199, 512)
    assert spans == [128, 256]
    assert seen and set(seen) == {len(spans)}
    again = eng.generate([1, 5, 9], max_new_tokens=200, temperature=0.0, stop_at_eos=False)
    assert again.stats["compile_s"] == 0.0 and again.token_ids == res.token_ids


_NUMBA_STATE = r"""
import json, sys
import powerinfer_jax as pij
from numba.core.registry import CPUDispatcher
from ops import host_elements, host_kernels, host_loops

def compiled():
    # host_kernels imports host_loops' kernels: key each dispatcher by where it is defined, counted once
    return {f"{v.py_func.__module__}.{v.py_func.__name__}": len(v.overloads)
            for m in (host_elements, host_loops, host_kernels)
            for v in vars(m).values() if isinstance(v, CPUDispatcher)}

eng = pij.load(sys.argv[1], sparsity=sys.argv[2] if sys.argv[2] != "dense" else None, max_seq_len=128)
at_load = compiled()
eng.generate("ROMEO:", max_new_tokens=8, temperature=0.0)
eng.generate(list(range(1, 101)), max_new_tokens=4, temperature=0.0)  # a prompt past every blas_min_tokens
print(json.dumps({"load": at_load, "after": compiled(), "warm_s": eng.host_kernel_warm_s}))
"""


@pytest.mark.parametrize("sparsity", ["dense", "predicted"])
def test_host_kernels_are_loaded_at_load_not_in_the_first_tokens(sparsity):
    """A fresh process: every numba kernel the bundled (bf16) model's generation calls exists once `pij.load`
    returns, so the first tokens neither compile nor load machine code (issue #11's warm-up)."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bundle = os.path.join(repo, "models", "shakespeare-relu-llama-prepared")
    out = subprocess.run([sys.executable, "-c", _NUMBA_STATE, bundle, sparsity], capture_output=True, text=True,
                         timeout=600, cwd=repo, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["warm_s"] > 0 and sum(state["load"].values()) > 0
    assert state["after"] == state["load"]
