#!/usr/bin/env bash
# The one prepared GPU check (run on a lent GPU machine from the repo root; results into $OUT):
#   1. the device, jax and its backend;
#   2. the FFN kernels on the real Triton backend vs the reference, and their timings
#      (benchmarks/bench_ops.py: dense XLA, XLA gather, Pallas Triton; LLaMA-7B layer at 10%);
#   3. the engine end to end on the bundled model: dense on the device, dense layer offload and
#      hybrid predicted at the same budget (benchmarks/bench_engine.py);
#   4. the full suite, bin/bench (both models, budgets 10-100%, roofline, plots) -> bench_gpu.*;
#   5. every weight format side by side (f32, bf16, f16, int8, int4; dense and hybrid) on the 4-layer
#      LLaMA-7B cut: native bf16/f16 dots, dequantize-in-jit, the dequantizing Pallas kernels -> bench_formats_gpu.*;
#   6. one 7B layer's host time, device time and layer time with the host part overlapped or not, and
#      the launch/collect trace (benchmarks/bench_hybrid_layer.py) -> hybrid_layer_gpu.json;
#   7. serving through the continuous batcher, 1/4/16 clients, dense and hybrid, bundled and 7B-shaped
#      (benchmarks/bench_serve.py; on a GPU a 16-row step should cost about a 1-row one) -> serve_gpu.*;
#   8. threshold sparsity (issue #13) on the GPU: the SwiGLU bundled model at every budget, dense / offload /
#      hybrid predicted / CATS oracle (Pallas hot rows masked by |silu(gate x)|, host CATS for cold rows)
#      -> bench_silu_gpu/; the question it answers: CATS or predicted, faster at equal quality on a GPU?
#   9. the sampler (benchmarks/bench_sampling.py): bisection cuts vs the sort they replaced; on a GPU the sort
#      is fast, so this says whether sample_rows should sort there -> sampling_gpu.*
# Every step has its own time limit and the script goes on past a failure, so one run gives
# everything it can.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_info.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())" | tee -a "$OUT/gpu_info.txt"
if [ "${SKIP_OPS_BENCH:-0}" != 1 ]; then
  timeout "${OPS_TIMEOUT:-120}" python3 benchmarks/bench_ops.py --repeats 5 --out "$OUT/ops_gpu.json" 2>&1 \
    | tail -40 | tee "$OUT/ops_gpu.log"
fi
# The GPU-only kernel tests (skipped on CPU): the Pallas kernels compiled by Triton vs the reference.
timeout "${TEST_TIMEOUT:-100}" python3 -m pytest -q -p no:cacheprovider tests/test_ops_pallas.py 2>&1 \
  | tail -15 | tee "$OUT/pallas_tests_gpu.log"
timeout "${LAYER_TIMEOUT:-120}" python3 benchmarks/bench_hybrid_layer.py --repeats 30 \
  --out "$OUT/hybrid_layer_gpu.json" 2>&1 | grep -v "^I1\|^W1" | tail -12 | tee "$OUT/hybrid_layer_gpu.log"
timeout "${ENGINE_TIMEOUT:-180}" python3 benchmarks/bench_engine.py \
  --bundle models/shakespeare-relu-llama-prepared --repeats 3 --out "$OUT/engine_gpu.json" 2>&1 \
  | grep -v "^I1\|^W1" | tail -40 | tee "$OUT/engine_gpu.log"
if [ "${SKIP_SUITE:-0}" != 1 ]; then
  timeout "${SUITE_TIMEOUT:-420}" bin/bench --out_dir "$OUT" --tag gpu --repeats "${SUITE_REPEATS:-3}" 2>&1 \
    | grep -v "^I1\|^W1" | tail -60 | tee "$OUT/bench_gpu.log"
fi
if [ "${SKIP_FORMATS:-0}" != 1 ]; then
  timeout "${FORMATS_TIMEOUT:-300}" bin/bench --suites formats --out_dir "$OUT" --tag gpu --repeats 3 2>&1 \
    | grep -v "^I1\|^W1" | tail -40 | tee "$OUT/bench_formats_gpu.log"
fi
if [ "${SKIP_SERVE:-0}" != 1 ]; then
  timeout "${SERVE_TIMEOUT:-300}" python3 benchmarks/bench_serve.py --repeats 2 --requests_per_client 1 \
    --out "$OUT/serve_gpu" 2>&1 | grep -v "^I1\|^W1" | tail -40 | tee "$OUT/serve_gpu.log"
fi
if [ "${SKIP_SILU:-0}" != 1 ]; then
  timeout "${SILU_TIMEOUT:-240}" bin/bench --models bundled-silu --out_dir "$OUT/bench_silu_gpu" --tag gpu \
    --repeats 3 2>&1 | grep -v "^I1\|^W1" | tail -40 | tee "$OUT/bench_silu_gpu.log"
fi
if [ "${SKIP_SAMPLING:-0}" != 1 ]; then
  timeout "${SAMPLING_TIMEOUT:-120}" python3 benchmarks/bench_sampling.py --out "$OUT/sampling_gpu" 2>&1 \
    | grep -v "^I1\|^W1" | tail -20 | tee "$OUT/sampling_gpu.log"
fi
echo "gpu_check done"
