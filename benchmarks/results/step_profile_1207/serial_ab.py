# Bundled bf16 engine: decode ms/step with the host kernels' serial thresholds as now ("cur") and all-serial ("ser"),
# toggled in one process, alternating rounds.
import json, sys, numpy as np
sys.path.insert(0, __import__("os").path.abspath(__file__).rsplit("/benchmarks/", 1)[0])
import ops.host_kernels as hk, ops.host_attention as ha
import powerinfer_jax as pij
CFG = {"cur": (hk.SERIAL_MAX_BYTES, hk.SERIAL_MAX_WORK_BYTES, ha.SERIAL_MAX_BYTES), "ser": (1 << 40, 1 << 40, 1 << 40)}
def setv(v): hk.SERIAL_MAX_BYTES, hk.SERIAL_MAX_WORK_BYTES, ha.SERIAL_MAX_BYTES = CFG[v]
eng = pij.load("models/shakespeare-relu-llama")
ids = eng.encode("ROMEO:\nWhat light through yonder window breaks?")
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 6
for B in [int(b) for b in sys.argv[2:]] or [1, 4, 16]:
    for v in CFG: setv(v); eng.generate_batch([ids] * B, max_new_tokens=8, stop_at_eos=False)
    t = {v: [] for v in CFG}
    for r in range(rounds):
        for v in (list(CFG) if r % 2 == 0 else list(CFG)[::-1]):
            setv(v); s = eng.generate_batch([ids] * B, max_new_tokens=96, stop_at_eos=False)[0].stats
            t[v].append(1e3 * s["decode_s"] / s["decode_steps"])
    ratio = np.array(t["cur"]) / np.array(t["ser"])
    print(B, "rows: cur %.2f ms, all-serial %.2f ms, cur/ser %.2f paired %s" % (np.median(t["cur"]), np.median(t["ser"]),
          np.median(ratio), np.round(ratio, 2).tolist()), flush=True)
