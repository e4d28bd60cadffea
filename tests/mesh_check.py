"""Run by tests/test_mesh.py in a fresh process with 4 host-platform CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=4 must be set before JAX starts): prints one
JSON line of results for the test to assert on."""

import json
import os
import sys

import numpy as np

import powerinfer_jax as pij
from powerinfer_jax.hybrid import build_hybrid_engine
from powerinfer_jax.loading import load_params
from powerinfer_jax.memory import parse_bytes
from powerinfer_jax.sparse_ffn import PredictorParams


def main(model_dir: str, bundle_dir: str, budget: str) -> None:
    import jax

    out = {"devices": len(jax.devices())}
    dense = pij.load(model_dir, max_seq_len=64, kv_dtype="float32")  # the engines below: float32 caches
    cfg = dense.cfg
    host = load_params(model_dir, cfg, on_host=True)
    rng = np.random.default_rng(0)
    hot = [np.sort(rng.choice(cfg.intermediate_size, cfg.intermediate_size // 3, replace=False))
           for _ in range(cfg.num_layers)]
    ids = [1] + rng.integers(3, cfg.vocab_size, 11).tolist()
    ref = dense.logits(ids)
    preds = [PredictorParams(fc1=rng.standard_normal((cfg.hidden_size, 16)).astype(np.float32),
                             fc2=rng.standard_normal((16, cfg.intermediate_size)).astype(np.float32))
             for _ in range(cfg.num_layers)]
    out["oracle_rel"], out["dense_rel"], out["predicted_tokens"] = {}, {}, {}
    for n in (1, 2, 4):
        e = build_hybrid_engine(cfg, host, mode="oracle", hot_indices=hot, max_seq_len=64, devices=n)
        out["oracle_rel"][n] = float(np.abs(e.logits_stepwise(ids) - ref).max() / np.abs(ref).max())
        serial = build_hybrid_engine(cfg, host, mode="oracle", hot_indices=hot, max_seq_len=64, devices=n, overlap=False)
        out.setdefault("serial_rel", {})[n] = float(np.abs(serial.logits_stepwise(ids) - ref).max() / np.abs(ref).max())
        e = build_hybrid_engine(cfg, host, mode="dense", hot_indices=hot, max_seq_len=64, devices=n)
        out["dense_rel"][n] = float(np.abs(e.logits(ids) - ref).max() / np.abs(ref).max())
        e = build_hybrid_engine(cfg, host, mode="predicted", hot_indices=hot, predictors=preds,
                                thresholds=[1.0] * cfg.num_layers, max_seq_len=64, devices=n)
        out["predicted_tokens"][n] = e.generate([1, 5, 9], max_new_tokens=12, temperature=0.0,
                                                stop_at_eos=False).token_ids
    # SwiGLU, CATS oracle on the mesh: equals the thresholded dense model, and counts what it computed.
    from powerinfer_jax.bundle import load_bundle
    from powerinfer_jax.engine import Engine
    from powerinfer_jax.ffn import thresholded_ffn_fn

    silu_bundle = load_bundle(os.path.join(os.path.dirname(bundle_dir), "shakespeare-silu-llama-prepared"))
    silu = pij.load(silu_bundle.model_dir, max_seq_len=64, kv_dtype="float32")
    act = silu_bundle.act_thresholds
    silu_ref = Engine(silu.cfg, silu.params, ffn_fn=thresholded_ffn_fn(silu.cfg, act), max_seq_len=64).logits(ids)
    silu_host = load_params(silu_bundle.model_dir, silu.cfg, on_host=True)
    out["cats_rel"], out["cats_share"] = {}, {}
    for n in (2, 4):
        e = build_hybrid_engine(silu.cfg, silu_host, mode="oracle", hot_indices=hot, max_seq_len=64, devices=n,
                                act_thresholds=act)
        stats = {}
        out["cats_rel"][n] = float(np.abs(e.logits_stepwise(ids, stats) - silu_ref).max() / np.abs(silu_ref).max())
        out["cats_share"][n] = stats["ffn_computed"] / stats["ffn_total"]
    # The real pipeline: a prepared bundle, the budget per device, the placement solved for the mesh.
    out["bundle"] = {}
    for n in (1, 2, 4):
        e = pij.load(bundle_dir, sparsity="predicted", device_memory_budget=budget, max_seq_len=256, devices=n)
        rep = e.memory_report()
        res = e.generate("ROMEO:", max_new_tokens=16, temperature=0.0, stop_at_eos=False)
        out["bundle"][n] = {"tokens": res.token_ids, "per_device": rep["per_device"],
                            "hot": rep["hot_neurons_per_layer"], "budget": parse_bytes(budget),
                            "shards": sorted({str(s.device) for s in
                                              e.params.layers[0].ffn.hot.w_up.data.addressable_shards})
                            if e.params.layers[0].ffn.hot is not None else []}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:4])
