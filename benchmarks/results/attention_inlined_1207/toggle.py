"""The A/B toggle of the scripts here, switched in one process: "old" = the parent commit's attention kernel and
serial limit (its host_attention.py, saved with `git show bf67a96:ops/host_attention.py > /tmp/w/host_attention_old.py`,
or $OLD_ATTENTION), "new" = this commit's."""
import importlib.util
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.chdir(REPO)
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]
import ops.host_attention as HA  # noqa: E402

_OLD_PATH = os.environ.get("OLD_ATTENTION", "/tmp/w/host_attention_old.py")
# numba's cache of a module loaded from a file path fails to load in a later process: compile it afresh
shutil.rmtree(os.path.join(os.path.dirname(_OLD_PATH), "__pycache__"), ignore_errors=True)
_spec = importlib.util.spec_from_file_location("attn_old", _OLD_PATH)
OLD = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(OLD)
_SETS = {"old": (OLD._decode_attention, OLD._decode_attention_serial, OLD.SERIAL_MAX_BYTES),
         "new": (HA._decode_attention, HA._decode_attention_serial, HA.SERIAL_MAX_BYTES)}


def setv(v: str) -> None:
    """Switch the decode attention kernels (and their serial limit) to the "old" or "new" ones."""
    HA._decode_attention, HA._decode_attention_serial, HA.SERIAL_MAX_BYTES = _SETS[v]
