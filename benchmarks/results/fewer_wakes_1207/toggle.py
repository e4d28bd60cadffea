"""The A/B toggle of the scripts here, switched in one process: "old" = the parent commit's attention kernels (its
host_attention.py, saved with `git show 6619e3c:ops/host_attention.py > /tmp/w/host_attention_old.py`, or
$OLD_ATTENTION) and the FFN as gate/up then down (two kernel calls, two thread wakes, inside the one callback; the
dense FFN's second callback of the old path is not restored); "new" = this commit's."""
import importlib.util
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.chdir(REPO)
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]
import ops.host_attention as HA  # noqa: E402
import ops.host_kernels as HK  # noqa: E402

_OLD_PATH = os.environ.get("OLD_ATTENTION", "/tmp/w/host_attention_old.py")
# numba's cache of a module loaded from a file path fails to load in a later process: compile it afresh
shutil.rmtree(os.path.join(os.path.dirname(_OLD_PATH), "__pycache__"), ignore_errors=True)
_spec = importlib.util.spec_from_file_location("attn_old", _OLD_PATH)
OLD = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(OLD)
NEW = dict(att=(HA._decode_attention, HA._decode_attention_serial), ffn=HK._fused_ffn)


def _split_ffn(family, w_gate, w_up, w_down_t, x, idx, count, b_up, out, live, live_first, skip_zero_rows):
    h = HK.host_sparse_h(family, w_gate, w_up, x, idx, count, b_up)
    if live is not None:
        HK._count_live(h, live, live_first)
    return HK.host_axpy_down(w_down_t, idx, count, h, out=out, skip_zero_rows=skip_zero_rows)


def setv(v: str) -> None:
    """Switch the host kernels to the "old" or "new" behaviour."""
    if v == "old":
        (HA._decode_attention, HA._decode_attention_serial), HK._fused_ffn = \
            (OLD._decode_attention, OLD._decode_attention_serial), _split_ffn
    else:
        (HA._decode_attention, HA._decode_attention_serial), HK._fused_ffn = NEW["att"], NEW["ffn"]
