#!/bin/bash
for i in 1 2; do
  for t in base new; do
    if [ $t = base ]; then d=/tmp/w/base; else d=/work/main; fi
    s=$(date +%s)
    (cd $d && PYTHONPATH=$d timeout 900 python benchmarks/bench_serve.py --models synthetic --dense_dtypes bfloat16 --hybrid_dtype bfloat16 --clients 1,16 --repeats 2 --out /tmp/w/syn_${t}_$i > /tmp/w/syn_${t}_$i.log 2>&1)
    echo "$t $i $(( $(date +%s) - s )) s"; grep "^Ratios" /tmp/w/syn_${t}_$i.log
  done
done
