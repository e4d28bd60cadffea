#!/usr/bin/env python3
"""Dense decode throughput: PowerInfer-JAX vs HF transformers (torch eager, CPU), side by side.

Builds a random LLaMA-ReGLU checkpoint (default: 4 layers, hidden 512, FFN 2048) or uses
--model, then alternates the two engines for --repeats rounds of greedy decoding and reports
medians. Prints a markdown table and writes JSON to benchmarks/results/.
"""

import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "HF model folder; default: a random LLaMA-ReGLU built from the flags below.")
flags.DEFINE_integer("layers", 4, "Layers of the random model.")
flags.DEFINE_integer("hidden", 512, "Hidden size of the random model.")
flags.DEFINE_integer("ffn", 2048, "FFN size of the random model.")
flags.DEFINE_integer("vocab", 4096, "Vocabulary of the random model.")
flags.DEFINE_integer("prompt_len", 16, "Prompt tokens.")
flags.DEFINE_integer("new_tokens", 64, "Generated tokens per round.")
flags.DEFINE_integer("repeats", 5, "Alternating rounds per engine (medians reported).")
flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads (0: torch's default).")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "dense_decode_cpu.json"),
                    "JSON output path.")


def main(argv):
    del argv
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import powerinfer_jax as pij

    if FLAGS.torch_threads:
        torch.set_num_threads(FLAGS.torch_threads)
    tmp = None
    path = FLAGS.model
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        path = tmp.name
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=FLAGS.vocab, hidden_size=FLAGS.hidden, intermediate_size=FLAGS.ffn,
                          num_hidden_layers=FLAGS.layers, num_attention_heads=FLAGS.hidden // 64,
                          hidden_act="relu", max_position_embeddings=1024)
        LlamaForCausalLM(cfg).save_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = pij.load(path, max_seq_len=256)
    prompt = [1] + np.random.default_rng(0).integers(3, 100, FLAGS.prompt_len - 1).tolist()
    n = FLAGS.new_tokens

    def run_ours():
        r = engine.generate(prompt, max_new_tokens=n, stop_at_eos=False)
        return r.stats["decode_tokens_per_s"]

    def run_hf():
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf(ids, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(n - 1):
                out = hf(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            return (n - 1) / (time.perf_counter() - t0)

    run_ours(), run_hf()  # warm-up: compiles and allocator warm-up
    ours, theirs = [], []
    for _ in range(FLAGS.repeats):
        ours.append(run_ours())
        theirs.append(run_hf())
    res = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "model": FLAGS.model or
        f"random LLaMA-ReGLU {FLAGS.layers}x{FLAGS.hidden} ffn {FLAGS.ffn} vocab {FLAGS.vocab}",
        "new_tokens": n, "repeats": FLAGS.repeats,
        "ours_tok_s_median": float(np.median(ours)), "ours_tok_s_all": ours,
        "transformers_tok_s_median": float(np.median(theirs)), "transformers_tok_s_all": theirs,
        "ratio_ours_over_transformers": float(np.median(ours) / np.median(theirs)),
    }
    print("| engine | decode tok/s (median) | min | max |\n|---|---|---|---|")
    print(f"| PowerInfer-JAX dense | {np.median(ours):.1f} | {min(ours):.1f} | {max(ours):.1f} |")
    print(f"| transformers eager | {np.median(theirs):.1f} | {min(theirs):.1f} | {max(theirs):.1f} |")
    print(f"ratio ours/transformers: {res['ratio_ours_over_transformers']:.2f}x")
    os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    app.run(main)
