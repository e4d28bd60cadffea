"""Perplexity of the bundled model through the decode path (one token a step: where int8 activations apply; the
prompt path takes BLAS from 48 tokens, exact either way): bf16, int4, int4 with int8 activations.
`python stepwise_ppl.py [tokens]` (held-out last 10% of tinyshakespeare, windows of 128 with BOS first, as bin/eval)."""
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__)).rsplit("/benchmarks/", 1)[0]
sys.path.insert(0, ROOT)
import powerinfer_jax as pij  # noqa: E402

n_tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
text = open(os.path.join(ROOT, "data", "tinyshakespeare.txt"), encoding="utf-8").read()
engines = {"bfloat16": pij.load(), "int4": pij.load(quantize="int4"),
           "int4, int8 activations": pij.load(quantize="int4", int4_activations="int8")}
first = next(iter(engines.values()))
ids = first.encode(text[int(len(text) * 0.9):])
bos = first.cfg.bos_token_id
windows = [[bos] + ids[i:i + 127] for i in range(0, min(n_tokens, len(ids)) - 127, 127)]
print(f"{sum(len(w) - 1 for w in windows)} tokens in {len(windows)} windows of 128 (BOS first), decode path")
nll = {k: [] for k in engines}
for w in windows:
    for k, e in engines.items():
        logits = e.logits_stepwise(w)[:-1].astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll[k].extend((logz - logits[np.arange(len(w) - 1), w[1:]]).tolist())
base = None
for k, v in nll.items():
    ppl = float(np.exp(np.mean(v)))
    base = base or ppl
    print(f"{k}: perplexity {ppl:.4f} ({100 * (ppl / base - 1):+.2f}% vs bfloat16)")
