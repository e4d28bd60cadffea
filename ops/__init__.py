"""Sparse FFN kernels (PowerInfer-style), each beside a plain reference.

reference    dense/sparse jnp references and the shared conventions (read its docstring)
select       active-neuron selection into fixed-capacity index lists inside jit
xla_sparse   gather + dot with plain XLA ops (the CPU-backend path)
pallas_gpu   Pallas Triton kernels for GPU (interpret=True runs them on CPU for tests)
host_kernels numpy/numba kernels for cold neurons on the host, callable from jit
"""
from ops.pallas_gpu import (TRITON_CUSTOM_CALL_TARGETS, axpy_down_pallas, sparse_ffn_pallas,
                            sparse_h_pallas, triton_compiler_params)
from ops.reference import (FAMILIES, activation, axpy_down_ref, dense_ffn_ref, dense_h_ref,
                           gather_matvec_ref, random_ffn_weights, rows_dot, sparse_ffn_ref,
                           sparse_h_ref, valid_from_count)
from ops.select import (capacity_bucket, compact_mask, select_active, select_active_union,
                        union_mask)
from ops.xla_sparse import (axpy_down_xla, gather_matvec_xla, gather_rows, sparse_ffn_xla,
                            sparse_h_xla)

try:  # numba is a declared dependency; tolerate its absence so the device paths still import
    from ops.host_kernels import (host_axpy_down, host_ffn_callback, host_gather_matvec,
                                  host_h_ref, host_sparse_ffn, host_sparse_ffn_ref, host_sparse_h)
except ModuleNotFoundError as e:  # pragma: no cover
    if e.name != "numba":
        raise

__all__ = [
    "FAMILIES", "TRITON_CUSTOM_CALL_TARGETS", "activation", "axpy_down_pallas", "axpy_down_ref",
    "axpy_down_xla", "capacity_bucket", "compact_mask", "dense_ffn_ref", "dense_h_ref",
    "gather_matvec_ref", "gather_matvec_xla", "gather_rows", "host_axpy_down",
    "host_ffn_callback", "host_gather_matvec", "host_h_ref", "host_sparse_ffn",
    "host_sparse_ffn_ref", "host_sparse_h", "random_ffn_weights", "rows_dot", "select_active",
    "select_active_union",
    "sparse_ffn_pallas", "sparse_ffn_ref", "sparse_h_pallas", "sparse_h_ref", "sparse_h_xla",
    "sparse_ffn_xla", "triton_compiler_params", "union_mask", "valid_from_count",
]
