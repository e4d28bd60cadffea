"""A process exits cleanly while XLA still holds zero-copy weights (tensor_file's exit handling).

Before the fix, freeing an engine while one of its executions was still running and then exiting
aborted the process ("terminate called without an active exception") in roughly half the runs of
the script below, and about one `bin/generate` exit in twenty."""

import gc
import os
import subprocess
import sys
import weakref

import jax
import numpy as np
import pytest

from powerinfer_jax import tensor_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXIT_WHILE_RUNNING = """
import numpy as np, jax.numpy as jnp
import powerinfer_jax as pij
engine = pij.load(dtype="float32")  # the bundled f32 checkpoint: every weight is a zero-copy array
ids = jnp.asarray(np.ones((1, 8), np.int32))
engine._full(engine.params, ids).block_until_ready()  # compiled, so the next call only runs
pending = engine._full(engine.params, ids)  # still running below: XLA holds the weights
del engine, pending  # the weights' last Python references go while the execution runs
"""


def test_exit_while_an_execution_holds_zero_copy_weights_is_clean():
    for _ in range(3):  # each run aborted with probability about 1/2 before the fix
        out = subprocess.run([sys.executable, "-c", EXIT_WHILE_RUNNING], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "terminate called" not in out.stderr


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: through device_put, not DLPack
def test_zero_copy_tracking_follows_the_array(dtype):
    host = tensor_file.aligned_empty((256,), tensor_file.DTYPES["F32" if dtype == "float32" else "BF16"])
    host[:] = 3.0
    gc.collect()  # earlier tests' arrays left in garbage cycles must not leave the count during this one
    jax.effects_barrier()
    before = len(tensor_file._ZERO_COPY)
    arr = tensor_file.to_jax(host)
    assert arr.unsafe_buffer_pointer() == host.ctypes.data and arr.dtype == host.dtype  # zero-copy: tracked
    assert len(tensor_file._ZERO_COPY) == before + 1
    array_ref = weakref.ref(arr)
    del arr
    gc.collect()
    jax.effects_barrier()
    assert array_ref() is None
    assert len(tensor_file._ZERO_COPY) == before  # the deleter ran: nothing is kept for exit


EXIT_WITH_A_RUNNING_BATCHER = """
import threading
import powerinfer_jax as pij
from powerinfer_jax.batching import ContinuousBatcher, RequestParams
engine = pij.load(max_seq_len=256)
batcher = ContinuousBatcher(engine, max_batch=4).start()
first = threading.Event()
batcher.submit(engine.encode("ROMEO:"), RequestParams(max_tokens=200, stop_at_eos=False), lambda ev: first.set())
assert first.wait(120)
# no batcher.stop(): its thread is mid-generation when the script ends
"""


def test_exit_with_a_running_batcher_is_clean():
    for _ in range(2):  # 7 runs in 8 aborted before batching stopped running batchers at exit
        out = subprocess.run([sys.executable, "-c", EXIT_WITH_A_RUNNING_BATCHER], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
