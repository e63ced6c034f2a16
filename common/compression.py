"""Gradient compression: a compressor owns how (already normalised) gradients cross the wire.

`reduce(grads, dist)` returns the sum over data-parallel replicas of `grads`, computed through
whatever smaller representation the compressor sends; every replica gets the same result.
Gradients arrive divided by the global weight count (mean-sized), so narrower float types stay
in range. Select one with `make_compressor(spec)`, spec as `--compression` takes it:

    none           float32 all-reduce
    fp16           float16 all-reduce
    bf16           bfloat16 all-gather, summed in float32 (Horovod 0.28.1's all-reduce
                   rejects bfloat16, its all-gather moves the bits as int16)
    topk:F         the entries largest in magnitude of all matrices together, a fraction F of
                   them, as (int32 index, bfloat16 value) pairs, with error feedback
    topk:F,warmup=W   the same, starting at 10 F and falling geometrically to F over the first
                   W steps (Lin et al. 2018, Deep Gradient Compression: early updates change fast)
    powersgd:R     rank-R PowerSGD (Vogels et al. 2019) of every matrix, with error feedback

Top-k and PowerSGD lose most of each step's signal and rely on error feedback: what a replica
did not send is added to what it sends next, so it is delayed, never lost. That only holds when
what is compressed adds up linearly into the weights. Adam's update does not: it divides by the
root of the mean squared input, so a coordinate sent once in T steps as one accumulated spike
moves about sqrt(T) times less than the same sum spread over T steps. Top-k therefore sets
`compresses_updates`: each replica's optimizer steps on its own gradient, and what is compressed
and averaged is the change of the weights (`plans.data.step_on_compressed_updates`). What
waits is stale when it lands, so each replica takes its gradient at the shared weights plus its
own unsent updates (`gradient_point`), and the end of training adds every replica's unsent
updates to the weights (`flush`). PowerSGD compresses the gradients: they are close to low
rank, Adam's normalised updates are not (measured on translate: held-out token accuracy -6.6%
compressing gradients; -10.1% compressing updates, -8.3% adding the look-ahead and flush;
-7.6% compressing gradients divided by a factored second moment that Adam then used, which
makes Adam's step linear in what is sent).
Both keep their state in variables that `build` creates before the first compiled step.
Checkpoints keep each replica's residuals (`replica_state`); PowerSGD's Q, a warm start, begins
again from its seeded value on resume.
`wire_bytes(shapes)` is what one replica contributes to the collectives per step
(`mean_wire_bytes(shapes, steps)` over a run, where it varies), to compare with
`float32_bytes(shapes)` (the uncompressed all-reduce).
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import numpy as np
import tensorflow as tf

from common.errors import ConfigError

Shape = Sequence[int]
# The kinds of replica state (`Compressor.replica_state`): what error feedback holds back.
UNSENT_UPDATES, UNSENT_GRADIENTS = "unsent_updates", "unsent_gradients"
SPEC_HELP = ("none, fp16, bf16, topk:F (0 < F < 1, e.g. topk:0.01), topk:F,warmup=W (W >= 0 steps) "
             "or powersgd:R (R >= 1, e.g. powersgd:4)")


def float32_bytes(shapes: Sequence[Shape]) -> int:
    """Bytes of the gradients as one uncompressed float32 all-reduce."""
    return 4 * sum(_size(shape) for shape in shapes)


def _size(shape: Shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _flatten(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def _unflatten(flat: tf.Tensor, like: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    parts = tf.split(flat, [_size(t.shape) for t in like])
    return [tf.reshape(part, t.shape) for part, t in zip(parts, like)]


def _gathered_bfloat16(values: tf.Tensor, dist) -> tf.Tensor:
    """Every replica's bfloat16 `values`, stacked in replica order; Horovod 0.28.1's all-gather
    moves them as their int16 bit patterns."""
    return tf.bitcast(dist.gather_across_replicas(tf.bitcast(values, tf.int16)), tf.bfloat16)


class Compressor:
    """Full-precision sum in one fused all-reduce (`--compression=none`)."""

    spec = "none"
    needs_horovod = False  # gathers or per-replica state: MirroredStrategy replicas share one process
    compresses_updates = False  # True: reduce() gets weight updates, not gradients (module docstring)

    def build(self, variables: Sequence[tf.Variable], dist, step: tf.Variable | None = None) -> None:
        """Check the backend and create any state; call once, outside tf.function. `step`
        counts the optimizer's steps (a schedule's clock; checkpointed with the optimizer)."""
        if self.needs_horovod and dist.backend != "horovod":
            raise ConfigError(f"--compression={self.spec} needs --backend=horovod")

    def replica_state(self) -> dict[str, list[tf.Variable]]:
        """State each replica holds its own value of, by kind, one variable per weight in
        `build`'s order; checkpoints keep it per replica (`common.state`)."""
        return {}

    def reduce(self, grads: Sequence[tf.Tensor], dist) -> list[tf.Tensor]:
        return dist.sum_across_replicas(grads)

    def gradient_point(self):
        """A context in which the weights are where this replica takes its gradient: as they are."""
        return contextlib.nullcontext()

    def evaluation_point(self, dist):
        """A context in which the weights are what the replicas have trained together, for a
        mid-run evaluation: as they are. A collective where it does anything."""
        return contextlib.nullcontext()

    def flush(self, dist) -> None:
        """Send what still waits, at the end of training (nothing waits here). A collective."""

    def wire_bytes(self, shapes: Sequence[Shape]) -> int:
        return float32_bytes(shapes)

    def mean_wire_bytes(self, shapes: Sequence[Shape], steps: int) -> float:
        """`wire_bytes` averaged over a run of `steps` steps."""
        return self.wire_bytes(shapes)


class CastCompression(Compressor):
    """Send floating-point gradients in a narrower float type, sum, cast back."""

    def __init__(self, wire_dtype: tf.DType):
        self.wire_dtype = wire_dtype
        self.spec = {tf.float16: "fp16", tf.bfloat16: "bf16"}[wire_dtype]

    def reduce(self, grads, dist):
        wire = [tf.cast(g, self.wire_dtype) for g in grads]
        return [tf.cast(s, g.dtype) for s, g in zip(dist.sum_across_replicas(wire), grads)]

    def wire_bytes(self, shapes):
        return float32_bytes(shapes) * self.wire_dtype.size // 4


class Bfloat16Compression(CastCompression):
    """bfloat16 on the wire. Horovod's all-reduce does not take bfloat16, so every replica's
    gradients are all-gathered as their bit patterns and summed in float32 in replica order
    (the same bits on every rank). The gather receives (N-1)/N x 2 bytes per entry more than a
    ring all-reduce as N grows: prefer fp16 for many replicas."""

    needs_horovod = True

    def __init__(self):
        super().__init__(tf.bfloat16)

    def reduce(self, grads, dist):
        gathered = tf.cast(_gathered_bfloat16(tf.cast(_flatten(grads), tf.bfloat16), dist), tf.float32)
        total = tf.add_n(tf.unstack(gathered, num=dist.num_replicas))
        return [tf.cast(s, g.dtype) for s, g in zip(_unflatten(total, grads), grads)]


class _ErrorFeedback(Compressor):
    """State shared by the lossy compressors: what a replica did not send of a tensor (its
    residual) is added to what it sends of that tensor next, so nothing is lost, only delayed."""

    needs_horovod = True
    residuals: list[tf.Variable] | None = None

    def build(self, variables, dist, step=None):
        super().build(variables, dist, step)
        self.residuals = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name="residual")
                          for v in variables]

    def replica_state(self):
        if self.residuals is None:
            return {}
        return {UNSENT_UPDATES if self.compresses_updates else UNSENT_GRADIENTS: self.residuals}

    def corrected(self, grads) -> list[tf.Tensor]:
        if self.residuals is None:
            raise ConfigError(f"--compression={self.spec} keeps state that this plan does not build: "
                              "use --compression=none, fp16 or bf16")
        return [g + r for g, r in zip(grads, self.residuals)]


class TopKCompression(_ErrorFeedback):
    """Each replica sends the entries largest in magnitude of all its matrices together, as
    many as the fraction of their entries, as (index, value) pairs in one all-gather of int32
    indices and one of bfloat16 values, 6 bytes an entry; what rounding drops stays in the
    residual (measured on translate, 1% with a warm-up over a third of the run: 0.2897 and
    0.2905 token accuracy at seeds 0 and 1, against 0.2909 and 0.2891 with float32 values).
    The sum is scattered back in replica order, so every rank gets the same bits. One
    selection over all matrices (measured on translate: held-out token accuracy -8.7% of
    uncompressed, against -9.9% with a fixed count per matrix; classify: see README) lets the
    matrices whose updates add up fastest send more. Vectors (biases, norm scales: few bytes,
    but few entries each, which a fraction would leave waiting for many steps) ride whole in
    one all-reduce. With a warm-up, the fraction starts 10 times higher (at most 1) and falls
    geometrically to its final value over the first `warmup` steps, when the weights change
    fastest (measured on translate: 1% with a warm-up over the first third of the run -2.1%
    over three seeds and -2.4% over five, -3.3% without; over half the run -2.4% over the
    same three)."""

    WARMUP_START = 10.0  # the fraction at step 0, as a multiple of the final one
    ENTRY_BYTES = 4 + 2  # an int32 index and a bfloat16 value
    compresses_updates = True

    def __init__(self, fraction: float, warmup: int = 0):
        self.fraction, self.warmup = fraction, warmup
        self.spec = f"topk:{fraction:g}" + (f",warmup={warmup}" if warmup else "")
        self.step: tf.Variable | None = None

    def build(self, variables, dist, step=None):
        if self.warmup and step is None:
            raise ValueError("top-k with a warm-up needs the optimizer's step counter")
        super().build(variables, dist, step)
        self.step = step
        self.weights = list(variables)

    def gradient_point(self):
        """Each replica takes its gradient at the shared weights plus its own unsent updates:
        its own steps count at once, and only the other replicas' wait (measured on translate:
        held-out token accuracy -3.0% of uncompressed, against -8.7% at the shared weights)."""
        return self._weights_moved_by(self.residuals)

    def evaluation_point(self, dist):
        """The shared weights plus every replica's unsent updates (one float32 all-reduce, not
        counted in the gradient bytes): a mid-run evaluation scores the model a `flush` would
        leave, as the final evaluation does."""
        return self._weights_moved_by(self._all_unsent(dist))

    def _all_unsent(self, dist) -> list[tf.Tensor]:
        """Every replica's unsent updates, summed (one float32 all-reduce)."""
        return dist.sum_across_replicas([tf.identity(r) for r in self.residuals])

    @contextlib.contextmanager
    def _weights_moved_by(self, deltas):
        """The weights plus `deltas` inside the block; after it they are bit for bit what they
        were (copied back, not subtracted)."""
        shared = [tf.identity(w) for w in self.weights]
        for weight, delta in zip(self.weights, deltas):
            weight.assign_add(delta)
        try:
            yield
        finally:
            for weight, value in zip(self.weights, shared):
                weight.assign(value)

    def flush(self, dist):
        """Add every replica's unsent updates to the weights and empty the residuals (one
        float32 all-reduce), so the trained model holds every step taken."""
        for weight, total, residual in zip(self.weights, self._all_unsent(dist), self.residuals):
            weight.assign_add(total)
            residual.assign(tf.zeros_like(residual))

    def fraction_at(self, step):
        """The fraction sent at `step` (a Python number or a tensor)."""
        if not self.warmup:
            return self.fraction
        start = min(1.0, self.WARMUP_START * self.fraction)
        progress = tf.minimum(tf.cast(step, tf.float64) / self.warmup, 1.0) if tf.is_tensor(step) \
            else min(step / self.warmup, 1.0)
        return self.fraction * (start / self.fraction) ** (1.0 - progress)

    def kept(self, shape: Shape, step=0):
        """How many entries of a `shape` matrix are sent at `step`."""
        if tf.is_tensor(step):
            count = tf.cast(tf.math.ceil(self.fraction_at(step) * _size(shape)), tf.int32)
            return tf.clip_by_value(count, 1, _size(shape))
        return min(_size(shape), max(1, math.ceil(self.fraction_at(step) * _size(shape))))

    def reduce(self, grads, dist):
        corrected = self.corrected(grads)
        sparse = [i for i, g in enumerate(grads) if len(g.shape) >= 2]
        whole = [i for i, g in enumerate(grads) if len(g.shape) < 2]
        results = dict(zip(whole, dist.sum_across_replicas([corrected[i] for i in whole]) if whole else []))
        if sparse:
            sums = self._sparse_sum([corrected[i] for i in sparse], [self.residuals[i] for i in sparse], dist)
            results.update(zip(sparse, sums))
        return [results[i] for i in range(len(grads))]

    def _sparse_sum(self, tensors, residuals, dist) -> list[tf.Tensor]:
        flat = _flatten(tensors)  # indices run over all the matrices, end to end
        sizes = [_size(t.shape) for t in tensors]
        step = self.step if self.warmup else 0
        picked = tf.math.top_k(tf.abs(flat), sum(self.kept(t.shape, step) for t in tensors)).indices
        values = tf.gather(flat, picked)
        wire = tf.cast(values, tf.bfloat16)
        # What rounding to bfloat16 drops stays in the residual, like the entries not picked.
        unsent = tf.tensor_scatter_nd_update(flat, picked[:, tf.newaxis], values - tf.cast(wire, values.dtype))
        for residual, part in zip(residuals, tf.split(unsent, sizes)):
            residual.assign(tf.reshape(part, residual.shape))
        all_indices = dist.gather_across_replicas(picked)
        all_values = tf.cast(tf.reshape(_gathered_bfloat16(wire, dist), [-1]), values.dtype)
        # Adds in the order gathered (replica by replica): the same bits on every rank.
        total = tf.math.unsorted_segment_sum(all_values, tf.reshape(all_indices, [-1]), sum(sizes))
        return _unflatten(total, tensors)

    def wire_bytes(self, shapes, step: int = 0):
        # ENTRY_BYTES per entry sent from a matrix; vectors whole in float32.
        return sum(self.ENTRY_BYTES * self.kept(shape, step) if len(shape) >= 2 else 4 * _size(shape)
                   for shape in shapes)

    def mean_wire_bytes(self, shapes, steps):
        """Per step over the run, with the float32 all-reduce of the residuals at its end (`flush`)."""
        warm = min(self.warmup, steps)
        return (sum(self.wire_bytes(shapes, step) for step in range(1, warm + 1))
                + (steps - warm) * self.wire_bytes(shapes, self.warmup) + float32_bytes(shapes)) / steps


class PowerSGDCompression(_ErrorFeedback):
    """Rank-R PowerSGD: each matrix M (the gradient plus residual, as 2-D) is sent as
    P = M Q, summed, orthonormalised, then Q = M^T P, summed; the sum of the replicas' M is
    about P Q^T. Q is kept from the previous step (warm start), so one power iteration per
    step tracks the gradient's leading subspace. Tensors too small to gain (vectors, tiny
    matrices) ride uncompressed in the first all-reduce. Two all-reduces per step."""

    def __init__(self, rank: int):
        self.rank = rank
        self.spec = f"powersgd:{rank}"
        self.queries: list[tf.Variable | None] = []

    def matrix_view(self, shape: Shape) -> tuple[int, int] | None:
        """The squarest 2-D view of `shape` if rank-R factors of it are smaller, else None."""
        if len(shape) < 2:
            return None
        rows, cols = min(((_size(shape[:i]), _size(shape[i:])) for i in range(1, len(shape))), key=sum)
        worth_it = self.rank < min(rows, cols) and (rows + cols) * self.rank < rows * cols
        return (rows, cols) if worth_it else None

    def build(self, variables, dist, step=None):
        super().build(variables, dist, step)
        views = [self.matrix_view(v.shape) for v in variables]
        self.queries = [None if view is None else self._initial_query(index, view[1], v.dtype)
                        for index, (v, view) in enumerate(zip(variables, views))]

    def _initial_query(self, index: int, cols: int, dtype) -> tf.Variable:
        """Random, seeded by the tensor's index: every replica starts from the same Q with no
        collective, and reruns start from the same Q (deterministic runs stay deterministic)."""
        start = np.random.default_rng(index).standard_normal((cols, self.rank))
        return tf.Variable(tf.constant(start, dtype), trainable=False, name="powersgd_q")

    def reduce(self, grads, dist):
        corrected = self.corrected(grads)
        compressed = [i for i, q in enumerate(self.queries) if q is not None]
        plain = [i for i, q in enumerate(self.queries) if q is None]
        matrices = {i: tf.reshape(corrected[i], [-1, self.queries[i].shape[0]]) for i in compressed}
        summed = dist.sum_across_replicas([matrices[i] @ self.queries[i] for i in compressed]
                                          + [corrected[i] for i in plain])
        bases = [tf.linalg.qr(p)[0] for p in summed[:len(compressed)]]
        queries = dist.sum_across_replicas([tf.transpose(matrices[i]) @ p for i, p in zip(compressed, bases)])
        results = dict(zip(plain, summed[len(compressed):]))
        for i, p, q in zip(compressed, bases, queries):
            approx = p @ tf.transpose(q)
            # This replica's share of what was not sent: the residuals sum to sum(M) - P Q^T.
            self.residuals[i].assign(tf.reshape(matrices[i] - approx / dist.num_replicas, grads[i].shape))
            self.queries[i].assign(q)
            results[i] = tf.reshape(approx, grads[i].shape)
        return [results[i] for i in range(len(grads))]

    def wire_bytes(self, shapes):
        views = [(shape, self.matrix_view(shape)) for shape in shapes]
        return 4 * sum(_size(shape) if view is None else sum(view) * self.rank for shape, view in views)


def make_compressor(spec: str) -> Compressor:
    """The compressor `--compression=spec` names (see the module docstring); ConfigError if none."""
    name, _, arg = spec.partition(":")
    stateless = {"none": Compressor, "fp16": lambda: CastCompression(tf.float16), "bf16": Bfloat16Compression}
    try:
        if name in stateless and not arg:
            return stateless[name]()
        fraction, _, warmup = arg.partition(",warmup=")
        if name == "topk" and 0 < float(fraction) < 1 and (not warmup or int(warmup) >= 0):
            return TopKCompression(float(fraction), int(warmup or 0))
        if name == "powersgd" and int(arg) >= 1:
            return PowerSGDCompression(int(arg))
    except ValueError:
        pass
    raise ConfigError(f"--compression must be {SPEC_HELP}, got {spec!r}")
