"""Continuous batching: requests join and leave a running batch at decode-step boundaries.

One background thread runs the decode loop. The KV cache has `max_batch` rows; the sequences being
decoded occupy rows 0..n-1 (a finished one's row stays free for the next request; the last rows move
into free rows only when the rows in use fit a smaller batch size), and a step computes only the first
`b` rows, b the smallest of a few static sizes (1, 4, 16, ...) >= n, so finished sequences stop costing
compute and no request compiles anything new. Each row has its own position, sampling settings and
random stream (a per-request key folded with its step), so a sequence's tokens do not depend on which
others share the batch. While sequences are running, each decode step carries a packed chunk of
`mixed_chunk` prompt tokens: the next pieces of up to `stage_rows` waiting prompts, oldest first, each
piece written straight into the free batch row its prompt will decode in (one program over
`model.forward_groups`, which reads every weight once for the batch and the chunk, and writes both into
the one cache); a completed prompt joins with nothing copied. So every step carries about the same
number of prompt tokens whatever the prompts' lengths, which keeps the inter-token times even. With
nothing running, a prompt goes in chunks of `prefill_chunk` tokens on its own, into a one-row staging
cache, whose row is then copied into the batch. Text is detokenized incrementally
(`tokenizer.IncrementalDecoder`).

This is the engine's one decode loop: `ContinuousBatcher.start()` runs it on a thread for the server,
and `Engine.generate`/`generate_batch` run the same steps in the caller's thread (`generate_rows`),
admitting every prompt before the first decode step (nobody else is waiting). The jitted programs
(`loop_programs`) and their compiled executables belong to the engine (`loop_programs.programs(engine)`),
so every loop over one engine shares them.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import functools
import itertools
import logging
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from powerinfer_jax import checks, memory
from powerinfer_jax.engine import FFN_COUNTERS, Engine, _nonfinite_error, bucket, decode_span, decode_spans
from powerinfer_jax.errors import ArgumentError, NonFiniteError
from powerinfer_jax.loop_programs import fast_call, programs, row_index, row_settings
from powerinfer_jax.model import KVCache, init_cache
from powerinfer_jax.sampling import SamplingParams, row_mode
from powerinfer_jax.tokenizer import IncrementalDecoder

log = logging.getLogger(__name__)
BATCH_SIZES = (1, 4, 16, 64)  # the static batch sizes a step runs at (capped at max_batch)
# Prompt tokens a decode step carries for the waiting requests (ContinuousBatcher.mixed_chunk). Bundled model,
# bf16, 16 running rows: a step alone 6.5-7.1 ms, carrying 16 prompt tokens 9.5 ms, 32 tokens 11.8 ms, where
# separately a 16-token chunk took 5.6 ms and a 32-token one 7.2 ms, +0.5 ms to insert its row. Served at 16
# clients (BENCHMARKS.md, "Prompt chunks inside decode steps"): 16 cut the inter-token p99 most (20.6 -> 12.7
# ms) but a 25-token prompt then needs two steps to join, and the batch ran emptier (hybrid throughput 639 ->
# 542 tok/s); 32 gave the throughput (dense bf16 1126 -> 1321 tok/s, hybrid 660) with a p99 of 16.9 ms.
MIXED_CHUNK = 32
# Prompts prefilled at once, each into its batch row (ContinuousBatcher.stage_rows): with 4, 16 clients with
# 7-token prompts got 1.30x the throughput of one prompt a chunk (four join in one step); 25-token prompts, which
# fill a 32-token chunk alone, the same (BENCHMARKS.md, "Several prompts in one carried chunk").
STAGE_ROWS = 4
_RUNNING: weakref.WeakSet = weakref.WeakSet()  # started batchers, stopped at exit (see _stop_at_exit)


@dataclasses.dataclass(frozen=True)
class RequestParams:
    """One request's generation settings."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_at_eos: bool = True


@dataclasses.dataclass
class Event:
    """What a request's `on_event` receives: a token, the end ("done"), or an error (no "done" follows)."""

    kind: str  # "token" | "done" | "error"
    token_id: int = -1
    text: str = ""  # token: its new text piece; done: the whole completion text
    finish_reason: str | None = None  # done: "stop" (EOS), "length" (max_tokens or context full), "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    token_ids: list[int] = dataclasses.field(default_factory=list)  # done: every generated token (EOS excluded)
    held_back: bool = False  # token: its text waits for the rest of a UTF-8 character ("" now, sent with a later token)


def seed_key(seed: int) -> np.ndarray:
    """`jax.random.PRNGKey(seed)`'s key data (uint32 [2]), made in numpy for the default threefry PRNG: jax's call
    costs ~0.2 ms, on the submitting thread, holding the GIL the decode loop needs. Other PRNGs go through jax."""
    s = int(seed)
    if jax.config.jax_default_prng_impl != "threefry2x32" or not -2**63 <= s < 2**64:
        return np.asarray(jax.random.key_data(jax.random.PRNGKey(seed)), np.uint32)
    hi = (s >> 32) & 0xFFFFFFFF if jax.config.jax_enable_x64 else 0  # without x64 jax keeps the low 32 bits
    return np.array([hi, s & 0xFFFFFFFF], np.uint32)


class Request:
    """A submitted request; `cancel()` ends it at the next step boundary."""

    def __init__(self, rid: int, prompt_ids: list[int], params: RequestParams, on_event: Callable[[Event], None],
                 detokenize: bool = True):
        self.id, self.prompt_ids, self.params, self.on_event = rid, prompt_ids, params, on_event
        self.detokenize = detokenize  # whether token events carry their text (IncrementalDecoder)
        self.cancelled = False
        self.key = seed_key(params.seed)
        self.generated: list[int] = []
        self.prefilled = 0  # prompt tokens already in the cache
        self.stage_row = 0  # prefilled alone: its row of the staging cache; packed: its slot among stage_rows
        self.cache_row = -1  # packed: the batch row its prompt is prefilled into (and it decodes in)
        self.decoder: IncrementalDecoder | None = None

    def cancel(self) -> None:
        """Asks the batcher to drop this request (thread-safe); a "cancelled" done event follows."""
        self.cancelled = True



class ContinuousBatcher:
    """Serves many generation requests with one decode loop over a shared, continuously refilled batch."""

    def __init__(self, engine: Engine, max_batch: int = 16, prefill_chunk: int = 128,
                 sizes: Sequence[int] = BATCH_SIZES, mixed_chunk: int | None = MIXED_CHUNK,
                 stage_rows: int = STAGE_ROWS):
        self.engine = engine
        self.max_batch = checks.integer("max_batch", max_batch, lo=1)
        self.prefill_chunk = checks.integer("prefill_chunk", prefill_chunk, lo=1)
        # While sequences are running, a new prompt advances `mixed_chunk` tokens inside each decode step
        # (one program: the projections read each weight once for both); None: separate chunk programs.
        # Over a mesh the staging cache's sharding differs from the batch's: separate programs there.
        self.mixed_chunk = None if mixed_chunk is None else min(checks.integer("mixed_chunk", mixed_chunk, lo=1),
                                                                engine.max_seq_len)
        # Waiting prompts prefilled at once, each straight into the batch row it will decode in (a packed
        # chunk holds pieces of each; nothing is copied when it joins).
        self.stage_rows = min(checks.integer("stage_rows", stage_rows, lo=1), max_batch)
        self.sizes = sorted({min(checks.integer("batch size", s, lo=1), max_batch) for s in sizes} | {max_batch})
        # generate_rows: every waiting prompt is prefilled before the next decode step (no one else is waiting),
        # and a callback's exception propagates to the caller instead of being logged
        self._admit_all = False
        self._eos = set(engine._eos_ids())
        self._waiting: collections.deque[Request] = collections.deque()
        # Row i of the batch cache decodes self._rows[i]; None: a free row (never the last entry). A retired row
        # stays free for the next request instead of the last row moving into it (`_compact`).
        self._rows: list[Request | None] = []
        self._staging: Request | None = None  # the request being prefilled on its own (_prefill_one_chunk)
        self._packed: list[Request] = []  # requests prefilled in packed chunks inside decode steps (_decode_step)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._ids = itertools.count()
        self._counters = collections.Counter()
        self._times = collections.Counter()  # seconds: prefill_s, decode_s (compiles excluded), compile_s
        self._programs = programs(engine)
        self._executables = self._programs.executables
        if not self._programs.rows_ahead:
            self.mixed_chunk = None
        if jax.default_backend() == "cpu":  # the cache is host memory: refuse one that cannot fit, with the numbers
            # (a cache that does not fit gets the process killed, or evicts the mapped weights to disk)
            memory.check_host_kv_cache(engine.cfg, max_batch, engine.max_seq_len, engine.kv_dtype, staging_rows=1,
                                       model_arrays=jax.tree.leaves(engine.params))
        self._cache = init_cache(engine.cfg, max_batch, engine.max_seq_len, engine.kv_dtype)
        # Staging caches by (rows, slots) (see _stage_key), kept and reused.
        self._stage_caches: dict[tuple[int, int], KVCache] = {}
        self._row_settings: tuple = ((), None)  # (the rows' request ids and step size, their sampling arrays)

    # ---- public API ----------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: RequestParams,
               on_event: Callable[[Event], None]) -> Request:
        """Queues a request (checked here: bad input raises ArgumentError); events arrive from the batcher thread."""
        ids = checks.token_ids("prompt", prompt_ids, self.engine.cfg.vocab_size)
        if not ids:
            raise ArgumentError("the prompt is empty")
        checks.integer("max_tokens", params.max_tokens, lo=1)
        checks.integer("seed", params.seed, lo=-(2**63), hi=2**63 - 1)
        SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
        if len(ids) + params.max_tokens > self.engine.max_seq_len:
            raise ArgumentError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                                f"of {self.engine.max_seq_len} tokens")
        if not callable(on_event):
            raise ArgumentError("on_event must be callable")
        req = Request(next(self._ids), ids, params, on_event)
        with self._wake:
            if self._thread is None or self._stop:
                raise ArgumentError("the batcher is not running: start() it before submitting")
            self._waiting.append(req)
            self._wake.notify()
        return req

    def generate(self, prompt_ids: Sequence[int], params: RequestParams, timeout: float | None = None) -> Event:
        """Submits one request and waits for its "done" event (raises RuntimeError on an "error" one)."""
        done = threading.Event()
        result: list[Event] = []

        def on_event(ev: Event) -> None:
            if ev.kind in ("done", "error"):
                result.append(ev)
                done.set()

        self.submit(prompt_ids, params, on_event)
        if not done.wait(timeout):
            raise TimeoutError(f"no result within {timeout} s")
        if result[0].kind == "error":
            raise RuntimeError(result[0].error)
        return result[0]

    def warmup(self, modes: Sequence[str] = ("greedy",)) -> float:
        """Compiles, in parallel threads, every batch size's decode step and every prompt-chunk width for
        the shortest attention span (what short requests use), so the first requests compile nothing;
        longer spans compile when a sequence first reaches them. Returns the seconds it took."""
        t0 = time.perf_counter()
        span = decode_span(1, self.engine.max_seq_len)
        widths = sorted({self._chunk_width(n) for n in range(1, self.prefill_chunk + 1)})
        jobs = []
        for mode in modes:
            jobs += [self._step_job(size, span, mode) for size in self.sizes]
            jobs += [self._chunk_job(w, self._stage_key(1), span, mode) for w in widths]
            if self._packing:
                jobs += [self._mixed_job(size, span, mode) for size in self.sizes]
        spans = decode_spans(1, self.engine.max_seq_len, self.engine.max_seq_len)
        jobs += self._row_jobs([(self._stage_key(1), s) for s in spans], spans)
        self._compile(jobs)
        if not self._rows and self._staging is None and not self._packed:
            # Run each decode size, the narrowest chunk and the row programs once (they touch only free rows
            # now): every executable's first run (buffers, thread pools) happens here, not in a request.
            for name, _, args, static in jobs:
                if name == "step":
                    self._cache = self._executable("step", args, static)(*args[:3], self._cache, *args[4:])[1]
                elif name == "chunk" and args[1].shape[1] == widths[0]:
                    key = args[3].k[0].shape[0], args[3].k[0].shape[2]
                    stage = self._stage_caches.pop(key, None)
                    stage = args[3] if stage is None else stage
                    self._stage_caches[key] = self._executable("chunk", args, static)(*args[:3], stage, *args[4:])[1]
            self._cache = self._call("insert", self._cache, self._stage_cache(self._stage_key(1)), row_index(0),
                                     row_index(0), span=spans[0])
            self._cache = self._call("move", self._cache, row_index(0), row_index(0), span=spans[0])
            jax.block_until_ready(self._cache)
        return time.perf_counter() - t0

    def _step_job(self, size: int, span: int, mode: str) -> tuple:
        """(name, program, example arguments, static values) of a decode step of `size` rows over `span` slots."""
        _, *rest = row_settings([], size)
        args = (self.engine.params, jnp.zeros(size, jnp.int32), jnp.zeros(size, jnp.int32), self._cache, *rest)
        return "step", self._programs.step, args, {"attend_len": span, "mode": mode}

    def _mixed_job(self, size: int, span: int, mode: str) -> tuple:
        """The same for a decode step of `size` rows carrying a packed `mixed_chunk`-token prompt chunk."""
        _, *rest = row_settings([], size + self.stage_rows)
        chunk, slots = jnp.zeros((1, self.mixed_chunk), jnp.int32), jnp.zeros(self.stage_rows, jnp.int32)
        args = (self.engine.params, jnp.zeros(size, jnp.int32), jnp.zeros(size, jnp.int32), self._cache,
                chunk, chunk, chunk, slots, slots, *rest)
        return "mixed", self._programs.mixed, args, {"attend_len": span, "mode": mode}

    @property
    def _packing(self) -> bool:
        """Whether prompts are prefilled in packed chunks inside the decode steps while sequences run (the
        server; generate_rows admits every prompt before the first step, and over a mesh it is off)."""
        return self.mixed_chunk is not None and not self._admit_all

    def _stage_key(self, prompt_len: int) -> tuple[int, int]:
        """(rows, slots) of the staging cache a prompt of `prompt_len` tokens is prefilled into on its own (no
        sequence running): one row (packed prompts go straight into their batch rows)."""
        return 1, self._stage_len(prompt_len)

    def _stage_len(self, prompt_len: int) -> int:
        """Slots of the staging cache a prompt of `prompt_len` tokens is prefilled into. generate_rows: the span
        of its length, so a 1-row generate holds no second max_seq_len row (GBs of KV cache at 7B size). The
        server: max_seq_len, so the chunk programs `warmup` compiled serve every prompt length (a length
        bucket in their shapes would compile while every running sequence waits)."""
        return decode_span(prompt_len, self.engine.max_seq_len) if self._admit_all else self.engine.max_seq_len

    def _chunk_job(self, width: int, stage_key: tuple[int, int], span: int, mode: str) -> tuple:
        """The same for a prompt chunk of `width` tokens into row 0 of the staging cache `stage_key`."""
        _, *rest = row_settings([], 1)
        args = (self.engine.params, jnp.zeros((1, width), jnp.int32), jnp.zeros((1, width), jnp.int32),
                self._stage_cache(stage_key), jnp.zeros(1, jnp.int32), *rest)
        return "chunk", self._programs.chunk, args, {"attend_len": span, "mode": mode}

    def _stage_cache(self, key: tuple[int, int]):
        """The staging cache of `key` = (rows, slots), made once (the prompt that needs it prefills into it)."""
        if key not in self._stage_caches:
            self._stage_caches[key] = init_cache(self.engine.cfg, key[0], key[1], self.engine.kv_dtype)
        return self._stage_caches[key]

    def _compile(self, jobs: list[tuple]) -> float:
        """Compiles the jobs not compiled yet in parallel threads (XLA compiles without the GIL); returns
        the seconds it took (also added to the loop's compile_s)."""
        todo = {}
        for name, program, args, static in jobs:
            sig = self._signature(name, args, static)
            if sig not in self._executables:
                todo.setdefault(sig, (program, args, static))
        if not todo:
            return 0.0
        t0 = time.perf_counter()
        compile_one = lambda job: job[0].lower(*job[1], **job[2]).compile()  # noqa: E731
        if len(todo) == 1:
            exes = [compile_one(next(iter(todo.values())))]
        else:
            pool = ThreadPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1))
            try:
                exes = list(pool.map(compile_one, todo.values()))
            finally:  # interrupted (Ctrl-C while a 7B model compiles): the queued compiles never start
                pool.shutdown(wait=False, cancel_futures=True)
        self._executables.update(zip(todo, map(fast_call, exes)))
        seconds = time.perf_counter() - t0
        self._times["compile_s"] += seconds
        return seconds

    def _chunk_width(self, n: int) -> int:
        """The padded width of a prompt chunk of n tokens (a few static widths: one program each)."""
        return min(bucket(n, self.prefill_chunk), self.engine.max_seq_len)

    @staticmethod
    def _signature(name: str, args: tuple, static: dict) -> tuple:
        shaped = args[1:] if name in ("step", "chunk", "mixed") else args  # the params (their first argument) never change
        return name, tuple((a.shape, a.dtype) for a in jax.tree.leaves(shaped)), tuple(sorted(static.items()))

    def _executable(self, name: str, args: tuple, static: dict):
        """Program `name` ("step", "chunk", "mixed", "insert" or "move") compiled for these argument shapes and static values, once per
        engine (jit's own cache is not filled by ahead-of-time compiles, so warmup and the loop share this)."""
        sig = self._signature(name, args, static)
        if sig not in self._executables:
            self._compile([(name, getattr(self._programs, name), args, static)])
        return self._executables[sig]

    def _call(self, name: str, *args, span: int):
        """Runs a row program ("insert", "move") over a row's first `span` cache slots through its executable
        (through jit over a mesh)."""
        if not self._programs.rows_ahead:
            return getattr(self._programs, name)(*args, span=span)
        return self._executable(name, args, {"span": span})(*args)

    def _row_jobs(self, inserts: Sequence[tuple[int, int]], move_spans: Sequence[int] = ()) -> list[tuple]:
        """Jobs of the row programs, where they are compiled ahead of time: writing the first `span` slots of a
        row of the staging cache `key` into a batch row, per (key, span) in `inserts`, and copying the first
        `span` slots of one batch row into another (a retired row refilled) per span."""
        if not self._programs.rows_ahead:
            return []
        jobs = [("insert", self._programs.insert, (self._cache, self._stage_cache(key), row_index(0), row_index(0)),
                 {"span": span}) for key, span in inserts]
        return jobs + [("move", self._programs.move, (self._cache, row_index(0), row_index(0)), {"span": span})
                       for span in move_spans]

    def start(self) -> "ContinuousBatcher":
        """Starts the decode-loop thread."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="powerinfer-batcher", daemon=True)
            self._thread.start()
            _RUNNING.add(self)
        return self

    def stop(self) -> None:
        """Ends the loop; requests still queued or running get a "cancelled" done event."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "ContinuousBatcher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self) -> dict:
        """Running counts: active/waiting requests, steps, generated tokens, rows computed."""
        with self._wake:
            waiting = len(self._waiting) + len(self._prefilling())
        return {"active": len(self._running()), "waiting": waiting, **self._counters}

    # ---- the loop ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._waiting and not self._rows and not self._prefilling():
                    self._wake.wait()
                if self._stop:
                    break
            try:
                self._step_once()
            except Exception as err:  # noqa: BLE001  (a bug or a broken model: fail the requests, keep serving)
                log.exception("batcher step failed")
                self._fail_all(f"{type(err).__name__}: {err}")
        for req in self._running() + self._prefilling() + list(self._waiting):
            self._finish(req, "cancelled")
        self._rows, self._staging, self._packed = [], None, []
        self._waiting.clear()

    def _running(self) -> list[Request]:
        """The requests decoding in the batch (its rows that are not free)."""
        return [r for r in self._rows if r is not None]

    def _size(self, rows: int) -> int:
        """The static batch size a step over `rows` rows runs at."""
        return next(s for s in self.sizes if s >= rows)

    def _prefilling(self) -> list[Request]:
        """The requests whose prompts are being prefilled (staged on their own or packed)."""
        return ([self._staging] if self._staging is not None else []) + list(self._packed)

    def _step_once(self) -> None:
        """One turn of the loop: drop cancelled requests, then either one decode step carrying the next
        pieces of the waiting prompts (`_packing`, while sequences run or prompts are packed), or one prompt
        chunk on its own (with `_admit_all`, every waiting prompt whole) and a decode step over the rows."""
        self._drop_cancelled()
        if self._packing and self._staging is None and (self._rows or self._packed):
            self._fill_packed()
            self._decode_step(carry=bool(self._packed))
            return
        while self._prefill_one_chunk() and self._admit_all:
            pass
        if self._rows:
            self._decode_step()

    def _run_inline(self) -> None:
        """Runs the loop in this thread until every queued request is done (`generate_rows`)."""
        while self._rows or self._prefilling() or self._waiting:
            self._step_once()

    def _drop_cancelled(self) -> None:
        for i, req in reversed(list(enumerate(self._rows))):  # a snapshot: retiring a row trims free rows
            if req is not None and req.cancelled:
                self._retire(i, "cancelled")
        self._compact()
        if self._staging is not None and self._staging.cancelled:
            self._finish(self._staging, "cancelled")
            self._staging = None
        for req in [r for r in self._packed if r.cancelled]:  # its staging row is free for the next prompt
            self._packed.remove(req)
            self._finish(req, "cancelled")
        with self._wake:
            for req in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(req)
                self._finish(req, "cancelled")

    def _fill_packed(self) -> None:
        """Moves waiting requests into free packing slots, each with a free batch row, while the batch has room."""
        while len(self._packed) < self.stage_rows and len(self._running()) + len(self._packed) < self.max_batch:
            with self._wake:
                if not self._waiting:
                    return
                req = self._waiting.popleft()
            req.stage_row = min(set(range(self.stage_rows)) - {r.stage_row for r in self._packed})
            req.cache_row = self._free_row()
            self._packed.append(req)

    def _free_row(self) -> int:
        """The lowest batch row neither decoding nor taken by a packed prompt."""
        taken = {r.cache_row for r in self._packed}
        return next(i for i in range(self.max_batch)
                    if (i >= len(self._rows) or self._rows[i] is None) and i not in taken)

    def _packed_chunk(self):
        """The next packed chunk: the oldest prompts' next pieces filling `mixed_chunk` tokens. Returns
        (pieces [(request, tokens)], tokens, positions, batch rows [1, W], row_set [stage_rows]: each slot's
        batch row, logits_at [stage_rows]: where each completed prompt's last token sits; padding positions
        write nothing)."""
        width, limit = self.mixed_chunk, self.engine.max_seq_len
        tokens, positions = np.zeros((1, width), np.int32), np.full((1, width), limit, np.int32)
        rows, last = np.zeros((1, width), np.int32), np.zeros(self.stage_rows, np.int32)
        row_set = np.zeros(self.stage_rows, np.int32)
        pieces, used = [], 0
        for req in self._packed:
            if used == width:
                break
            start = req.prefilled
            n = min(width - used, len(req.prompt_ids) - start)
            tokens[0, used:used + n] = req.prompt_ids[start:start + n]
            positions[0, used:used + n] = np.arange(start, start + n)
            rows[0, used:used + n] = req.cache_row
            row_set[req.stage_row] = req.cache_row
            if start + n == len(req.prompt_ids):
                last[req.stage_row] = used + n - 1
            pieces.append((req, n))
            used += n
        return pieces, tokens, positions, rows, row_set, last

    def _stage_next(self) -> bool:
        """Makes the next waiting request the staged one when none is and the batch has room; returns
        whether a request is staged."""
        if self._staging is None:
            if len(self._running()) >= self.max_batch:
                return False
            with self._wake:
                if not self._waiting:
                    return False
                self._staging = self._waiting.popleft()
        return True

    def _chunk_arrays(self, req: Request, limit: int):
        """(start, n, tokens [1, width], positions [1, width]) of the staged request's next chunk of at most
        `limit` tokens (width: the chunk's padded width; padding positions write nothing)."""
        start, n = req.prefilled, min(limit, len(req.prompt_ids) - req.prefilled)
        width = self._chunk_width(n)
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :n] = req.prompt_ids[start:start + n]
        positions = np.full((1, width), self.engine.max_seq_len, np.int32)
        positions[0, :n] = np.arange(start, start + n)
        return start, n, tokens, positions

    def _take_stage(self, prompt_len: int) -> tuple[tuple[int, int], KVCache]:
        """The staging cache a prompt of `prompt_len` tokens prefills into (made on first use) and its key, taken
        out (its buffers are donated to the program) until the caller puts the program's result back."""
        key = self._stage_key(prompt_len)
        self._stage_cache(key)
        return key, self._stage_caches.pop(key)

    def _prefill_one_chunk(self) -> bool:
        """Advances the staged request by one prompt chunk; a finished prefill joins the batch. Returns
        whether there was a chunk to run."""
        if not self._stage_next():
            return False
        t0, compiled = time.perf_counter(), self._times["compile_s"]
        req = self._staging
        start, n, tokens, positions = self._chunk_arrays(req, self.prefill_chunk)
        settings = row_settings([req])
        key, stage = self._take_stage(len(req.prompt_ids))
        args = (self.engine.params, tokens, positions, stage, np.asarray([n - 1], np.int32), *settings[1:])
        static = {"attend_len": decode_span(start + n, self.engine.max_seq_len), "mode": settings[0]}
        tok, stage = self._executable("chunk", args, static)(*args)
        self._stage_caches[key] = stage
        if self._prefilled(req, n):
            self._staging = None
            self._join(req, int(np.asarray(tok)[0]), stage)
        self._times["prefill_s"] += time.perf_counter() - t0 - (self._times["compile_s"] - compiled)
        return True

    def _prefilled(self, req: Request, n: int) -> bool:
        """Books n more of req's prompt tokens as prefilled; returns whether its prompt is complete."""
        req.prefilled += n
        self._counters["prefill_tokens"] += n
        return req.prefilled == len(req.prompt_ids)

    def _join(self, req: Request, first: int, stage: KVCache | None = None) -> None:
        """A prefilled prompt joins the batch with its first token (sampled after the prompt's last token;
        negative: the logits were not finite): a packed one in its batch row (req.cache_row), one prefilled
        on its own copied there from its staging row (req.stage_row of `stage`)."""
        if first < 0:
            self._emit(req, Event("error", error=nonfinite_message("on the prompt")))
            return
        if stage is None:
            row = req.cache_row
        else:
            row = self._free_row()
            # Only the prompt's span of slots: the row's later slots (a previous sequence's) are masked until
            # overwritten, and a whole server-length row is ~1 GB of KV cache on a 7B model.
            span = decode_span(len(req.prompt_ids), stage.max_len)
            self._cache = self._call("insert", self._cache, stage, row_index(row), row_index(req.stage_row), span=span)
        self._rows += [None] * (row + 1 - len(self._rows))
        self._rows[row] = req
        if self.engine.tokenizer is not None and req.detokenize:
            req.decoder = IncrementalDecoder(self.engine.tokenizer, self.engine._eos_ids())
        self._accept(row, first)

    def _decode_step(self, carry: bool = False) -> None:
        """One decode step over the running rows (none: a padding row). With `carry` the same program also
        runs a packed chunk of the prefilling prompts' next pieces (`_packed_chunk`), each into its batch row
        (each weight read once for the rows and the chunk); a prompt the chunk completes joins the batch."""
        t0, compiled = time.perf_counter(), self._times["compile_s"]
        n = len(self._rows)
        size = self._size(n)
        tokens = np.zeros(size, np.int32)
        positions = np.full(size, self.engine.max_seq_len, np.int32)  # idle (free, padding) rows write nothing
        # each row's token index: its random stream's position (a staged prompt's first token: 0)
        steps = np.zeros(size + (self.stage_rows if carry else 0), np.int32)
        for i, req in enumerate(self._rows):
            if req is not None:
                tokens[i] = req.generated[-1]
                positions[i] = len(req.prompt_ids) + len(req.generated) - 1
                steps[i] = len(req.generated)
        staged: list[Request | None] = [None] * (self.stage_rows if carry else 0)  # by staging row
        for req in self._packed if carry else ():
            staged[req.stage_row] = req
        members = (tuple(r and r.id for r in self._rows), size, tuple(r and r.id for r in staged))
        if self._row_settings[0] != members:  # rows' settings change only when a row joins or leaves
            padded = list(self._rows) + [None] * (size - n) + staged
            self._row_settings = (members, row_settings(padded)[:5])
        mode, keys, temps, top_ks, top_ps = self._row_settings[1]
        running = positions[:n][positions[:n] < self.engine.max_seq_len]
        span = int(running.max()) + 1 if running.size else 1
        # The small per-step arrays go to the executable as numpy: its C++ call transfers them (a few us), where
        # jnp.asarray first made each one a device array through Python dispatch (~38 us each).
        if not carry:
            args = (self.engine.params, tokens, positions, self._cache, keys, temps, top_ks, top_ps, steps)
            static = {"attend_len": decode_span(span, self.engine.max_seq_len), "mode": mode}
            nxt, self._cache, totals = self._executable("step", args, static)(*args)
        else:
            pieces, chunk_tokens, chunk_positions, chunk_rows, row_set, last = self._packed_chunk()
            args = (self.engine.params, tokens, positions, self._cache, chunk_tokens, chunk_positions, chunk_rows,
                    row_set, last, keys, temps, top_ks, top_ps, steps)
            reach = max(r.prefilled + c for r, c in pieces)
            static = {"attend_len": decode_span(max(span, reach), self.engine.max_seq_len), "mode": mode}
            nxt, self._cache, totals = self._executable("mixed", args, static)(*args)
            self._counters["mixed_steps"] += 1
            self._counters["packed_pieces"] += len(pieces)
        nxt = np.asarray(nxt)
        self._counters["steps"] += 1
        self._counters["rows_computed"] += size
        self._counters["rows_decoded"] += running.size
        Engine._accumulate_ffn_stats(totals, self._counters)
        for i, req in reversed(list(enumerate(self._rows))):  # a snapshot: retiring a row trims free rows
            if req is None:
                continue
            if nxt[i] < 0:
                where = f"at generated token {len(req.generated) + 1}"
                self._emit(self._remove_row(i), Event("error", error=nonfinite_message(where)))
            else:
                self._accept(i, int(nxt[i]))
        for req, c in pieces if carry else ():
            if self._prefilled(req, c):
                self._packed.remove(req)
                self._join(req, int(nxt[size + req.stage_row]))
        self._compact()
        self._times["decode_s"] += time.perf_counter() - t0 - (self._times["compile_s"] - compiled)

    def _accept(self, row: int, token: int) -> None:
        """Records row's new token, streams it, and retires the row when it is finished."""
        req = self._rows[row]
        eos = req.params.stop_at_eos and token in self._eos
        if not eos:
            req.generated.append(token)
            self._counters["tokens_generated"] += 1
            piece = req.decoder.push(token) if req.decoder is not None else ""
            self._emit(req, Event("token", token_id=token, text=piece or "", held_back=piece is None))
        context_full = len(req.prompt_ids) + len(req.generated) >= self.engine.max_seq_len
        if eos:
            self._retire(row, "stop")
        elif len(req.generated) >= req.params.max_tokens or context_full:
            self._retire(row, "length")

    def _retire(self, row: int, reason: str) -> None:
        """Removes row from the batch and sends the request's done event."""
        self._finish(self._remove_row(row), reason)

    def _remove_row(self, row: int) -> Request:
        """Takes row's request out of the batch; its row is free for the next request to join."""
        req, self._rows[row] = self._rows[row], None
        while self._rows and self._rows[-1] is None:
            self._rows.pop()
        return req

    def _compact(self) -> None:
        """Moves the last rows into free rows while the rows in use would fit a smaller batch size. A step runs
        every row up to the last one in use, so free rows between cost compute but no copies: with a steady
        stream of requests they are refilled at once, and a move (~0.8 ms on the bundled model) is saved."""
        taken = {r.cache_row for r in self._packed}  # rows packed prompts are being prefilled into
        while self._size(len(self._rows)) > self._size(len(self._running())):
            free = next((i for i, r in enumerate(self._rows) if r is None and i not in taken), None)
            if free is None:  # every free row below the last one is a packed prompt's
                break
            last = len(self._rows) - 1
            moved = self._rows[last]  # its slots written so far: the prompt and every generated token but the last
            span = decode_span(len(moved.prompt_ids) + len(moved.generated), self.engine.max_seq_len)
            self._cache = self._call("move", self._cache, row_index(last), row_index(free), span=span)
            self._rows[free] = moved
            self._remove_row(last)

    def _finish(self, req: Request, reason: str) -> None:
        text = self.engine.tokenizer.decode(req.generated) if self.engine.tokenizer is not None and req.generated \
            else ""
        self._counters["requests_done"] += 1
        self._emit(req, Event("done", text=text, finish_reason=reason, prompt_tokens=len(req.prompt_ids),
                              completion_tokens=len(req.generated), token_ids=list(req.generated)))

    def _fail_all(self, message: str) -> None:
        for req in self._running() + self._prefilling():
            self._emit(req, Event("error", error=message))
        self._rows, self._staging, self._packed = [], None, []
        self._cache = init_cache(self.engine.cfg, self.max_batch, self.engine.max_seq_len, self.engine.kv_dtype)
        self._stage_caches.clear()

    def _emit(self, req: Request, ev: Event) -> None:
        try:
            req.on_event(ev)
        except Exception:  # noqa: BLE001  (a server's callback must not stop the loop)
            if self._admit_all:  # generate_rows: the caller's own on_token raised; its generate() raises it
                raise
            log.exception("on_event of request %d raised", req.id)


def nonfinite_message(where: str) -> str:
    """The error text of a request whose logits went NaN/Inf (`where`: "on the prompt", "at generated token n")."""
    return str(_nonfinite_error(where))


def generate_rows(engine: Engine, rows: Sequence[Sequence[int]], params: Sequence[RequestParams],
                  on_token: Callable[[int, str], None] | None = None) -> tuple[list[Event], dict]:
    """Runs the decode loop in this thread over token-id prompts until each is done (what `Engine.generate`
    and `generate_batch` do); returns their done events in order and the run's stats. `on_token(id,
    text)` streams row 0. Every attention span the run can reach is compiled first, in parallel, so no
    compile pauses the stream; a NaN/Inf in a row's logits raises `NonFiniteError`."""
    B = len(rows)
    loop = ContinuousBatcher(engine, max_batch=B, prefill_chunk=engine.max_seq_len, sizes=(B,))
    loop._admit_all = True  # also: an exception from on_token propagates (a server logs its callbacks' errors)
    mode = row_mode([p.temperature for p in params], [p.top_k for p in params], [p.top_p for p in params])
    lengths = [len(r) for r in rows]
    limit = engine.max_seq_len
    jobs = [loop._chunk_job(loop._chunk_width(n), loop._stage_key(n), decode_span(n, limit), mode)
            for n in sorted(set(lengths))]
    last = max(n + p.max_tokens for n, p in zip(lengths, params)) - 1
    jobs += [loop._step_job(B, span, mode) for span in decode_spans(min(lengths) + 1, last, limit)]
    inserts = sorted({(loop._stage_key(n), decode_span(n, loop._stage_len(n))) for n in lengths})
    moves = decode_spans(min(lengths), last, limit) if B > 1 else []  # a retired row refilled by the last one
    jobs += loop._row_jobs(inserts, moves)
    loop._compile(jobs)
    done: list[Event | None] = [None] * B

    def on_event(b: int, ev: Event) -> None:
        if ev.kind != "token":
            done[b] = ev
        elif b == 0 and on_token is not None and not ev.held_back:
            on_token(ev.token_id, ev.text)

    for b, (ids, p) in enumerate(zip(rows, params)):
        loop._waiting.append(Request(next(loop._ids), list(ids), p, functools.partial(on_event, b),
                                     detokenize=b == 0 and on_token is not None))
    loop._run_inline()
    for ev in done:
        if ev.kind == "error":
            raise NonFiniteError(ev.error)
    c, t = loop._counters, loop._times
    stats = {"compile_s": t["compile_s"], "prompt_tokens": int(sum(lengths)), "prefill_s": t["prefill_s"],
             "prefill_tokens_per_s": sum(lengths) / max(t["prefill_s"], 1e-9), "decode_steps": c["steps"],
             "decode_s": t["decode_s"],
             "decode_tokens_per_s": c["rows_decoded"] / t["decode_s"] if c["steps"] else 0.0}
    stats.update({k: c[k] for k in FFN_COUNTERS if k in c})
    return done, stats


@atexit.register
def _stop_at_exit() -> None:
    # A batcher left running at exit: its (daemon) thread would be mid-step when the interpreter
    # finalizes, and a thread that asks for the GIL then is ended inside XLA's C++ frames, which aborts
    # the process (7 exits in 8 with a request running). Stopping it here, before finalization, joins it.
    for batcher in list(_RUNNING):
        batcher.stop()
