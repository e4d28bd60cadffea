"""The 4-layer LLaMA-7B cut in int4 (dense and hybrid at a 30% budget), old and new int4 down kernels toggled in
one process (kernel_ab.use), alternating rounds: `python engine_ab.py [rounds]`."""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE.rsplit("/benchmarks/", 1)[0], "benchmarks"))
import kernel_ab  # noqa: E402  (old/new modules; its cases run only as a script)
import precision  # noqa: E402
import subjects  # noqa: E402
from suite import run_engine  # noqa: E402

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 6
fmt = sys.argv[2] if len(sys.argv) > 2 else "int4"
s = subjects.synthetic_subject(4, 32000, 1024, 16)
engines, info = precision._engines(s, fmt, 0.3, 256)
for kind, eng in engines.items():
    res = {"old": [], "new": []}
    for v in res:
        kernel_ab.use(v)
        run_engine(eng, s.prompt_ids, 16)
    for r in range(rounds):
        for v in (["old", "new"] if r % 2 == 0 else ["new", "old"]):
            kernel_ab.use(v)
            res[v].append(1000 / run_engine(eng, s.prompt_ids, 16)["decode_tok_s"])
    o, n = np.median(res["old"]), np.median(res["new"])
    paired = np.round(np.array(res["old"]) / np.array(res["new"]), 2)
    print(f"{fmt} {kind}: old {o:.1f} ms/token, new {n:.1f}, old/new {o / n:.2f}x, paired {paired}", flush=True)
