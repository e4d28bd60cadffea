"""Machinery of the fuzz suite (tests/test_fuzz.py): outcome checks, time limits, disk digests, tallies.

Every case ends in one of: a result, a documented error (a `PowerInferError` with a one-line message;
for a CLI, exit status 2 and one `error:` line), an undocumented failure (any other exception, exit
status 1, or a traceback), or a hang (past its time limit). Only the first two pass. Counts per kind of
input go to TALLY; with POWERINFER_JAX_FUZZ_REPORT=path set they are written there as JSON at the end
of the module, and `python tests/fuzz_support.py path` prints the markdown table of WORKSPACE.md.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import os
import signal
import sys

REPORT_ENV = "POWERINFER_JAX_FUZZ_REPORT"
COLUMNS = ("tried", "documented", "results", "undocumented", "hangs", "files_changed")
TALLY: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


class Hang(BaseException):
    """A case ran past its time limit (a BaseException, so no `except Exception` in the code under test
    can swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises Hang in the main thread after `seconds` (checked between Python bytecodes)."""

    def fire(signum, frame):
        raise Hang(f"ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def digest(*roots: str) -> str:
    """sha256 over every file under `roots` (relative names, sizes and bytes): equal means unchanged."""
    h = hashlib.sha256()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                h.update(os.path.relpath(p, root).encode() + b"\0")
                with open(p, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def one_line(text: str) -> bool:
    return bool(text.strip()) and "\n" not in text.strip()


def api_case(kind: str, fn, limit: float = 60.0):
    """Runs `fn()`; returns ("result", value) or ("error", err) for a documented error, and fails the
    test (recording why) for anything else."""
    from powerinfer_jax.errors import PowerInferError

    t = TALLY[kind]
    t["tried"] += 1
    try:
        with time_limit(limit):
            value = fn()
    except Hang:
        t["hangs"] += 1
        raise AssertionError(f"{kind}: no answer within {limit} s") from None
    except PowerInferError as err:
        if not one_line(str(err)):
            t["undocumented"] += 1
            raise AssertionError(f"{kind}: {type(err).__name__} message is not one line: {str(err)!r}") from err
        t["documented"] += 1
        return "error", err
    except Exception as err:  # noqa: BLE001  (what the suite is here to find)
        t["undocumented"] += 1
        raise AssertionError(f"{kind}: undocumented {type(err).__name__}: {err}") from err
    t["results"] += 1
    return "result", value


def cli_case(kind: str, main, argv: list[str], limit: float = 60.0, expect_error: bool = False) -> tuple[int, str, str]:
    """Runs a bin/ program's main in this process (`cli.invoke`); checks exit status 0, or 2 with exactly
    one `error:` line and no traceback. `expect_error`: the arguments hold a value that must be refused
    (within `limit`: up front, before heavy work)."""
    from powerinfer_jax import cli

    t = TALLY[kind]
    t["tried"] += 1
    out, err = io.StringIO(), io.StringIO()
    try:
        with time_limit(limit), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.invoke(main, argv)
    except Hang:
        t["hangs"] += 1
        raise AssertionError(f"{kind}: no answer within {limit} s: {argv}") from None
    except BaseException as exc:  # noqa: BLE001  (SystemExit or anything escaping the guard)
        t["undocumented"] += 1
        raise AssertionError(f"{kind}: {type(exc).__name__} escaped the CLI guard: {argv}") from exc
    stderr = err.getvalue()
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    ok = ("Traceback" not in stderr and (rc == 0 or (rc == 2 and len(errors) == 1))
          and not (expect_error and rc == 0))
    if not ok:
        t["undocumented"] += 1
        raise AssertionError(f"{kind}: exit {rc} for {argv}; stderr:\n{stderr[-3000:]}")
    t["documented" if rc == 2 else "results"] += 1
    return rc, out.getvalue(), stderr


def files_changed(kind: str, before: str, after: str) -> None:
    """Records and fails on a change on disk."""
    if before != after:
        TALLY[kind]["files_changed"] += 1
        raise AssertionError(f"{kind}: a file on disk changed")


def write_report(path: str) -> None:
    """Adds this run's tallies to the JSON report at `path`."""
    old = {}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    for kind, counts in TALLY.items():
        row = collections.Counter(old.get(kind, {}))
        row.update(counts)
        old[kind] = {c: row.get(c, 0) for c in COLUMNS}
    with open(path, "w") as f:
        json.dump(old, f, indent=2, sort_keys=True)


def markdown(report: dict) -> str:
    """The reliability table: per kind of bad input, cases tried and how each ended."""
    rows = ["| input kind | cases | documented one-line error | correct result | tracebacks / undocumented | "
            "hangs | files changed |", "|---|---|---|---|---|---|---|"]
    total = collections.Counter()
    for kind in sorted(report):
        r = report[kind]
        total.update(r)
        rows.append(f"| {kind} | {r['tried']} | {r['documented']} | {r['results']} | {r['undocumented']} | "
                    f"{r['hangs']} | {r['files_changed']} |")
    rows.append(f"| **all** | **{total['tried']}** | **{total['documented']}** | **{total['results']}** | "
                f"**{total['undocumented']}** | **{total['hangs']}** | **{total['files_changed']}** |")
    return "\n".join(rows)


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        print(markdown(json.load(fh)))
