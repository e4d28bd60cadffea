"""The bundled model in int4 with int8 activations: greedy tokens of 5 prompts alone and in one batch of 5 (the
same, as every format), and against int4 with float32 activations (how often the rounding changes a token)."""
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__)).rsplit("/benchmarks/", 1)[0]
sys.path.insert(0, ROOT)
import powerinfer_jax as pij  # noqa: E402

prompts = ["ROMEO:", "JULIET:\nO Romeo, Romeo!", "First Citizen:\nBefore we proceed", "KING HENRY:", "To be, or not"]
exact = pij.load(quantize="int4")
fast = pij.load(quantize="int4", int4_activations="int8")
ids = [fast.encode(p) for p in prompts]
batch = fast.generate_batch(ids, max_new_tokens=48, temperature=0.0, stop_at_eos=False)
same_batch = same_tok = total = 0
for i, p in enumerate(ids):
    alone = fast.generate(p, max_new_tokens=48, temperature=0.0, stop_at_eos=False).token_ids
    ref = exact.generate(p, max_new_tokens=48, temperature=0.0, stop_at_eos=False).token_ids
    same_batch += alone == batch[i].token_ids
    first_diff = next((j for j, (a, b) in enumerate(zip(alone, ref)) if a != b), len(ref))
    same_tok += first_diff
    total += len(ref)
    print(f"prompt {i}: alone == batch: {alone == batch[i].token_ids}; int8 activations follow float32 for "
          f"{first_diff}/{len(ref)} tokens")
print(f"{same_batch}/{len(ids)} prompts: the same greedy tokens alone and in the batch; "
      f"{same_tok}/{total} tokens before the first difference from float32 activations")
