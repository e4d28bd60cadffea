"""The 4-layer LLaMA-7B cut in int4, dense and hybrid (30% budget), decoding B rows at once (`generate_batch`),
old and new host_loops toggled in one process (two_tokens_ab's modules): `python engine_batch_ab.py [rounds] [B ...]`.
old = $OLD_OPS (default /tmp/w/old) host_loops_old.py / host_elements_old.py, the parent commit's files."""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = HERE.rsplit("/benchmarks/", 1)[0]
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.environ.get("OLD_OPS", "/tmp/w/old"))
import host_loops_old  # noqa: E402
import ops.host_kernels as hk  # noqa: E402
import ops.host_loops as host_loops_new  # noqa: E402
import precision  # noqa: E402
import subjects  # noqa: E402

NAMES = ["_down_kernel", "_down_kernel_serial", "_ffn_kernel", "_ffn_kernel_serial", "_h_kernel", "_h_kernel_serial",
         "_matvec_q4_kernel", "_matvec_q4_kernel_serial"]
MODS = {"old": host_loops_old, "new": host_loops_new}


def use(which):
    """Points ops.host_kernels at the old or new kernels."""
    for n in NAMES:
        setattr(hk, n, getattr(MODS[which], n))


rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 4
batches = [int(b) for b in sys.argv[2:]] or [4, 16]
s = subjects.synthetic_subject(4, 32000, 1024, 16)
engines, info = precision._engines(s, "int4", 0.3, 256)
rng = np.random.default_rng(7)
for B in batches:
    prompts = [rng.integers(3, s.cfg.vocab_size, 16).tolist() for _ in range(B)]
    for kind, eng in engines.items():
        res = {"old": [], "new": []}
        for v in res:
            use(v)
            eng.generate_batch(prompts, max_new_tokens=3, stop_at_eos=False)
        for r in range(rounds):
            for v in (["old", "new"] if r % 2 == 0 else ["new", "old"]):
                use(v)
                st = eng.generate_batch(prompts, max_new_tokens=8, stop_at_eos=False)[0].stats
                res[v].append(1e3 * st["decode_s"] / st["decode_steps"])
        o, n = np.median(res["old"]), np.median(res["new"])
        paired = np.round(np.array(res["old"]) / np.array(res["new"]), 2)
        print(f"int4 {kind}, {B} rows: old {o:.1f} ms/step, new {n:.1f}, old/new {o / n:.2f}x, paired {paired}",
              flush=True)
