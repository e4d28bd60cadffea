"""numba's on-disk kernel cache, kept in step with the modules the kernels inline.

numba keys a cached kernel on its own file's timestamp and its own bytecode only. The parallel loops of
`ops.host_loops` and `ops.host_attention` inline primitives from `ops.host_elements` (and it from
`ops.quant`), so after host_elements.py alone changed (a `git pull`, an edit) they went on loading the
machine code compiled from the old primitives: no error, the old arithmetic. Found when an A/B run of a new
register block measured no difference because the new code never ran. `drop_stale` keeps a digest of the
inlined files beside the cache and deletes the module's cached kernels when it no longer matches.
"""
from __future__ import annotations

import glob
import hashlib
import os
from typing import Sequence

from numba.core import caching


def sources_digest(paths: Sequence[str]) -> str:
    """sha256 over the bytes of `paths` (in the given order), hex."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()


def cache_location(kernel) -> tuple[str, str] | None:
    """(cache directory, module stem of the cache files) numba uses for `kernel` (a dispatcher), or None where
    this numba's internals differ (then nothing is dropped)."""
    try:
        impl = caching.CompileResultCacheImpl(kernel.py_func)
        return impl.locator.get_cache_path(), impl.filename_base.split(".")[0]
    except Exception:  # noqa: BLE001 (internal API: a numba that moved it keeps its own cache behaviour)
        return None


def drop_stale(kernel, inlined_from: Sequence[str]) -> bool:
    """Delete the cached machine code of every kernel in `kernel`'s module when the files in `inlined_from`
    changed since it was written; returns whether anything was dropped. Call at import, before a kernel runs."""
    where = cache_location(kernel)
    if where is None:
        return False
    cache_dir, stem = where
    stamp_path = os.path.join(cache_dir, f"{stem}.inlined.sha256")
    digest = sources_digest(inlined_from)
    try:
        with open(stamp_path) as f:
            if f.read().strip() == digest:
                return False
    except OSError:
        pass
    stale = glob.glob(os.path.join(glob.escape(cache_dir), f"{stem}.*.nbi"))
    stale += glob.glob(os.path.join(glob.escape(cache_dir), f"{stem}.*.nbc"))
    try:
        os.makedirs(cache_dir, exist_ok=True)
        for path in stale:
            try:
                os.remove(path)
            except FileNotFoundError:  # another process dropped it first
                pass
        tmp = f"{stamp_path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(digest + "\n")
        os.replace(tmp, stamp_path)
    except OSError:  # a read-only cache: numba cannot write there either, so it compiles in memory
        return False
    return bool(stale)
