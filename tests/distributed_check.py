"""Run by tests/test_distributed.py: one process of a multi-process run (or, with num_processes 0,
the single-process reference). Prints one JSON line of results."""

import json
import sys


def main(coordinator: str, num_processes: int, process_id: int, bundle: str, budget: str) -> None:
    if num_processes:
        from powerinfer_jax import distributed

        distributed.initialize(coordinator, num_processes, process_id)
    import jax

    import powerinfer_jax as pij

    devices = jax.device_count() if num_processes else None
    e = pij.load(bundle, sparsity="predicted", device_memory_budget=budget, max_seq_len=256, devices=devices)
    res = e.generate("ROMEO:", max_new_tokens=16, temperature=0.0, stop_at_eos=False)
    ffn = e.params.layers[0].ffn
    print("RESULT " + json.dumps({
        "process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
        "tokens": res.token_ids, "hot": e.memory_report()["hot_neurons_per_layer"],
        "local_hot_rows": [int(s.data.shape[0]) for s in ffn.hot.w_up.data.addressable_shards] if num_processes else [],
        "local_cold_ids": [int(s.data.shape[0]) for s in ffn.cold_ids.addressable_shards] if num_processes else [],
    }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
