#!/bin/bash
# A/B: old (HEAD before the 4x4 kernel) vs new, alternating processes, 4-layer 7B cut, dense bf16 (and int8)
out=/tmp/w/ab_results.txt; : > $out
for q in ""; do
for rep in 1 2; do
  for tree in /tmp/w/old /work/main; do
    cd $tree
    res=$(OMP_WAIT_POLICY=PASSIVE python -m benchmarks.realsize --run dense $q --ckpt /work/main/runs/synthetic-4l --new_tokens 16 --prompt_len 16 --serve_clients 1,4,16 --rounds 2 2>/dev/null | tail -1)
    echo "$tree q=$q rep=$rep $res" >> $out
  done
done
done
echo finished >> $out
