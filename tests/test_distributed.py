"""One model served by two processes through jax.distributed (CPU, gloo collectives, localhost):
each process owns one device's share of the hot rows and its host's share of the cold rows; the
greedy tokens equal a single process's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "models" / "shakespeare-relu-llama-prepared"
BUDGET = "24MiB"
SCRIPT = str(REPO / "tests" / "distributed_check.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _result(out: str) -> dict:
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert lines, out[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_two_processes_give_the_tokens_of_one():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("XLA_FLAGS", None)
    addr = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, SCRIPT, addr, "2", str(i), str(BUNDLE), BUDGET], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), [o[-2000:] for o in outs]
    multi = [_result(o) for o in outs]
    single = _result(subprocess.run([sys.executable, SCRIPT, "-", "0", "0", str(BUNDLE), BUDGET], env=env, cwd=REPO,
                                    capture_output=True, text=True, timeout=600).stdout)
    assert [m["process"] for m in multi] == [0, 1] and all(m["devices"] == 2 and m["processes"] == 2 for m in multi)
    assert multi[0]["tokens"] == multi[1]["tokens"] == single["tokens"]
    assert multi[0]["hot"] == multi[1]["hot"]
    # Each process holds one device's share: half of the hot rows, half of the cold ids.
    for m in multi:
        assert m["local_hot_rows"] == [m["hot"][0] // 2]
        assert m["local_cold_ids"] == [(1536 - m["hot"][0]) // 2]
