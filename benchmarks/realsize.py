"""Proof at real size: a 32-layer LLaMA-7B-shaped checkpoint in bf16 (~13.5 GB) on a 24 GB machine.

`write_checkpoint` writes the synthetic power-law model of `benchmarks/synthetic.py` at full depth
as an HF folder (bf16 safetensors, streamed tensor by tensor: the file never sits in memory),
then calibrates its predictors on residual-stream samples of the written model and stores them
beside it (`predictors.safetensors`, `rates.npy`). Each configuration then runs in its own
process (`python -m benchmarks.realsize --run ...`), so its peak RSS and load time are its own:
load, compile, generate greedy tokens, report JSON. `run_all` drives them one after the other.
The weights are random: only speed and memory mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

from powerinfer_jax.tensor_file import MappedSafetensors, save_aligned

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREDICTORS = "predictors.safetensors"  # fc1 [L, d, r], fc2 [L, r, n_ff], rates [L, n_ff]
BF16 = np.dtype(ml_dtypes.bfloat16)


def hf_config(layers: int, vocab: int, hidden: int = 4096, ffn: int = 11008, heads: int = 32) -> dict:
    """config.json of the synthetic ReGLU LLaMA."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "relu",
            "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": vocab,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def _tensor_specs(c: dict) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    d, n, V, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    specs = [("model.embed_tokens.weight", BF16, (V, d))]
    for i in range(L):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", BF16, (d,)), (p + "post_attention_layernorm.weight", BF16, (d,))]
        specs += [(p + f"self_attn.{k}_proj.weight", BF16, (d, d)) for k in "qkvo"]
        specs += [(p + "mlp.gate_proj.weight", BF16, (n, d)), (p + "mlp.up_proj.weight", BF16, (n, d)),
                  (p + "mlp.down_proj.weight", BF16, (d, n))]
    return specs + [("model.norm.weight", BF16, (d,)), ("lm_head.weight", BF16, (V, d))]


def write_checkpoint(out_dir: str, layers: int = 32, vocab: int = 32000, seed: int = 0, predictor_rank: int = 1024,
                     calib_tokens: int = 128, shape: dict | None = None, log=print, **rate_kw) -> None:
    """Writes the checkpoint (skipped when complete), then its calibrated predictors and rates."""
    from powerinfer_jax.tensor_file import write_streaming

    from benchmarks.synthetic import BIAS_FEATURE

    os.makedirs(out_dir, exist_ok=True)
    c = hf_config(layers, vocab, **(shape or {}))
    ckpt = os.path.join(out_dir, "model.safetensors")
    if not os.path.isfile(ckpt):
        rng = np.random.default_rng(seed)
        written = [0]

        def produce(name: str) -> np.ndarray:
            shape_ = next(s for k, _, s in specs if k == name)
            if name.endswith("norm.weight"):
                return np.ones(shape_, BF16)
            fan_in = shape_[1]
            std = fan_in ** -0.5 * (0.5 if ("o_proj" in name or "down_proj" in name) else 1.0)
            if "embed_tokens" in name:
                std = 1.0
            w = (rng.standard_normal(shape_, dtype=np.float32) * np.float32(std))
            if "embed_tokens" in name:
                w[:, 0] = BIAS_FEATURE  # the constant feature the predictors' bias channel reads
            if "o_proj" in name or "down_proj" in name:
                w[0] = 0.0  # outputs never write residual dim 0 (HF layout: row 0 is output 0)
            return w.astype(BF16)

        def progress(name, nbytes):
            written[0] += nbytes
            if name.endswith("down_proj.weight"):
                log(f"[realsize] wrote {name.split('.')[2]}: {written[0] / 1e9:.1f} GB")

        specs = _tensor_specs(c)
        t0 = time.time()
        write_streaming(ckpt, specs, produce, metadata={"format": "pt"}, progress=progress)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(c, f, indent=2)
        log(f"[realsize] checkpoint {os.path.getsize(ckpt) / 1e9:.2f} GB in {time.time() - t0:.0f} s")
    if not os.path.isfile(os.path.join(out_dir, PREDICTORS)):
        # In its own process, like every measurement: the caller never holds the 13.5 GB model.
        cmd = [sys.executable, "-m", "benchmarks.realsize", "--calibrate", "--ckpt", out_dir, "--seed", str(seed),
               "--predictor_rank", str(predictor_rank), "--calib_tokens", str(calib_tokens),
               "--rate_kw", json.dumps(rate_kw)]
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"calibrating the predictors failed: {res.stderr[-3000:]}")
        log(res.stdout.strip())


def _calibrate(out_dir: str, seed: int, rank: int, calib_tokens: int, log, **rate_kw) -> None:
    """Predictors with power-law biases, calibrated on the written model's own residual stream."""
    import powerinfer_jax as pij
    from benchmarks import synthetic
    from benchmarks.suite import collect_residuals

    eng = pij.load(out_dir, max_seq_len=256)
    cfg = eng.cfg
    rng = np.random.default_rng(seed + 1)
    d, n = cfg.hidden_size, cfg.intermediate_size
    base = synthetic.power_law_rates(n, **rate_kw)
    rates = np.stack([base[rng.permutation(n)] for _ in range(cfg.num_layers)])
    fc1s, fc2s = [], []
    for _ in range(cfg.num_layers):
        fc1 = rng.standard_normal((d, rank), dtype=np.float32) * np.float32(d ** -0.5)
        fc1[:, 0] = 0.0
        fc1[0, 0] = 1.0 / synthetic.BIAS_FEATURE
        fc2 = rng.standard_normal((rank, n), dtype=np.float32) * np.float32(rank ** -0.5)
        fc2[0] = 0.0
        fc1s.append(fc1)
        fc2s.append(fc2)
    t0 = time.time()
    samples = collect_residuals(eng.params, cfg, rng.integers(3, cfg.vocab_size, calib_tokens).astype(np.int32))
    log(f"[realsize] residual samples of {cfg.num_layers} layers in {time.time() - t0:.0f} s")
    model = synthetic.SyntheticModel(cfg, None, [synthetic.PredictorParams(a, b) for a, b in zip(fc1s, fc2s)],
                                     rates, rank)
    synthetic.calibrate_predictors(model, samples)
    save_aligned({"fc1": np.stack(fc1s), "fc2": np.stack(fc2s), "rates": rates.astype(np.float32)},
                 os.path.join(out_dir, PREDICTORS))  # mapped by each run: no copy of the 2 GB
    log("[realsize] predictors calibrated")


def run_config(ckpt_dir: str, kind: str, quantize: str | None, budget_fraction: float, new_tokens: int,
               prompt_len: int, max_seq_len: int, serve_clients: list[int] | None = None, rounds: int = 2) -> dict:
    """Loads one configuration, generates `new_tokens` greedy tokens, returns times and memory; with
    `serve_clients`, then serves that many concurrent clients through the continuous batcher (`serve_rounds`)."""
    import jax

    import powerinfer_jax as pij
    from ops.linear import prompt_bf16_parts
    from powerinfer_jax import memory
    from offline.bundle import PlacementSettings, solve_placement
    from powerinfer_jax.config import load_config
    from powerinfer_jax.hybrid import build_hybrid_engine, predicted_capacities
    from powerinfer_jax.loading import load_params
    from powerinfer_jax.sparse_ffn import PredictorParams, engine_predictor, predictor_format

    cfg = load_config(ckpt_dir)
    int8_activations = quantize == "int4-a8"  # int4 weights whose host kernels take int8 activations
    quantize = "int4" if int8_activations else quantize
    from ops.quant import to_weight  # runtimes up before the baseline: JAX's backend, numba's quantizers

    jax.numpy.ones(4).block_until_ready()
    to_weight(np.ones((64, 64), np.float32), "int8"), to_weight(np.ones((64, 64), np.float32), "int4")
    baseline = _rss_now()
    t0 = time.perf_counter()
    info: dict = {}
    if kind == "dense":
        eng = pij.load(ckpt_dir, quantize=quantize, max_seq_len=max_seq_len)
    else:
        z = MappedSafetensors(os.path.join(ckpt_dir, PREDICTORS))
        fc1, fc2, rates = z.view("fc1"), z.view("fc2"), z.view("rates")
        host = load_params(ckpt_dir, cfg, quantize=quantize, on_host=True)
        pfmt = predictor_format(host.layers[0].ffn.w_up.fmt)
        preds = []
        for l in range(cfg.num_layers):  # converted layer by layer, the f32 source pages dropped as we go
            preds.append(PredictorParams(fc1=fc1[l], fc2=fc2[l]) if pfmt == "float32"
                         else engine_predictor(fc1[l], fc2[l], pfmt))
            if pfmt != "float32":
                z.release_view(fc1[l]), z.release_view(fc2[l])
        fmt = host.layers[0].ffn.w_up.fmt
        pred_bytes = int(fc1.nbytes + fc2.nbytes)
        fixed = sum(v for _, v in memory.fixed_groups(cfg, fmt, pred_bytes, max_seq_len))  # as the solver counts
        budget = fixed + int(budget_fraction * memory.ffn_total_bytes(cfg, fmt))
        tokens = 1_000_000
        ps = PlacementSettings(budget_bytes=budget, dtype=fmt, max_context=max_seq_len, batch=64)
        p, _ = solve_placement(cfg, np.round(rates * tokens), tokens, pred_bytes, ps)
        hot = [np.asarray(h, np.int32) for h in p.hot_indices]
        caps = predicted_capacities(rates, hot, [1.0] * cfg.num_layers)
        eng = build_hybrid_engine(cfg, host, mode="predicted", hot_indices=hot, predictors=preds,
                                  thresholds=[0.0] * cfg.num_layers, capacities=caps, max_seq_len=max_seq_len)
        info = {"budget_bytes": budget, "hot_fraction": float(sum(len(h) for h in hot) / (cfg.num_layers * cfg.intermediate_size)),
                "placement_method": p.method}
        del host
    if int8_activations:
        eng.set_int4_activations("int8")
    jax.block_until_ready(jax.tree.leaves(eng.params))
    load_s = time.perf_counter() - t0
    rss_after_load = _rss_now()
    prompt = list(np.random.default_rng(0).integers(3, cfg.vocab_size, prompt_len))
    r = eng.generate(prompt, max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    st = r.stats
    out = {"kind": kind, "quantize": "int4-a8" if int8_activations else quantize, "load_s": load_s, "compile_s": st["compile_s"],
           "decode_tok_s": st["decode_tokens_per_s"], "ms_per_token": 1000 / st["decode_tokens_per_s"],
           "prefill_tok_s": st["prefill_tokens_per_s"], "decode_steps": st["decode_steps"],
           "rss_after_load_bytes": rss_after_load, "baseline_rss_bytes": baseline, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "weights_bytes": _weights_bytes(eng), "prompt_bf16_parts": prompt_bf16_parts(), **info}
    if "ffn_computed" in st:
        out["ffn_computed_per_token"] = st["ffn_computed"] / max(st["decode_steps"], 1)
    rep = eng.memory_report() if hasattr(eng, "memory_report") else None
    if rep:
        out["resident_total"] = rep["resident_total"]
    if serve_clients:
        out["serve"] = serve_rounds(eng, serve_clients, new_tokens, prompt_len, rounds)
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def serve_rounds(eng, clients: list[int], new_tokens: int, prompt_len: int, rounds: int) -> dict:
    """bench_serve's rounds at real size: a ContinuousBatcher of max(clients) rows (what bin/serve runs), its
    programs compiled first; `rounds` rounds per client count of one request per client, distinct random
    prompts. Returns per client count the medians of tok/s, TTFT, inter-token p50/p99 and mean batch."""
    from benchmarks.bench_serve import run_round
    from powerinfer_jax.batching import ContinuousBatcher

    rng = np.random.default_rng(7)
    prompts = [[int(t) for t in rng.integers(3, eng.cfg.vocab_size, prompt_len)] for _ in range(max(clients))]
    batcher = ContinuousBatcher(eng, max_batch=max(clients)).start()
    try:
        out = {"max_batch": max(clients), "compile_s": batcher.warmup()}
        keys = ("tok_s", "ttft_p50_ms", "itl_p50_ms", "itl_p99_ms", "mean_batch", "carrying")
        for c in clients:
            runs = [run_round(batcher, prompts, c, 1, new_tokens) for _ in range(rounds)]
            out[str(c)] = {k: float(np.median([r[k] for r in runs])) for k in keys}
            out[str(c)]["tokens"] = int(sum(r["tokens"] for r in runs))
            print(f"[realsize] {c} clients: " + ", ".join(f"{k} {v:.1f}" for k, v in out[str(c)].items()),
                  file=sys.stderr, flush=True)
    finally:
        batcher.stop()
    return out


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _weights_bytes(eng) -> int:
    from powerinfer_jax.hybrid import resident_bytes

    return int(sum(resident_bytes(eng.params, getattr(getattr(eng, "runtime", None), "host_ffn", ())).values()))


def run_all(ckpt_dir: str, configs: list[tuple[str, str | None]], budget_fraction: float, new_tokens: int,
            prompt_len: int, max_seq_len: int, log=print) -> list[dict]:
    """Each configuration in its own process (clean peak RSS), one after the other."""
    rows = []
    for kind, q in configs:
        cmd = [sys.executable, "-m", "benchmarks.realsize", "--run", kind, "--ckpt", ckpt_dir,
               "--budget_fraction", str(budget_fraction), "--new_tokens", str(new_tokens),
               "--prompt_len", str(prompt_len), "--max_seq_len", str(max_seq_len)] + (["--quantize", q] if q else [])
        log(f"[realsize] {kind} {q or 'bf16'}: {' '.join(cmd[1:])}")
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        if res.returncode != 0 or not lines:
            log(f"[realsize] failed ({res.returncode}): {res.stderr[-2000:]}")
            rows.append({"kind": kind, "quantize": q, "error": res.stderr[-2000:]})
            continue
        row = json.loads(lines[-1])
        log(f"  load {row['load_s']:.1f} s, {row['ms_per_token']:.0f} ms/token, peak RSS {row['peak_rss_bytes'] / 1e9:.2f} GB "
            f"(weights {row['weights_bytes'] / 1e9:.2f} GB)")
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", choices=["dense", "hybrid"])
    ap.add_argument("--calibrate", action="store_true", help="calibrate and store the predictors, then exit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--predictor_rank", type=int, default=1024)
    ap.add_argument("--calib_tokens", type=int, default=128)
    ap.add_argument("--rate_kw", default="{}", help="power_law_rates keyword arguments (JSON)")
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--quantize", default=None, choices=["int8", "int4", "int4-a8"],
                    help="int4-a8: int4 weights with int8 activations (Engine.set_int4_activations)")
    ap.add_argument("--budget_fraction", type=float, default=0.3)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--prompt_len", type=int, default=16)
    ap.add_argument("--max_seq_len", type=int, default=64)
    ap.add_argument("--serve_clients", default="", help="after the load: serve these concurrent client counts "
                    "(e.g. 1,4) through the continuous batcher, one request each per round")
    ap.add_argument("--rounds", type=int, default=2, help="--serve_clients rounds per client count")
    a = ap.parse_args()
    import powerinfer_jax  # noqa: F401  (thread settings before numba loads)

    if a.calibrate:
        _calibrate(a.ckpt, a.seed, a.predictor_rank, a.calib_tokens, print, **json.loads(a.rate_kw))
        return
    if a.run is None:
        ap.error("--run or --calibrate is required")
    clients = [int(c) for c in a.serve_clients.split(",") if c.strip()]
    print(json.dumps(run_config(a.ckpt, a.run, a.quantize, a.budget_fraction, a.new_tokens, a.prompt_len,
                                a.max_seq_len, clients, a.rounds)), flush=True)


if __name__ == "__main__":
    main()


def describe(ckpt_dir: str) -> dict:
    """What the checkpoint is (for the report)."""
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        c = json.load(f)
    size = os.path.getsize(os.path.join(ckpt_dir, "model.safetensors"))
    return {"path": ckpt_dir, "file_bytes": size, "layers": c["num_hidden_layers"], "hidden": c["hidden_size"],
            "ffn": c["intermediate_size"], "vocab": c["vocab_size"], "dtype": c.get("torch_dtype"),
            "note": "SYNTHETIC: random weights, power-law predictors; its quality means nothing, its speed and memory do"}


def with_floors(ckpt_dir: str, rows: list[dict], bandwidth: float) -> list[dict]:
    """Adds bytes touched per token, the floor and achieved/floor to each measured row."""
    from benchmarks import roofline
    from benchmarks.precision import weight_format
    from powerinfer_jax.config import load_config

    cfg = load_config(ckpt_dir)
    z = MappedSafetensors(os.path.join(ckpt_dir, PREDICTORS))
    (n_layers, d, rank), n_ff = z.shape("fc1"), z.shape("fc2")[2]
    for r in rows:
        if "error" in r:
            continue
        fmt = weight_format(r["quantize"] or "bfloat16")  # int4-a8 reads int4's bytes
        hybrid = r["kind"] == "hybrid"
        neurons = r.get("ffn_computed_per_token", cfg.num_layers * cfg.intermediate_size) if hybrid else \
            cfg.num_layers * cfg.intermediate_size
        pred_bytes = roofline.predictor_bytes([(d, rank, n_ff)] * n_layers, fmt)
        nbytes = roofline.decode_bytes(cfg, fmt, ffn_neurons_per_token=neurons, predictor_bytes=pred_bytes if hybrid else 0,
                                       attend_len=64, ffn_index=hybrid, table_dtype="bfloat16")
        r.update(bytes_per_token=nbytes, floor_ms=1000 * nbytes / bandwidth,
                 achieved_over_floor=nbytes / bandwidth / (r["ms_per_token"] / 1000),
                 peak_rss_over_weights=r["peak_rss_bytes"] / r["weights_bytes"],
                 peak_growth_over_weights=(r["peak_rss_bytes"] - r["baseline_rss_bytes"]) / r["weights_bytes"])
    return rows


def markdown(res: dict) -> str:
    """The real-size table."""
    c = res["checkpoint"]
    lines = [f"## Real size: {c['layers']} layers of LLaMA-7B shape, {c['dtype']}, {c['file_bytes'] / 1e9:.2f} GB file",
             "", f"{res['machine']}, jax {res['jax']}, {res['date']}. {c['note']}. Floor bandwidth "
             f"{res['floor_bandwidth_gbps']:.1f} GB/s. Each row is its own process (peak RSS is its own).", "",
             "Peak RSS counts the whole process; the runtimes before the load (Python, JAX, numba: the fixed "
             "overhead) are the baseline, and (peak - baseline) / weights is what the load and decoding added.", "",
             "| engine | weights | load s | peak RSS GB | baseline GB | weights GB | (peak-baseline)/weights | ms/token | "
             "floor ms | achieved/floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        name = r["kind"] + (f" {r.get('hot_fraction', 0):.0%} hot" if r["kind"] == "hybrid" and "hot_fraction" in r else "")
        if "error" in r:
            lines.append(f"| {name} | {r['quantize'] or 'bf16'} | failed: {(r['error'].strip().splitlines() or ['killed (out of memory?)'])[-1][:80]} ||||||||")
            continue
        lines.append(f"| {name} | {r['quantize'] or 'bf16'} | {r['load_s']:.1f} | {r['peak_rss_bytes'] / 1e9:.2f} | "
                     f"{r['baseline_rss_bytes'] / 1e9:.2f} | {r['weights_bytes'] / 1e9:.2f} | "
                     f"{r['peak_growth_over_weights']:.2f} | {r['ms_per_token']:.0f} | "
                     f"{r['floor_ms']:.0f} | {r['achieved_over_floor']:.0%} |")
    return "\n".join(lines)
