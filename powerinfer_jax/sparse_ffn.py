"""The hybrid sparse FFN (PowerInfer's runtime half), beside the dense one in `ffn.py`.

Per layer the neurons are split by the placement into *hot* (device) and *cold* (host) ids
(`hot_ids`, `cold_ids`); the layer's predictor scores neurons in that order (its output rows are
permuted at build time), so hot and cold scores are two slices, not gathers. Everything a layer
needs is in its `HybridFFN` pytree: the arrays, its static `LayerPlan` (partition sizes,
capacities, threshold) and, on an accelerator, its host handle (`ops.host_async.HostFFN`).

Where the device and the host share one memory (the CPU backend) each FFN matrix is kept whole,
once (`HybridFFN.shared`), and one numba call per layer computes the hot and the cold neurons
together over it (the reference engine on the CPU); in predicted mode that call also runs the
predictor and the selection (`ops.cpu_sparse.predicted_ffn_rows`). On an accelerator the hot rows are copied to
the device as compact arrays (`HybridFFN.hot`); the cold part runs on the host *while* the device
computes the hot part (`ops.host_async`: launch before the hot kernel, collect after it), and the
partial sums meet on the device. Weights may be in any stored format (`ops.quant.Weight`).

Which neurons are computed for a decode token:
  dense      all of them (device part dense over hot rows, host part dense over cold rows)
  oracle     exactly those whose ReLU output is non-zero (the true mask, from the gate);
             equals dense up to float rounding, which proves the sparse machinery exact.
             SwiGLU/GeGLU (threshold sparsity): those with |act(gate x)| above the layer's
             calibrated `act_threshold` (CATS: the gate dense, up and down sparse); equals a
             dense FFN that zeroes the activations below it
  predicted  those the layer's predictor scores >= threshold (PowerInfer's mode)
Prompts (T > 1 tokens) always run the dense split, as PowerInfer does for large batches.
Active sets are compacted into fixed-capacity index lists (static shapes); when more neurons are
active than a list holds, the highest-scoring ones are kept and the overflow is reported.
Counters are per decode step and mean the same at any batch size: neurons computed (the union over
the batch's tokens), of them on the device, neurons in the layer, neurons dropped by overflow.
Device kernels: "pallas" (GPU, Triton; dequantizes in registers), "xla" (gather + dequantize + dot), or
"numba" (CPU backend only: the shared whole matrices read in place; the default there).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ops.cpu_sparse import predicted_ffn_rows, sparse_ffn_rows, threshold_ffn_rows
from ops import host_async
from ops.host_kernels import host_ffn_callback
from ops.linear import linear, linear_relu_linear, native_bf16_dot
from ops.reference import gate_activation
from ops.quant import Weight, to_weight
from powerinfer_jax import tensor_file
from ops.select import compact_mask
from ops.xla_sparse import sparse_ffn_xla
from powerinfer_jax.config import THRESHOLD_FFN_KINDS, ModelConfig
from powerinfer_jax.errors import ArgumentError, UnsupportedModelError
from powerinfer_jax.ffn import dense_ffn
from powerinfer_jax.layers import concat_rows, prompt_rows_from, split_rows
from powerinfer_jax.params import FFNParams
from powerinfer_jax.tensor_file import to_global, to_jax

f32 = jnp.float32
MODES = ("dense", "oracle", "predicted")
# A decode step of at least this many rows over shared bf16 matrices computes the whole FFN when XLA's own
# bf16 dot runs it (ops.linear.native_bf16_dot): there the union of 16 rows' masks (about a third of the
# neurons on the 7B shape) through the sparse kernels cost more than every neuron through the dot
# (BENCHMARKS.md, "bf16 at batch > 1": 7B shape, 16 clients, bf16: dense 30.2 tok/s, predicted 21.4).
DENSE_FFN_MIN_ROWS = 16
MESH_AXIS = "hot"  # the 1-D device mesh the hot neurons are sharded over


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PredictorParams:
    """fc2(relu(fc1 x)), no biases: fc1 [d, r], fc2 [r, n_ff] as float arrays (training, bundles); or,
    in the engine, row `Weight`s fc1 [r, d] and fc2 [n_ff, r] (torch's layout) in a stored format,
    read by the same kernels as the model's weights (`engine_predictor`)."""

    fc1: jax.Array
    fc2: jax.Array


def predict_logits(p: PredictorParams, x: jax.Array) -> jax.Array:
    """Per-neuron activation logits [..., n_ff] from the residual stream x [..., d]."""
    if isinstance(p.fc1, Weight):
        return linear_relu_linear(x, p.fc1, p.fc2)
    return jax.nn.relu(x.astype(f32) @ p.fc1.astype(f32)) @ p.fc2.astype(f32)


def predictor_format(weight_format: str) -> str:
    """The format the engine stores predictors in: the model's weights' (they are read every token,
    like the weights), but int8 for an int4 model (predictor errors decide which neurons run at all)."""
    return "int8" if weight_format == "int4" else weight_format


def engine_predictor(fc1, fc2, fmt: str) -> PredictorParams:
    """Host predictor matrices (fc1 [d, r], fc2 [r, n_ff]) as device row Weights of `fmt`."""
    def rows(a):
        return jax.tree.map(to_jax, to_weight(tensor_file.aligned(np.ascontiguousarray(np.asarray(a, np.float32).T)), fmt))

    return PredictorParams(fc1=rows(fc1), fc2=rows(fc2))


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Static per-layer settings: partition sizes, capacities, predictor threshold (on its logits) and,
    for SwiGLU/GeGLU, the activation threshold that defines an active neuron (|act(gate x)| above it)."""

    n_hot: int
    n_cold: int
    hot_capacity: int
    cold_capacity: int
    threshold: float = 0.0
    act_threshold: float | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class HybridFFN:
    """One layer's hybrid FFN: arrays, plus its plan and host handle as static metadata.

    Either `shared` (CPU backend: the whole matrices, read in place by one call for both parts
    with neuron ids) or `hot` (an accelerator: compact copies of the hot rows on the device; the
    cold part reads `host`, the layer's host matrices) is set."""

    shared: FFNParams | None  # whole FFN matrices (no b_down), CPU backend
    hot: FFNParams | None  # compact hot rows [H, d]; None when shared or H == 0
    hot_ids: jax.Array  # [H] int32 neuron ids of the hot rows
    cold_ids: jax.Array  # [C] int32 neuron ids of the host rows
    b_down: jax.Array | None  # OPT fc2 bias, added once on the device
    predictor: PredictorParams | None  # output rows in (hot_ids, cold_ids) order
    plan: LayerPlan = dataclasses.field(metadata=dict(static=True))
    host: host_async.HostFFN | None = dataclasses.field(default=None, metadata=dict(static=True))


def take_rows(w, ids: np.ndarray):
    """Host rows w[ids] (a Weight keeps its per-row scales), or None."""
    if w is None:
        return None
    if isinstance(w, Weight):
        scale = None if w.scale is None else np.ascontiguousarray(w.scale[ids])
        return Weight(np.ascontiguousarray(w.data[ids]), scale, w.fmt, w.cols, w.act)
    return np.ascontiguousarray(np.asarray(w)[ids])


def permute_outputs(p: PredictorParams | None, order: np.ndarray) -> PredictorParams | None:
    """The predictor with its outputs in `order` (logit j scores neuron order[j]): a small copy of fc2."""
    if p is None:
        return None
    if isinstance(p.fc2, Weight):  # engine form: fc2 rows [n_ff, r]
        w = p.fc2
        fc2 = Weight(jnp.take(w.data, order, axis=0), None if w.scale is None else jnp.take(w.scale, order, axis=0),
                     w.fmt, w.cols, w.act)
    else:  # training form: fc2 [r, n_ff]
        fc2 = jnp.take(p.fc2, order, axis=1)
    return PredictorParams(fc1=p.fc1, fc2=fc2)


def split_ffn(family: str, ffn: FFNParams, hot_ids: np.ndarray, predictor: PredictorParams | None, shared: bool,
              plan: LayerPlan, cold_ids: np.ndarray | None = None, mesh=None) -> HybridFFN:
    """One layer's state from host FFN matrices: shared whole matrices, or hot-row device copies
    plus the cold part's host handle. `cold_ids`: the cold neurons in the order wanted (default:
    every other neuron, ascending). With a `mesh`, the hot rows and both id lists go to their
    devices' shards straight from the host (device-major order), the rest replicated."""
    n = ffn.w_up.shape[0]
    hot_ids = np.asarray(hot_ids, np.int32)
    if cold_ids is None:
        cold_ids = np.setdiff1d(np.arange(n, dtype=np.int32), hot_ids)
    cold_ids = np.asarray(cold_ids, np.int32)
    if mesh is None:
        put = put_rows = lambda tree: None if tree is None else jax.tree.map(to_jax, tree)  # noqa: E731
        put_ids = jnp.asarray  # a layer's own id arrays (callers may pass one array for every layer)
    else:
        rows, every = NamedSharding(mesh, P(MESH_AXIS)), NamedSharding(mesh, P())
        put = lambda tree: None if tree is None else jax.tree.map(lambda a: to_global(a, every), tree)  # noqa: E731
        put_rows = lambda tree: None if tree is None else jax.tree.map(lambda a: to_global(a, rows), tree)  # noqa: E731
        put_ids = put_rows
    whole = dataclasses.replace(ffn, b_down=None)
    hot = host = None
    if not shared and len(hot_ids):
        hot = FFNParams(**{k: take_rows(getattr(ffn, k), hot_ids) for k in ("w_up", "w_down_t", "w_gate", "b_up")})
    if not shared and len(cold_ids):
        host = host_async.HostFFN(family, whole.w_gate, whole.w_up, whole.w_down_t, whole.b_up)
    predictor = permute_outputs(predictor, np.concatenate([hot_ids, cold_ids]))
    return HybridFFN(shared=put(whole) if shared else None, hot=put_rows(hot), hot_ids=put_ids(hot_ids),
                     cold_ids=put_ids(cold_ids), b_down=put(ffn.b_down), predictor=put(predictor), plan=plan,
                     host=host)


def _true_scores(family: str, w: FFNParams, x: jax.Array) -> jax.Array:
    """What the true mask compares: the pre-activation whose ReLU defines it (gate, or fc1 + bias for
    OPT: active when > 0), or for SwiGLU/GeGLU |act(gate x)| (active when above the act threshold)."""
    if family == "relu":
        return linear(x, w.w_up, w.b_up)
    if family in THRESHOLD_FFN_KINDS:
        return jnp.abs(gate_activation(family, linear(x, w.w_gate, exact=True)))
    return linear(x, w.w_gate)


def select_top(mask: jax.Array, score: jax.Array, capacity: int):
    """Active positions of `mask` [n] as (idx [C], kept, true count): all of them in position
    order, or, when more than C are active, the C with the highest `score`."""
    idx, _, count = compact_mask(mask, capacity)
    if capacity < mask.shape[0]:
        def by_score(_):
            _, top = jax.lax.top_k(jnp.where(mask, score, -jnp.inf), capacity)
            return jnp.sort(top).astype(jnp.int32)  # position order: rows read front to back

        idx = jax.lax.cond(count > capacity, by_score, lambda _: idx, None)
    return idx, jnp.minimum(count, capacity), count


def merge_prefix(a: jax.Array, n_a: jax.Array, b: jax.Array, n_b: jax.Array) -> jax.Array:
    """One list holding a[:n_a] then b[:n_b] at its front (static size len(a) + len(b))."""
    size = a.shape[0] + b.shape[0]
    pos_a = jnp.where(jnp.arange(a.shape[0]) < n_a, jnp.arange(a.shape[0]), size)
    pos_b = jnp.where(jnp.arange(b.shape[0]) < n_b, n_a + jnp.arange(b.shape[0]), size)
    out = jnp.zeros((size,), jnp.int32)
    return out.at[pos_a].set(a, mode="drop").at[pos_b].set(b, mode="drop")


class HybridRuntime:
    """Provides the `ffn_fn` the model calls per layer. Holds only engine-wide settings: each
    layer's plan and host handle are in its `HybridFFN`."""

    def __init__(self, cfg: ModelConfig, mode: str, device_kernel: str = "xla", overlap: bool = True,
                 callback_method: str = "auto", mesh: jax.sharding.Mesh | None = None):
        if mode not in MODES:
            raise ArgumentError(f"unknown sparsity mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode != "dense" and not cfg.is_sparse_capable:
            raise UnsupportedModelError(f"sparsity={mode!r} is not supported for this model's FFN ({cfg.ffn_kind!r})")
        self.cfg, self.mode, self.device_kernel = cfg, mode, device_kernel
        self.overlap = overlap  # accelerator: cold part launched before the hot kernel, collected after
        self.callback_method = callback_method
        # Hot rows sharded over a 1-D mesh (axis MESH_AXIS): each device computes its own share
        # of a layer's hot neurons and the partial sums are added across the mesh.
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None

    def _hot(self, hot: FFNParams, x, idx, valid):
        """The device part over hot positions `idx` of the compact hot rows."""
        family = self.cfg.ffn_kind
        if self.device_kernel == "pallas":
            from ops.pallas_gpu import sparse_ffn_pallas

            # Interpret mode off the GPU: lets CPU tests run the exact kernels the GPU runs.
            return sparse_ffn_pallas(family, hot.w_gate, hot.w_up, hot.w_down_t, x, idx, valid, hot.b_up,
                                     interpret=jax.default_backend() != "gpu")
        return sparse_ffn_xla(family, hot.w_gate, hot.w_up, hot.w_down_t, x, idx, valid, hot.b_up)

    def _mesh_ffn(self, p: HybridFFN, x, hot_sel=None, cold_sel=None, act_threshold=None):
        """The layer over the mesh, in one shard_map: each device computes its share of the hot rows
        and its process's host its share of the cold rows (launched before the hot part when
        overlapping), and the partial sums are added across the mesh. `hot_sel`/`cold_sel`:
        (score, mask) sharded like the rows, or None for every row. Returns (y, hot kept, hot
        count, cold kept, cold count), summed over the devices."""
        plan, family, D = p.plan, self.cfg.ffn_kind, self.mesh.size
        H, C = plan.n_hot // D, plan.n_cold // D  # rows per device
        cap_h, cap_c = min(H, -(-plan.hot_capacity // D)), min(C, -(-plan.cold_capacity // D))
        rows = P(MESH_AXIS)
        operands, specs = [x], [P()]
        for present, value, spec in ((H > 0, p.hot, jax.tree.map(lambda _: rows, p.hot)), (C > 0, p.cold_ids, rows),
                                     (hot_sel is not None, hot_sel, (rows, rows)),
                                     (cold_sel is not None, cold_sel, (rows, rows))):
            if present:
                operands.append(value)
                specs.append(spec)

        def local(x, *rest):
            rest = list(rest)
            hot = rest.pop(0) if H else None
            cold_ids = rest.pop(0) if C else None
            hs = rest.pop(0) if hot_sel is not None else None
            cs = rest.pop(0) if cold_sel is not None else None
            counts = {"hot": (jnp.int32(H), jnp.int32(H)), "cold": (jnp.int32(C), jnp.int32(C))}
            cids = cold_ids
            if C and cs is not None:
                idx, kept, count = select_top(cs[1], cs[0], cap_c)
                cids, counts["cold"] = jnp.take(cold_ids, idx), (kept, count)

            def hot_part(xd):
                if hs is None:
                    return dense_ffn(hot, family, xd)
                idx, kept, count = select_top(hs[1], hs[0], cap_h)
                counts["hot"] = (kept, count)
                return self._hot(hot, xd, idx, jnp.arange(cap_h) < kept)

            live = {} if act_threshold is not None and C else None
            y = self._split(p, x, hot_part, cids, counts["cold"][0] if C else None, act_threshold, live)
            if live:  # CATS: the host computed only the cold neurons above the threshold
                counts["cold"] = (live["cold"], live["cold"])
            out = (y,) + counts["hot"] + counts["cold"]
            return tuple(jax.lax.psum(v, MESH_AXIS) for v in out)

        # check_vma off: select_top's lax.cond has a branch that returns its operand unchanged, which the
        # varying-axes type check rejects (the psums make every output replicated anyway).
        return jax.shard_map(local, mesh=self.mesh, in_specs=tuple(specs), out_specs=(P(),) * 5,
                             check_vma=False)(*operands)

    def _split(self, p: HybridFFN, x, hot_part, cold_ids, cold_count, act_threshold=None, live=None):
        """Accelerator layout: `hot_part(x)` on the device, the host FFN over cold_ids[:cold_count]
        (CATS above `act_threshold` when given) meanwhile (overlap) or after it. `live`: a dict that gets
        "cold", the number of cold neurons the host computed (CATS always goes through launch/collect,
        which return it; with overlap off the two are then merely not forced apart)."""
        y = jnp.zeros(x.shape, f32)
        if p.host is None:  # no cold neurons
            return y + hot_part(x) if p.plan.n_hot else y
        if not self.overlap and live is None:
            if p.plan.n_hot:
                y = y + hot_part(x)
            h = p.host
            return y + host_ffn_callback(h.family, h.w_gate, h.w_up, h.w_down_t, x, cold_ids, cold_count, h.b_up,
                                         method=self.callback_method, after=y, act_threshold=act_threshold)
        ticket, x_dev = host_async.launch(p.host, x, cold_ids, cold_count, act_threshold)
        if p.plan.n_hot:
            y = y + hot_part(x_dev)
        if live is None:
            return y + host_async.collect(p.host, ticket, x.shape[0], after=y)
        y_cold, live["cold"] = host_async.collect(p.host, ticket, x.shape[0], after=y, with_live=True)
        return y + y_cold

    def ffn_fn(self, i: int, p: HybridFFN, x_norm: jax.Array, x_resid: jax.Array, rows: jax.Array | None = None):
        """The model's FFN hook: returns (output [B, T, d], per-layer counters); `rows` [B] marks the
        rows holding a sequence (the others, batch padding, choose no neurons)."""
        del i  # everything the layer needs is in its pytree
        B, T, d = x_norm.shape
        x = x_norm.reshape(B * T, d)
        plan, family = p.plan, self.cfg.ffn_kind
        aux: dict = {}
        if self._computes_all(p, B, T):
            # Dense split: every hot row on the device, every cold row on the host.
            if p.shared is not None:
                y = dense_ffn(p.shared, family, x, 0 if T > 1 else None)  # one memory: the whole FFN at once
            elif self.mesh is not None:  # p.hot carries no down bias: added once below
                y = self._mesh_ffn(p, x)[0]
            else:
                y = self._split(p, x, lambda xd: dense_ffn(p.hot, family, xd), p.cold_ids, jnp.int32(plan.n_cold))
            if T == 1:
                aux = self._all_computed(plan)
        else:
            y, aux = self._sparse(p, x, x_resid.reshape(B * T, d), rows)
        if p.b_down is not None:
            y = y + p.b_down.astype(f32)
        return y.reshape(B, T, d), aux

    def _computes_all(self, p: HybridFFN, B: int, T: int) -> bool:
        """Whether `ffn_fn` computes every neuron for a group of B x T rows: a prompt, dense mode, or a decode
        batch large enough that the whole FFN through XLA's bf16 dot beats the union of its masks."""
        whole = (p.shared is not None and self.mesh is None and B * T >= DENSE_FFN_MIN_ROWS
                 and native_bf16_dot(p.shared.w_up, B * T))
        return T > 1 or self.mode == "dense" or whole

    @staticmethod
    def _all_computed(plan: LayerPlan) -> dict:
        n = plan.n_hot + plan.n_cold
        return {"ffn_computed": n, "ffn_hot": plan.n_hot, "ffn_total": n, "ffn_overflow": jnp.int32(0)}

    def ffn_groups(self, i: int, p: HybridFFN, xs_norm: list, xs_resid: list, rows: list) -> tuple[list, list]:
        """`ffn_fn` over several row groups (`model.forward_groups`: a decode batch and a carried prompt
        chunk). When every group computes every neuron on one shared memory, one dense FFN runs over all
        their rows (each weight read once, one dot of all the rows: a 16-row step carrying a 32-token chunk of
        the 7B shape took 496-509 ms, against 633-654 ms with a dot per group); otherwise each group runs
        `ffn_fn` on its own.
        Returns (outputs, per-group counters)."""
        shapes = [x.shape for x in xs_norm]
        if p.shared is None or not all(self._computes_all(p, B, T) for B, T, _ in shapes):
            outs = [self.ffn_fn(i, p, x, r, g) for x, r, g in zip(xs_norm, xs_resid, rows)]
            return [y for y, _ in outs], [a for _, a in outs]
        y = dense_ffn(p.shared, self.cfg.ffn_kind, concat_rows(xs_norm), prompt_rows_from(xs_norm))
        if p.b_down is not None:
            y = y + p.b_down.astype(f32)
        return split_rows(y, xs_norm), [self._all_computed(p.plan) if T == 1 else {} for _, T, _ in shapes]

    def _sparse(self, p: HybridFFN, x, x_resid, rows=None):
        """Decode: only the active neurons (predicted, or the true ReLU mask for oracle)."""
        plan, family = p.plan, self.cfg.ffn_kind
        H, C = plan.n_hot, plan.n_cold
        cats = family in THRESHOLD_FFN_KINDS  # SwiGLU/GeGLU: active = |act(gate x)| > plan.act_threshold
        if cats and plan.act_threshold is None:
            raise UnsupportedModelError(
                f"sparsity={self.mode!r} on a {family} model needs per-layer activation thresholds: prepare a bundle "
                "with bin/prepare --target_sparsity (or pass act_thresholds= to pij.load)")
        if cats and self.mode == "oracle" and p.shared is not None and self.mesh is None:
            return self._cats_shared(p, x)

        if (self.mode == "predicted" and p.shared is not None and self.mesh is None
                and isinstance(p.predictor.fc1, Weight)):
            # One memory (the CPU engine): predictor, union, selection and the neurons' rows in one host
            # call; its list holds the whole layer (no overflow), hot neurons first.
            w = p.shared
            y, count, hot = predicted_ffn_rows(family, p.predictor.fc1, p.predictor.fc2, plan.threshold, p.hot_ids,
                                               p.cold_ids, w.w_gate, w.w_up, w.w_down_t, w.b_up, x_resid, x, rows)
            return y, {"ffn_computed": count, "ffn_hot": hot, "ffn_total": H + C, "ffn_overflow": jnp.int32(0)}

        def union(scores):  # one score per neuron for the batch: its best row (the union of the rows' masks)
            return jnp.max(scores if rows is None else jnp.where(rows[:, None], scores, -jnp.inf), axis=0)

        if self.mode == "predicted":
            score = union(predict_logits(p.predictor, x_resid))  # [H + C], hot first
            active = score >= plan.threshold
            hot_score, hot_mask, cold_score, cold_mask = score[:H], active[:H], score[H:], active[H:]
        else:  # oracle: the true mask on the device; the host part gets every cold row (and its ReLU zeros)
            hot_score = hot_mask = cold_score = cold_mask = None
            if H:
                w = p.shared if p.shared is not None else p.hot
                hot_score = union(_true_scores(family, w, x))
                if p.shared is not None:
                    hot_score = hot_score[p.hot_ids]
                hot_mask = hot_score > (plan.act_threshold if cats else 0)
        if self.mesh is not None:
            y, hot_done, hot_true, cold_done, cold_true = self._mesh_ffn(
                p, x, (hot_score, hot_mask) if H else None, None if cold_mask is None else (cold_score, cold_mask),
                plan.act_threshold if cats and self.mode == "oracle" else None)
            return y, {"ffn_computed": hot_done + cold_done, "ffn_hot": hot_done, "ffn_total": H + C,
                       "ffn_overflow": (hot_true - hot_done) + (cold_true - cold_done)}
        hot_idx = jnp.zeros((0,), jnp.int32)
        hot_done = hot_true = cold_done = cold_true = jnp.int32(0)
        if H:
            hot_idx, hot_done, hot_true = select_top(hot_mask, hot_score, plan.hot_capacity)
        if C:
            if cold_mask is None:
                cold_idx, cold_done, cold_true = jnp.arange(C, dtype=jnp.int32), jnp.int32(C), jnp.int32(C)
            else:
                cold_idx, cold_done, cold_true = select_top(cold_mask, cold_score, plan.cold_capacity)
        if p.shared is not None:
            # One memory: one numba call over both partitions' neurons (hot first, then cold).
            w = p.shared
            ids = merge_prefix(jnp.take(p.hot_ids, hot_idx), hot_done,
                               jnp.take(p.cold_ids, cold_idx) if C else jnp.zeros((0,), jnp.int32), cold_done)
            y = sparse_ffn_rows(family, w.w_gate, w.w_up, w.w_down_t, w.b_up, x, ids, hot_done + cold_done)
        else:
            valid = jnp.arange(hot_idx.shape[0]) < hot_done
            # CATS oracle: the host part gets every cold row, thresholds them itself and says how many it computed.
            cats_oracle = cats and self.mode == "oracle" and C
            live = {} if cats_oracle else None
            y = self._split(p, x, lambda xd: self._hot(p.hot, xd, hot_idx, valid),
                            jnp.take(p.cold_ids, cold_idx) if C else None, cold_done,
                            plan.act_threshold if cats_oracle else None, live)
            if cats_oracle:
                cold_done = cold_true = live["cold"]
        aux = {"ffn_computed": hot_done + cold_done, "ffn_hot": hot_done, "ffn_total": H + C,
               "ffn_overflow": (hot_true - hot_done) + (cold_true - cold_done)}
        return y, aux

    def _cats_shared(self, p: HybridFFN, x):
        """CATS oracle on one memory: one numba call reads every neuron's gate row and the up and down rows
        of those above the act threshold, hot neurons listed first so its count splits into hot and cold."""
        w, plan = p.shared, p.plan
        ids = jnp.concatenate([p.hot_ids, p.cold_ids])
        y, done, hot_done = threshold_ffn_rows(self.cfg.ffn_kind, w.w_gate, w.w_up, w.w_down_t, x, ids,
                                               jnp.int32(ids.shape[0]), plan.act_threshold, first=plan.n_hot)
        return y, {"ffn_computed": done, "ffn_hot": hot_done, "ffn_total": plan.n_hot + plan.n_cold,
                   "ffn_overflow": jnp.int32(0)}
