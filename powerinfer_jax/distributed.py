"""Several processes serving one model (PowerInfer-JAX over `jax.distributed`).

Every process runs the same program: `initialize(...)` first, then
`pij.load(bundle, devices=jax.device_count(), ...)` and the same `generate` calls. The mesh then
spans every process's devices; each device holds its share of every layer's hot rows and each
process's host computes its devices' share of the cold rows (`sparse_ffn.HybridRuntime._mesh_ffn`);
partial sums meet through XLA's collectives (gloo between CPU processes, NCCL between GPUs).
Nothing else crosses processes: the weights are read by every process from its own copy of the
files (memory-mapped: a process only touches the rows it owns), and a placement solved at load is
broadcast from process 0 (`jax.experimental.multihost_utils`), so every process uses the same one.

    # on each of N hosts (or N processes on one host), process_id 0..N-1:
    from powerinfer_jax import distributed
    distributed.initialize("host0:12355", num_processes=N, process_id=i)
    engine = pij.load("prepared/model", sparsity="predicted", device_memory_budget="8GiB",
                      devices=jax.device_count())
"""

from __future__ import annotations

import jax
import numpy as np


def initialize(coordinator_address: str, num_processes: int, process_id: int, local_device_ids=None) -> None:
    """Joins this process to a multi-process run (call before anything else touches JAX). On the CPU
    backend it selects the gloo collectives, so partial sums can cross processes."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)


def same_on_every_process(hot: list[np.ndarray], n: int) -> list[np.ndarray]:
    """Process 0's hot neuron ids per layer, on every process (identity in a single process): a
    placement solved at load must be identical everywhere, whatever each solver's time limit did."""
    if jax.process_count() == 1:
        return hot
    from jax.experimental import multihost_utils

    masks = np.zeros((len(hot), n), np.bool_)
    for l, h in enumerate(hot):
        masks[l, np.asarray(h, np.int64)] = True
    masks = np.asarray(multihost_utils.broadcast_one_to_all(masks))
    return [np.flatnonzero(m).astype(np.int32) for m in masks]
