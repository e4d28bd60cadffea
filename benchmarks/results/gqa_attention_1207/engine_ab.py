"""In-process old/new A/B of the decode attention kernel (../attention_inlined_1207/toggle.py; OLD_ATTENTION: the
parent commit's ops/host_attention.py saved elsewhere) on a 4-layer grouped-query cut: LLaMA-7B layer dimensions
with 8 kv heads for 32 query heads (Llama-3's grouping), bf16 weights, dense, bf16 KV cache.
usage: OLD_ATTENTION=/tmp/w/attn_old_mod.py python engine_ab.py  (ROUNDS, CASES as in inproc_7b.py there)"""
import os, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "attention_inlined_1207"))
from inproc_7b import ab_rounds  # also: the toggle, chdir to the checkout, benchmarks/ on the path
from powerinfer_jax.engine import Engine
from powerinfer_jax.loading import to_device
import subjects
s = subjects.synthetic_subject(4, 32000, 1024, 16, shape={"kv_heads": 8})
eng = Engine(s.cfg, to_device(s.host_in("bfloat16")), max_seq_len=2048, kv_dtype="bfloat16")
# each round prefills again: 1800 tokens ~30 s here
ab_rounds(eng, s.cfg.vocab_size, [(1, 1800, 12), (4, 900, 8), (16, 16, 8)],
          "GQA 4-layer bf16 dense (32 q / 8 kv heads), KV bf16")
