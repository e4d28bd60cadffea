"""The inference engine: a loaded model's scoring (`logits`) and generation (`generate`,
`generate_batch`: the one decode loop of `batching`, run in the caller's thread)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from powerinfer_jax import checks
from powerinfer_jax.config import ModelConfig
from powerinfer_jax.errors import ArgumentError, CheckpointError, NonFiniteError
from powerinfer_jax.model import KV_DTYPES, FFNFn, forward, init_cache
from powerinfer_jax.params import ModelParams, fuse_qkv, with_int4_activations
from powerinfer_jax.sampling import SamplingParams
from powerinfer_jax.tokenizer import Tokenizer
from ops.linear import prompt_parts_scope

# How a prompt's activations meet bf16 weights in XLA's bf16 dot on a bf16-dot CPU (ops.linear.PROMPT_BF16_PARTS):
# "float32" splits them in two bf16 parts like the decode rows, "bfloat16" rounds them to one; None: the process
# setting (POWERINFER_PROMPT_BF16_PARTS). Other formats and backends are unaffected.
PROMPT_ACTIVATIONS = ("float32", "bfloat16")
INT4_ACTIVATIONS = ("float32", "int8")

MIN_BUCKET = 16


# Per-layer counters a sparse FFN may report (see sparse_ffn.HybridRuntime.ffn_fn).
FFN_COUNTERS = ("ffn_computed", "ffn_hot", "ffn_total", "ffn_overflow")


def _ffn_totals(aux: list[dict]) -> jax.Array:
    """The layers' FFN counters summed inside jit into one int32 vector (empty for dense FFNs):
    fetching one array per step instead of one scalar per layer and counter (~200 us a token)."""
    if not aux or not aux[0]:
        return jnp.zeros((0,), jnp.int32)
    return jnp.stack([sum(jnp.asarray(a[k], jnp.int32) for a in aux) for k in FFN_COUNTERS])


def _finite_or_flag(tokens: jax.Array, logits: jax.Array) -> jax.Array:
    """The sampled tokens, or -1 in a row whose logits hold a NaN/Inf: one compare per logit inside jit,
    and the host already fetches the tokens each step, so the check adds no transfer."""
    return jnp.where(jnp.all(jnp.isfinite(logits), axis=-1), tokens, -1)


def _nonfinite_error(where: str, stopped: str = "generation stopped") -> NonFiniteError:
    return NonFiniteError(f"the model produced NaN/Inf logits {where}, so {stopped} instead of returning garbage: "
                          "its weights or config are broken (pij.load(..., check_finite=True) scans the weights and "
                          "names the tensor)")


def bucket(n: int, limit: int) -> int:
    """Smallest power of two >= n (at least MIN_BUCKET), capped at `limit`."""
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return min(b, limit)


# A decode step attends over a power-of-two span of the cache, at least this many slots: each span
# is one compiled executable (2.4 s for the bundled model's hybrid step on 2 cores, ~L times that
# for L layers), while attending over 128 slots instead of 16 costs a 7B model ~1% of its weight
# bytes a token.
DECODE_MIN_SPAN = 128


def decode_span(n: int, limit: int) -> int:
    """The cache span a decode step at length `n` attends over (see DECODE_MIN_SPAN)."""
    return min(max(bucket(n, limit), DECODE_MIN_SPAN), limit)


def decode_spans(first: int, last: int, limit: int) -> list[int]:
    """Every span decode steps at lengths first..last use."""
    spans, n = [], first
    while n <= last:
        spans.append(decode_span(n, limit))
        n = spans[-1] + 1
    return spans


@dataclasses.dataclass
class GenerationResult:
    """What `Engine.generate` returns."""

    text: str
    token_ids: list[int]  # generated tokens only (prompt excluded)
    prompt_ids: list[int]
    stats: dict


def warm_host_kernels(params: ModelParams, cfg: ModelConfig, sparse: bool) -> float:
    """Loads (or compiles) the numba kernels a decode step of these params calls, once per format and
    process (`ops.host_kernels.warm`); returns the seconds it took, 0 when no host kernel runs (float32
    dense, or a dense engine off the CPU backend)."""
    from ops import host_kernels
    from ops.linear import uses_host_kernel
    from ops.quant import Weight
    from powerinfer_jax.config import THRESHOLD_FFN_KINDS

    weights = [w for w in jax.tree_util.tree_leaves(params, is_leaf=lambda a: isinstance(a, Weight))
               if isinstance(w, Weight)]
    # Sparse engines read FFN rows with numba in every format (the CPU engine, or a GPU engine's cold part).
    formats = {host_kernels.kernel_format(w) for w in weights if sparse or uses_host_kernel(w)}
    if not formats:
        return 0.0
    return host_kernels.warm(sorted(formats), gated=cfg.ffn_kind in THRESHOLD_FFN_KINDS)


class Engine:
    """A loaded model ready to score and generate; see `powerinfer_jax.load`."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: ModelParams,
        tokenizer: Tokenizer | None = None,
        max_seq_len: int | None = None,
        ffn_fn: FFNFn | None = None,
        model_dir: str | None = None,
        kv_dtype: str = "float32",
        prompt_activations: str | None = None,
    ):
        checks.choice("kv_dtype", kv_dtype, KV_DTYPES)
        if prompt_activations is not None:
            checks.choice("prompt_activations", prompt_activations, PROMPT_ACTIVATIONS)
        self.prompt_activations = prompt_activations
        if max_seq_len is not None:
            checks.integer("max_seq_len", max_seq_len, lo=1)
        self.kv_dtype = kv_dtype
        self.cfg = cfg
        self.params = fuse_qkv(params)
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.max_seq_len = min(max_seq_len or 2048, cfg.max_position_embeddings)
        self._ffn_fn = ffn_fn
        self._loop_programs = None  # loop_programs.programs(self): the decode loop's jitted programs, made on first use
        self._full = jax.jit(self.traced(functools.partial(self._full_impl, cfg=cfg, ffn_fn=ffn_fn, kv_dtype=kv_dtype)))
        self._step = jax.jit(self.traced(functools.partial(self._step_impl, cfg=cfg, ffn_fn=ffn_fn)),
                             static_argnames=("attend_len",), donate_argnames=("cache",))
        # Sparse engines (and input-sparse attention) score through decode steps: their prompt path is dense.
        self.stepwise_logits = any(lp.attn.wqkv_t is not None for lp in params.layers)
        # numba's machine code for the host kernels this engine calls, loaded now, not in the first tokens.
        self.host_kernel_warm_s = warm_host_kernels(self.params, cfg, sparse=ffn_fn is not None)

    def set_int4_activations(self, mode: str) -> None:
        """How the CPU host kernels meet this engine's int4 weights: "float32" (exact: dequantize, then f32 math;
        the default) or "int8" (each token's activations rounded to int8 per group of 32 values, integer dot
        products as llama.cpp's Q4_0 x Q8_0: 2-2.5x faster int4 mat-vecs on AVX2, outputs within ~0.5% of the
        largest; `ops.host_q8`). Prompts from the BLAS threshold on and the down projection stay exact.
        Call before generating."""
        from ops import host_q8

        checks.choice("int4_activations", mode, INT4_ACTIVATIONS)
        if mode == "int8":
            if not host_q8.SUPPORTED:
                raise ArgumentError("int4_activations='int8' needs an x86-64 CPU with AVX2 and F16C (integer dot "
                                    "instructions); this one lacks them: use 'float32'")
            if jax.default_backend() != "cpu":
                raise ArgumentError(f"int4_activations='int8' is for the CPU backend's host kernels; the "
                                    f"{jax.default_backend()} kernels keep float32 activations")
        params, marked = with_int4_activations(self.params, mode)
        if mode == "int8" and not marked:
            raise ArgumentError("int4_activations='int8' needs int4 weights (quantize='int4') whose rows are a "
                                f"multiple of {host_q8.BLOCK} values; this model has none")
        self.params = params
        self._loop_programs = None  # programs made for the old weights' pytree structure
        if mode == "int8":
            self.host_kernel_warm_s += warm_host_kernels(self.params, self.cfg, sparse=self._ffn_fn is not None)

    def traced(self, fn: Callable) -> Callable:
        """`fn` run with this engine's `prompt_activations` (ops.linear.prompt_parts_scope) whenever it is traced:
        the engine's jitted programs are wrapped in it, so two engines in one process keep their own settings."""
        if self.prompt_activations is None:
            return fn
        parts = 1 if self.prompt_activations == "bfloat16" else 0

        @functools.wraps(fn)  # keeps fn's signature for jit's static and donated argument names
        def body(*args, **kwargs):
            with prompt_parts_scope(parts):
                return fn(*args, **kwargs)

        return body

    # ---- jitted bodies -------------------------------------------------------------
    @staticmethod
    def _full_impl(params, tokens, *, cfg, ffn_fn, kv_dtype):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        # A half-precision KV cache rounds what attention reads: scored through one (as a prompt is prefilled),
        # the logits are the ones generation sees, and equal the stepwise (sparse) engines' at that precision.
        cache = None if kv_dtype == "float32" else init_cache(cfg, tokens.shape[0], tokens.shape[1], kv_dtype)
        logits, _, _ = forward(params, cfg, tokens, positions, cache, tokens.shape[1], ffn_fn=ffn_fn)
        return logits

    @staticmethod
    def _step_impl(params, token, pos, cache, *, cfg, ffn_fn, attend_len):
        logits, cache, extras = forward(params, cfg, token[:, None], pos[:, None], cache, attend_len, ffn_fn=ffn_fn)
        return logits[:, 0], cache, _ffn_totals(extras.get("ffn_aux", []))

    # ---- public API ----------------------------------------------------------------
    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Float32 logits [T, vocab] of a causal forward over a 1-D token sequence."""
        ids = self._check_ids(token_ids)
        if len(ids) > self.cfg.max_position_embeddings:
            raise ArgumentError(f"sequence of {len(ids)} tokens exceeds the model's {self.cfg.max_position_embeddings} "
                                "positions: score it in windows")
        if self.stepwise_logits:
            return self.logits_stepwise(ids)
        T = len(ids)
        padded = np.zeros((1, bucket(T, max(T, self.max_seq_len))), np.int32)
        padded[0, :T] = ids
        out = np.asarray(self._full(self.params, jnp.asarray(padded))[0, :T], dtype=np.float32)
        self._check_finite_logits(out)
        return out

    def logits_stepwise(self, token_ids: Sequence[int], stats: dict | None = None) -> np.ndarray:
        """Logits [T, vocab] computed one decode step per token (the path generation uses)."""
        ids = self._check_ids(token_ids)
        if len(ids) > self.max_seq_len:
            raise ArgumentError(f"sequence of {len(ids)} tokens exceeds the context of {self.max_seq_len}: score it "
                                "in windows or load with a larger max_seq_len")
        cache = init_cache(self.cfg, 1, self.max_seq_len, self.kv_dtype)
        out = []
        for t, tok in enumerate(ids):
            attend = decode_span(t + 1, self.max_seq_len)
            logits, cache, aux = self._step(self.params, jnp.asarray([tok], jnp.int32),
                                            jnp.asarray([t], jnp.int32), cache, attend_len=attend)
            out.append(np.asarray(logits[0], np.float32))
            if stats is not None:
                self._accumulate_ffn_stats(aux, stats)
        out = np.stack(out)
        self._check_finite_logits(out)
        return out

    @staticmethod
    def _check_finite_logits(out: np.ndarray) -> None:
        bad = ~np.isfinite(out).all(axis=-1)
        if bad.any():
            raise _nonfinite_error(f"at position {int(np.argmax(bad))}", "scoring stopped")

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """A text prompt through the tokenizer, or token ids as they are."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ArgumentError("this model has no tokenizer.json: pass token ids, not text")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as err:  # a lone surrogate, e.g. undecodable bytes in a command line
                raise ArgumentError(f"the prompt is not valid Unicode text (character {err.start}); pass UTF-8 "
                                    "text") from None
            ids = self.tokenizer.encode(prompt)
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise CheckpointError(f"{self.tokenizer.path} gave token id {bad[0]}, outside the model's vocabulary "
                                      f"[0, {self.cfg.vocab_size}): the tokenizer does not belong to this model")
            if not ids:
                raise ArgumentError("empty prompt: the text gave no tokens (and the model adds no BOS)")
            return ids
        return self._check_ids(prompt)

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop_at_eos: bool = True,
        on_token: Callable[[int, str], None] | None = None,
        truncate_prompt: bool = False,
    ) -> GenerationResult:
        """Generates up to `max_new_tokens` after `prompt`; `on_token(id, new_text)` streams.

        A prompt that does not fit the context with `max_new_tokens` is refused (`ArgumentError`), or
        with `truncate_prompt=True` cut to its last tokens (BOS kept); `stats["prompt_truncated"]` then
        says how many tokens were dropped."""
        if not isinstance(prompt, str):
            prompt = self._check_ids(prompt, "prompt")
        self._check_generation_args(max_new_tokens, seed, stop_at_eos, on_token, truncate_prompt)
        prompt_ids = self.encode(prompt)
        out = self.generate_batch([prompt_ids], max_new_tokens, temperature, top_p, top_k, seed,
                                  stop_at_eos, on_token, truncate_prompt)
        return out[0]

    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop_at_eos: bool = True,
        on_token: Callable[[int, str], None] | None = None,
        truncate_prompt: bool = False,
    ) -> list[GenerationResult]:
        """Generates for a batch of token-id prompts (lengths may differ; row b samples with seed + b); streams
        row 0. Runs the decode loop of `batching` (the server's) in this thread."""
        SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)  # checks the sampling settings
        self._check_generation_args(max_new_tokens, seed, stop_at_eos, on_token, truncate_prompt)
        if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__") or not len(prompts):
            raise ArgumentError(f"prompts must be a non-empty list of token-id sequences, got {type(prompts).__name__}")
        rows = [self._check_ids(p, "prompt") for p in prompts]
        rows, dropped = self._fit_context(rows, max_new_tokens, truncate_prompt)
        from powerinfer_jax.batching import RequestParams, generate_rows  # batching builds on this module

        # Row b draws with seed + b (wrapped into int64), so equal prompts in one batch sample differently.
        params = [RequestParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=(seed + b + 2**63) % 2**64 - 2**63, stop_at_eos=stop_at_eos)
                  for b in range(len(rows))]
        done, stats = generate_rows(self, rows, params, on_token)
        stats["prompt_truncated"] = dropped
        return [GenerationResult(text=ev.text, token_ids=list(ev.token_ids), prompt_ids=list(r), stats=stats)
                for ev, r in zip(done, rows)]

    # ---- helpers -------------------------------------------------------------------
    @staticmethod
    def _accumulate_ffn_stats(totals: jax.Array, stats: dict) -> None:
        """Adds one step's sparse-FFN counters (summed over layers inside jit) to `stats`."""
        if totals.shape[0]:
            for k, v in zip(FFN_COUNTERS, np.asarray(totals)):  # one small transfer per step
                stats[k] = stats.get(k, 0) + int(v)

    def _eos_ids(self) -> tuple[int, ...]:
        return self.tokenizer.eos_token_ids if self.tokenizer else self.cfg.eos_token_ids

    def _check_ids(self, token_ids: Sequence[int], name: str = "token_ids") -> list[int]:
        return checks.token_ids(name, token_ids, self.cfg.vocab_size)

    @staticmethod
    def _check_generation_args(max_new_tokens, seed, stop_at_eos, on_token, truncate_prompt) -> None:
        """Types and ranges of generate's arguments, before any work (sampling ones: SamplingParams)."""
        checks.integer("max_new_tokens", max_new_tokens, lo=1)
        checks.integer("seed", seed, lo=-(2**63), hi=2**63 - 1)  # what jax.random.PRNGKey takes
        checks.boolean("stop_at_eos", stop_at_eos)
        checks.boolean("truncate_prompt", truncate_prompt)
        if on_token is not None and not callable(on_token):
            raise ArgumentError(f"on_token must be callable or None, got {type(on_token).__name__}")

    def _fit_context(self, rows: list[list[int]], max_new_tokens: int, truncate: bool) -> tuple[list[list[int]], int]:
        """Prompts that fit the context with max_new_tokens: refused in one line, or (truncate) cut to
        their last tokens with a leading BOS kept. Returns (rows, tokens dropped in total)."""
        room = self.max_seq_len - max_new_tokens
        longest = max(len(r) for r in rows)
        if longest <= room:
            return rows, 0
        if not truncate or room < 1:
            fix = (f"lower max_new_tokens below {self.max_seq_len}" if room < 1 else
                   f"shorten the prompt, lower max_new_tokens, raise max_seq_len (the model allows "
                   f"{self.cfg.max_position_embeddings}), or pass truncate_prompt=True (--truncate_prompt) to keep "
                   f"its last {room} tokens")
            raise ArgumentError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
                                f"of {self.max_seq_len} tokens: {fix}")
        bos = self.tokenizer.bos_token_id if self.tokenizer is not None else self.cfg.bos_token_id
        out, dropped = [], 0
        for r in rows:
            if len(r) > room:
                keep_bos = bos is not None and r[0] == bos and room >= 2
                cut = [r[0]] + r[len(r) - room + 1:] if keep_bos else r[len(r) - room:]
                dropped += len(r) - len(cut)
                r = cut
            out.append(r)
        return out, dropped
