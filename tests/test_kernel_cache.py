"""numba's on-disk cache follows the modules a kernel inlines (`ops.kernel_cache`)."""
import os
import subprocess
import sys
import textwrap

import pytest

from ops import host_attention, host_elements, host_loops, kernel_cache, quant

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KERNEL = """
from numba import njit
import dep
{guard_import}

@njit(cache=True)
def kernel(x):
    return dep.value(x)

{guard}
print(kernel(1.0))
"""


def _write_dep(path, value):
    with open(path / "dep.py", "w") as f:
        f.write(f"from numba import njit\n\n\n@njit(inline='always')\ndef value(x):\n    return x * {value}\n")


def _run(path, module):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(path), REPO]))
    out = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=path, env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("guarded", [False, True])
def test_a_changed_inlined_module_recompiles_only_with_the_guard(tmp_path, guarded):
    """A cached kernel that inlines a function of another module: after that module changes, numba alone
    still runs the old machine code (what the guard exists for); with `drop_stale` the new code runs."""
    guard = "from ops.kernel_cache import drop_stale" if guarded else ""
    call = "drop_stale(kernel, [dep.__file__])" if guarded else ""
    (tmp_path / "kern.py").write_text(textwrap.dedent(KERNEL.format(guard_import=guard, guard=call)))
    _write_dep(tmp_path, 2)
    assert _run(tmp_path, "kern") == 2.0
    assert any(name.endswith(".nbi") for name in os.listdir(tmp_path / "__pycache__"))  # it was cached
    _write_dep(tmp_path, 3)
    assert _run(tmp_path, "kern") == (3.0 if guarded else 2.0)
    assert _run(tmp_path, "kern") == (3.0 if guarded else 2.0)  # and the recompiled code is cached again


def test_the_host_kernels_are_guarded():
    """host_loops and host_attention wrote the digest of what they inline beside their cache, matching the
    current sources."""
    for module, kernel in ((host_loops, host_loops._down_kernel), (host_attention, host_attention._decode_attention)):
        cache_dir, stem = kernel_cache.cache_location(kernel)
        assert stem == module.__name__.split(".")[-1]
        with open(os.path.join(cache_dir, f"{stem}.inlined.sha256")) as f:
            digest = f.read().strip()
        assert digest == kernel_cache.sources_digest([host_elements.__file__, quant.__file__])
