"""Bundled model quantized to int4: greedy tokens of each prompt alone vs in a batch of 5 (dense), and int4 against bf16."""
import sys
sys.path.insert(0, "/work/main")
import powerinfer_jax as pij
eng = pij.load(quantize="int4")
prompts = ["ROMEO:", "JULIET:\nO Romeo", "First Citizen:\nBefore we proceed", "KING RICHARD III:", "To be, or not"]
ids = [eng.encode(p) for p in prompts]
batch = eng.generate_batch(ids, max_new_tokens=24, stop_at_eos=False)
same = 0
for i, p in enumerate(ids):
    alone = eng.generate_batch([p], max_new_tokens=24, stop_at_eos=False)[0]
    same += alone.token_ids == batch[i].token_ids
    if alone.token_ids != batch[i].token_ids:
        print("differs:", prompts[i], alone.token_ids, batch[i].token_ids)
print(f"int4 dense: {same}/5 prompts give the same greedy tokens alone and in a batch of 5")
print(repr(batch[0].text[:120]))
