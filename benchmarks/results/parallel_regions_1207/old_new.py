"""The A/B toggle of the scripts here: the parent commit's down kernel (its host_loops.py, saved with
`git show 074071f:ops/host_loops.py > /tmp/w/host_loops_old.py`; delete /tmp/w/__pycache__ before a run), the
bytes-only serial rule and always-parallel attention ("old"), or this commit's ("new"), switched in one process."""
import importlib.util
import os
import sys

os.chdir("/work/main")
sys.path[:0] = ["/work/main", "/work/main/benchmarks"]
import ops.host_attention as HA  # noqa: E402
import ops.host_kernels as H  # noqa: E402

_spec = importlib.util.spec_from_file_location("ops.host_loops_old", "/tmp/w/host_loops_old.py")
OLD = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(OLD)
NEW = dict(down=H._down_kernel, work=H.SERIAL_MAX_WORK_BYTES, att=HA.SERIAL_MAX_BYTES)


def setv(v: str) -> None:
    """Switch the host kernels to the "old" or "new" behaviour."""
    if v == "old":
        H._down_kernel, H.SERIAL_MAX_WORK_BYTES, HA.SERIAL_MAX_BYTES = OLD._down_kernel, 1 << 60, 0
    else:
        H._down_kernel, H.SERIAL_MAX_WORK_BYTES, HA.SERIAL_MAX_BYTES = NEW["down"], NEW["work"], NEW["att"]
