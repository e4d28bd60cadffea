"""The A/B toggle of the scripts here, switched in one process: "old" = the parent commit's host kernels (its
host_elements.py and host_loops.py, saved with `git show 0f5fbf0:ops/host_elements.py > $OLD_KERNELS/old_elements.py`
and host_loops.py with its imports pointed at old_elements, as `old_loops.py`; OLD_KERNELS defaults to /tmp/w/oldk),
"new" = this commit's."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.chdir(REPO)
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks"), os.environ.get("OLD_KERNELS", "/tmp/w/oldk")]
import old_loops  # noqa: E402
import ops.host_kernels as HK  # noqa: E402
import ops.host_loops as HL  # noqa: E402

NAMES = [n for n in dir(HL) if n.startswith("_") and n.endswith(("_kernel", "_kernel_serial"))]
_SETS = {"old": {n: getattr(old_loops, n) for n in NAMES}, "new": {n: getattr(HL, n) for n in NAMES}}


def setv(v: str) -> None:
    """Point the host kernels' entry points (ops.host_kernels) at the "old" or "new" compiled loops."""
    for n, f in _SETS[v].items():
        if hasattr(HK, n):
            setattr(HK, n, f)
