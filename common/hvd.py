"""Horovod's TF2 and Keras API on Keras 3: `import common.hvd as hvd` in place of
`import horovod.tensorflow.keras as hvd` (or `horovod.tensorflow`) is the one change a Horovod
TF2 script needs. Built on `common.dist` (the one module that talks to Horovod), on the plain
data plan: every process is a replica of the model.

What differs from Horovod's own modules, and why:
- `DistributedOptimizer` returns an optimizer of the wrapped one's class (made from its
  config, as Horovod does) whose `apply()` (what `model.fit`'s train step and
  `apply_gradients` call) averages the gradients in one grouped all-reduce first. Sparse
  gradients (`tf.IndexedSlices`) are summed as dense tensors, as with `sparse_as_dense=True`.
- `BroadcastGlobalVariablesCallback` broadcasts before the first step, not after it: Keras 3
  builds the model and its optimizer before `on_train_begin`, so every rank's first step
  starts from the root's weights and optimizer slots.
- Keras 3 optimizers compile their momentum into the step as a constant, so the learning-rate
  callbacks cannot apply Horovod's momentum correction; they warn once when asked to.
- `elastic.UpdateBatchStateCallback` records the batch, but a Keras 3 epoch cannot be
  shortened from a callback: an epoch resumed after a reset runs all its steps.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import warnings
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from common import dist as dist_lib
from common.errors import RecipeError

# Reduction ops, as Horovod names them.
Average, Sum, Adasum, Min, Max, Product = "average", "sum", "adasum", "min", "max", "product"


class HvdError(RecipeError, ValueError):
    """A call this module cannot serve; the message names the fix."""


_world: dist_lib.Dist | None = None


def init() -> None:
    """Start Horovod on every process (call once, first; again does nothing), and pin one GPU
    per process by local rank where there are GPUs."""
    global _world
    if _world is None:
        _world = dist_lib.init_for_script()


def init_from(started: dist_lib.Dist) -> None:
    """Work in a job `common.dist.init` already started (a recipe's), on its data group."""
    global _world
    if started.backend != "horovod":
        raise HvdError(f"common.hvd runs on Horovod processes, not --backend={started.backend}: "
                       "pass --backend=horovod")
    _world = started


def is_initialized() -> bool:
    return _world is not None


def _dist() -> dist_lib.Dist:
    if _world is None:
        raise HvdError("Horovod is not started: call hvd.init() first, at the top of the script")
    return _world


def _group() -> dist_lib.Group:
    return _dist().data


def size() -> int:
    return _dist().num_processes


def rank() -> int:
    return _dist().process_rank


def local_rank() -> int:
    return _dist().local_rank


def local_size() -> int:
    _dist()
    return dist_lib.host_layout()[0]


def cross_rank() -> int:
    _dist()
    return dist_lib.host_layout()[1]


def cross_size() -> int:
    _dist()
    return dist_lib.host_layout()[2]


# ------------------------------------------------------------------ compression
class Compressor:
    """Full precision: what is sent is the tensor itself."""

    @staticmethod
    def compress(tensor: tf.Tensor) -> tuple[tf.Tensor, Any]:
        return tensor, None

    @staticmethod
    def decompress(tensor: tf.Tensor, ctx: Any) -> tf.Tensor:
        return tensor


NoneCompressor = Compressor


class FP16Compressor(Compressor):
    """Floating-point tensors cross the wire as float16 and come back in their own dtype."""

    @staticmethod
    def compress(tensor: tf.Tensor) -> tuple[tf.Tensor, Any]:
        if tensor.dtype.is_floating:
            return tf.cast(tensor, tf.float16), tensor.dtype
        return tensor, None

    @staticmethod
    def decompress(tensor: tf.Tensor, ctx: Any) -> tf.Tensor:
        return tf.cast(tensor, ctx) if ctx is not None else tensor


class Compression:
    none = NoneCompressor
    fp16 = FP16Compressor


# ------------------------------------------------------------------ collectives
def _op_of(average: bool | None, op: str | None) -> str:
    """Horovod's `average=` (deprecated) or `op=`; Average when neither is given."""
    if average is not None and op is not None:
        raise HvdError("pass op= only (average= is Horovod's deprecated spelling of op=hvd.Average)")
    if average is not None:
        return Average if average else Sum
    op = op or Average
    if op == Adasum:
        raise HvdError("op=hvd.Adasum is not supported here: use op=hvd.Average or op=hvd.Sum")
    if op not in (Average, Sum, Min, Max, Product):
        raise HvdError(f"op={op!r} is not a Horovod reduction: use hvd.Average, hvd.Sum, hvd.Min, hvd.Max "
                       "or hvd.Product")
    return op


def _sum_over_world(tensors: Sequence[tf.Tensor], op: str, compression: type[Compressor] = Compressor,
                    predivide: float = 1.0, name: str | None = None) -> list[tf.Tensor]:
    """`tensors` summed (op Sum) or averaged (op Average) over every process, in one grouped
    all-reduce of what `compression` sends; Average divides by `predivide` before sending and by
    size/`predivide` after. Sparse tensors are summed dense."""
    if not tensors:
        return []
    group = _group()
    dense = [tf.convert_to_tensor(t) for t in tensors]
    if predivide != 1.0:
        dense = [t / predivide for t in dense]
    sent, contexts = zip(*(compression.compress(t) for t in dense))
    summed = [compression.decompress(s, c) for s, c in zip(group.sum(list(sent), name=name), contexts)]
    if op == Sum:
        return summed
    return [_divided(t, group.live_size(), predivide) for t in summed]


def _divided(total: tf.Tensor, count: tf.Tensor | int, predivide: float) -> tf.Tensor:
    if not total.dtype.is_floating:
        return tf.math.truncatediv(total, tf.cast(count, total.dtype))
    return total * (tf.constant(predivide, total.dtype) / tf.cast(count, total.dtype))


def allreduce(tensor: tf.Tensor, average: bool | None = None, compression: type[Compressor] = Compressor,
              op: str | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
              name: str | None = None) -> tf.Tensor:
    """`tensor` reduced over every process (Average by default), scaled by `prescale_factor`
    before and `postscale_factor` after."""
    op = _op_of(average, op)
    tensor = tf.convert_to_tensor(tensor)
    if prescale_factor != 1.0:
        tensor = tensor * tf.cast(prescale_factor, tensor.dtype)
    if op in (Min, Max, Product):
        reduced = _group().reduce(tensor, op)
    else:
        reduced = _sum_over_world([tensor], op, compression, name=name)[0]
    return reduced * tf.cast(postscale_factor, reduced.dtype) if postscale_factor != 1.0 else reduced


def grouped_allreduce(tensors: Sequence[tf.Tensor], average: bool | None = None,
                      compression: type[Compressor] = Compressor, op: str | None = None,
                      name: str | None = None) -> list[tf.Tensor]:
    """Each of `tensors` averaged (or summed) over every process, in one collective."""
    op = _op_of(average, op)
    if op not in (Average, Sum):
        return [_group().reduce(tf.convert_to_tensor(t), op) for t in tensors]
    return _sum_over_world(tensors, op, compression, name=name)


def allgather(tensor: tf.Tensor, name: str | None = None) -> tf.Tensor:
    """Every process's `tensor` concatenated along axis 0, in rank order."""
    return _group().gather(tf.convert_to_tensor(tensor))


def broadcast(tensor: tf.Tensor, root_rank: int, name: str | None = None) -> tf.Tensor:
    """Process `root_rank`'s `tensor` on every process."""
    tensor = tf.convert_to_tensor(tensor)
    if tensor.dtype == tf.bool:
        return tf.cast(_group().broadcast(tf.cast(tensor, tf.int8), root_rank), tf.bool)
    return _group().broadcast(tensor, root_rank)


def broadcast_variables(variables: Sequence[Any], root_rank: int) -> None:
    """Give every process the values of `variables` on `root_rank`, in one collective."""
    _group().broadcast_variables(list(variables), root_rank)


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None) -> Any:
    return _dist().broadcast_object(obj, root_rank)


def allgather_object(obj: Any, name: str | None = None) -> list[Any]:
    return _dist().gather_objects(obj)


# ------------------------------------------------------------------ optimizer and tape
@dataclasses.dataclass
class _Averaging:
    """How a DistributedOptimizer or DistributedGradientTape reduces its gradients."""

    compression: type[Compressor]
    op: str
    predivide: float
    local_variable_ids: set = dataclasses.field(default_factory=set)
    scale_local_gradients: bool = True

    def reduce(self, grads: Sequence[Any], variables: Sequence[Any]) -> list[Any]:
        """`grads` (None where a variable has none) reduced over the processes, in one
        collective; those of registered local variables stay this process's own (divided by
        the size if `scale_local_gradients`, as Horovod does)."""
        shared = [i for i, (g, v) in enumerate(zip(grads, variables))
                  if g is not None and id(v) not in self.local_variable_ids]
        reduced = list(grads)
        for i, value in zip(shared, _sum_over_world([grads[i] for i in shared], self.op, self.compression,
                                                    self.predivide)):
            reduced[i] = value
        if self.scale_local_gradients:
            for i, (g, v) in enumerate(zip(grads, variables)):
                if g is not None and id(v) in self.local_variable_ids:
                    reduced[i] = tf.convert_to_tensor(g) / tf.cast(_group().live_size(), g.dtype)
        return reduced


def _averaging(compression: type[Compressor], op: str | None, gradient_predivide_factor: float) -> _Averaging:
    op = _op_of(None, op)
    if op not in (Average, Sum):
        raise HvdError(f"gradients are averaged or summed: pass op=hvd.Average or op=hvd.Sum, not {op!r}")
    if gradient_predivide_factor != 1.0 and op != Average:
        raise HvdError("gradient_predivide_factor applies to op=hvd.Average only")
    _dist()
    return _Averaging(compression, op, gradient_predivide_factor)


class _DistributedApply:
    """Mixed in before a Keras 3 optimizer's class: `apply()` reduces the gradients over the
    processes first. With `backward_passes_per_step` N > 1, each call adds the gradients to
    this process's sums (optimizer variables, so checkpoints and broadcasts carry them, with
    `passes_counted`, the passes since the last update), and every N-th call reduces the sums (divided by N if `average_aggregated_gradients`) and
    applies them; `iterations` counts every call, as Horovod's does."""

    averaging: _Averaging
    backward_passes_per_step: int = 1
    average_aggregated_gradients: bool = False

    def register_local_var(self, variable: Any) -> None:
        """Keep `variable`'s gradient this process's own (no reduction)."""
        self.averaging.local_variable_ids.add(id(variable))

    def build(self, variables):
        super().build(variables)
        if self.backward_passes_per_step > 1:
            self.gradient_sums = [self.add_variable_from_reference(v, name="gradient_sum") for v in variables]
            self.gradient_sum_index = {id(v): index for index, v in enumerate(variables)}
            self.passes_counted = self.add_variable(shape=(), dtype="int64", name="passes_counted")

    def apply(self, grads, trainable_variables=None):
        if trainable_variables is None:
            raise HvdError("a DistributedOptimizer's apply() needs the variables: pass "
                           "apply(grads, trainable_variables) or apply_gradients(zip(grads, variables))")
        grads, variables = list(grads), list(trainable_variables)
        if self.backward_passes_per_step == 1:
            return super().apply(self.averaging.reduce(grads, variables), variables)
        if not self.built:
            self.build(variables)
        return self._accumulate(grads, variables, super().apply)

    def _accumulate(self, grads, variables, apply_reduced: Callable) -> None:
        sums = [self.gradient_sums[self.gradient_sum_index[id(v)]] for v in variables]
        for gradient_sum, grad in zip(sums, grads):
            if grad is not None:
                gradient_sum.assign_add(tf.convert_to_tensor(grad))
        self.passes_counted.assign_add(1)
        scale = 1.0 / self.backward_passes_per_step if self.average_aggregated_gradients else 1.0

        def reduce_and_apply():
            summed = [tf.convert_to_tensor(s) * tf.constant(scale, s.dtype) for s in sums]
            apply_reduced(self.averaging.reduce(summed, variables), variables)
            for gradient_sum in sums:
                gradient_sum.assign(tf.zeros_like(gradient_sum))
            self.passes_counted.assign(0)

        def count_the_pass():
            self.iterations.assign_add(1)

        tf.cond(self.passes_counted == self.backward_passes_per_step, reduce_and_apply, count_the_pass)


def DistributedOptimizer(optimizer: keras.optimizers.Optimizer, name: str | None = None,
                         compression: type[Compressor] = Compressor, sparse_as_dense: bool = False,
                         gradient_predivide_factor: float = 1.0, op: str | None = Average,
                         backward_passes_per_step: int = 1, average_aggregated_gradients: bool = False,
                         scale_local_gradients: bool = True) -> keras.optimizers.Optimizer:
    """A new optimizer of `optimizer`'s class and config whose `apply()` averages the gradients
    over the processes (see `_DistributedApply`). `sparse_as_dense` is accepted for Horovod's
    signature: sparse gradients are always reduced dense here."""
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise HvdError(f"hvd.DistributedOptimizer wraps a Keras 3 optimizer, not {type(optimizer).__module__}."
                       f"{type(optimizer).__qualname__}: build it from keras.optimizers (e.g. "
                       "keras.optimizers.Adam(learning_rate=...)), not tf_keras or a legacy optimizer")
    if backward_passes_per_step < 1:
        raise HvdError(f"backward_passes_per_step must be 1 or more, not {backward_passes_per_step}")
    averaging = _averaging(compression, op, gradient_predivide_factor)
    averaging.scale_local_gradients = scale_local_gradients
    base = type(optimizer)
    distributed = type(base.__name__, (_DistributedApply, base), {
        "__module__": base.__module__, "averaging": averaging,
        "backward_passes_per_step": backward_passes_per_step,
        "average_aggregated_gradients": average_aggregated_gradients})
    config = optimizer.get_config()
    if name:
        config["name"] = name
    return distributed.from_config(config)


class DistributedGradientTape:
    """A `tf.GradientTape` whose `gradient()` averages the gradients over the processes, in one
    collective; everything else is the tape's."""

    def __init__(self, gradtape: tf.GradientTape, compression: type[Compressor] = Compressor,
                 sparse_as_dense: bool = False, op: str | None = Average, gradient_predivide_factor: float = 1.0):
        self.tape = gradtape
        self.averaging = _averaging(compression, op, gradient_predivide_factor)

    def register_local_source(self, source: Any) -> None:
        """Keep `source`'s gradient this process's own (no reduction)."""
        self.averaging.local_variable_ids.add(id(source))

    def gradient(self, target, sources, output_gradients=None, **kwargs):
        grads = self.tape.gradient(target, sources, output_gradients=output_gradients, **kwargs)
        flat_sources, flat_grads = tf.nest.flatten(sources), tf.nest.flatten(grads, expand_composites=False)
        return tf.nest.pack_sequence_as(grads, self.averaging.reduce(flat_grads, flat_sources))

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.tape, attribute)

    def __enter__(self):
        self.tape.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self.tape.__exit__(*exc_info)


def SyncBatchNormalization(**kwargs) -> keras.layers.Layer:
    """Batch normalisation whose statistics are those of the global batch (every process's)."""
    try:
        from common.models.norm import SyncBatchNormalization as layer
    except ImportError as error:
        raise HvdError(f"SyncBatchNormalization is not available ({error}): update the project") from None
    return layer(group=_group(), **kwargs)


# ------------------------------------------------------------------ callbacks
def _model_and_optimizer_variables(model: keras.Model, optimizer: keras.optimizers.Optimizer | None) -> list:
    """The model's variables and its optimizer's, the optimizer built first (its slots exist
    only then) so that every process holds the same list."""
    if optimizer is None:
        return list(model.variables)
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    return list(model.variables) + list(optimizer.variables)


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Give every process `root_rank`'s model and optimizer variables (but `local_variables`)
    before the first step of the first `fit`; if the model is not built by then (a subclassed
    model fit on data Keras cannot trace ahead), after the first batch."""

    def __init__(self, root_rank: int, device: str = "", local_variables: Sequence[Any] = ()):
        super().__init__()
        self.root_rank = root_rank
        self.local_variable_ids = {id(v) for v in local_variables}
        self.broadcast_done = False

    def broadcast(self) -> None:
        variables = _model_and_optimizer_variables(self.model, self.model.optimizer)
        broadcast_variables([v for v in variables if id(v) not in self.local_variable_ids], self.root_rank)
        self.broadcast_done = True

    def on_train_begin(self, logs=None):
        if not self.broadcast_done and self.model.built:
            self.broadcast()

    def on_train_batch_end(self, batch, logs=None):
        if not self.broadcast_done:
            self.broadcast()


class MetricAverageCallback(keras.callbacks.Callback):
    """At each epoch's end, the logged metrics averaged over the processes (one collective, in
    the order of the names), in place: the callbacks after this one, the progress bar and the
    history see the global figures on every process."""

    def on_epoch_end(self, epoch, logs=None):
        if not logs:
            return
        names = sorted(logs)
        values = tf.constant([float(np.asarray(logs[n])) for n in names], tf.float64)
        for metric, value in zip(names, allreduce(values, op=Average).numpy()):
            logs[metric] = float(value)


def _learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class LearningRateScheduleCallback(keras.callbacks.Callback):
    """From epoch `start_epoch` until `end_epoch`, learning rate = `initial_lr` x
    `multiplier(epoch)` (a number m: m ** (epoch - start_epoch)); set at each epoch's first
    batch if `staircase`, else at every batch with a fractional epoch (epoch + batch /
    steps_per_epoch). Logs `lr` at each epoch's end."""

    def __init__(self, initial_lr: float, multiplier: float | Callable[[float], float], start_epoch: int = 0,
                 end_epoch: int | None = None, staircase: bool = True, momentum_correction: bool = True,
                 steps_per_epoch: int | None = None):
        super().__init__()
        if initial_lr is None:
            raise HvdError("initial_lr is required (the learning rate already scaled by hvd.size())")
        self.initial_lr = initial_lr
        self.multiplier = multiplier if callable(multiplier) else (lambda epoch: multiplier ** (epoch - start_epoch))
        self.start_epoch, self.end_epoch, self.staircase = start_epoch, end_epoch, staircase
        self.momentum_correction = momentum_correction
        self.steps_per_epoch = steps_per_epoch
        self.current_epoch = 0

    def learning_rate_at(self, epoch: float) -> float:
        return self.initial_lr * self.multiplier(epoch)

    def on_train_begin(self, logs=None):
        if not self.staircase and not self.steps_per_epoch:
            self.steps_per_epoch = self.params.get("steps")
            if not self.steps_per_epoch:
                raise HvdError(f"{type(self).__name__} cannot tell the steps per epoch: pass "
                               "steps_per_epoch= to it or to fit()")
        if self.momentum_correction and getattr(self.model.optimizer, "momentum", 0):
            warnings.warn("Keras 3 compiles an optimizer's momentum into the step: no momentum correction")

    def on_epoch_begin(self, epoch, logs=None):
        self.current_epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        epoch = self.current_epoch
        if epoch < self.start_epoch or (self.end_epoch is not None and epoch >= self.end_epoch):
            return
        if self.staircase and batch == 0:
            self.model.optimizer.learning_rate = self.learning_rate_at(epoch)
        elif not self.staircase:
            self.model.optimizer.learning_rate = self.learning_rate_at(epoch + batch / self.steps_per_epoch)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = _learning_rate(self.model.optimizer)


class LearningRateWarmupCallback(LearningRateScheduleCallback):
    """Over the first `warmup_epochs`, the learning rate climbs from `initial_lr` / size to
    `initial_lr` (Goyal et al., 2017): `initial_lr` / size x (e x (size - 1) / warmup_epochs + 1)
    at fractional epoch e, counted at each batch's end."""

    def __init__(self, initial_lr: float, warmup_epochs: int = 5, momentum_correction: bool = True,
                 steps_per_epoch: int | None = None, verbose: int = 0):
        super().__init__(initial_lr, self.warmup_multiplier, start_epoch=0, end_epoch=warmup_epochs,
                         staircase=False, momentum_correction=momentum_correction,
                         steps_per_epoch=steps_per_epoch)
        self.warmup_epochs = warmup_epochs
        self.verbose = verbose

    def warmup_multiplier(self, epoch: float) -> float:
        epoch += 1.0 / self.steps_per_epoch
        return (epoch * (size() - 1) / self.warmup_epochs + 1) / size()

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if epoch == self.end_epoch - 1 and self.verbose > 0 and rank() == 0:
            print(f"\nEpoch {epoch + 1}: finished gradual learning rate warmup to "
                  f"{_learning_rate(self.model.optimizer):g}.")


callbacks = types.SimpleNamespace(
    BroadcastGlobalVariablesCallback=BroadcastGlobalVariablesCallback,
    MetricAverageCallback=MetricAverageCallback,
    LearningRateScheduleCallback=LearningRateScheduleCallback,
    LearningRateWarmupCallback=LearningRateWarmupCallback)


# ------------------------------------------------------------------ elastic
def KerasState(model: keras.Model, optimizer: keras.optimizers.Optimizer | None = None, **kwargs: Any) -> Any:
    """Horovod Elastic state of a Keras model, its optimizer (the compiled one by default) and
    picklable `kwargs` (attributes, e.g. epoch=0, batch=0): `commit()`, `restore()`, `sync()`
    and `register_reset_callbacks()` as Horovod's."""
    _dist()
    optimizer = optimizer or model.optimizer
    state = dist_lib.elastic_state(lambda: _model_and_optimizer_variables(model, optimizer), **kwargs)
    state.model, state.optimizer = model, optimizer
    return state


def run(func: Callable[..., Any]) -> Callable[..., Any]:
    """`func(state, ...)` under Horovod Elastic: run again from the last commit after a lost
    worker, from the synced state after hosts came or went; `size()` and `rank()` follow."""

    @functools.wraps(func)
    def elastic_func(state, *args, **kwargs):
        return dist_lib.elastic_runner(func, _set_world, True, 0)(state, *args, **kwargs)

    return elastic_func


def _set_world(new_world: dist_lib.Dist) -> None:
    global _world
    _world = new_world


class CommitStateCallback(keras.callbacks.Callback):
    """Commit `state` every `batches_per_commit` batches and at each epoch's end."""

    def __init__(self, state: Any, batches_per_commit: int = 1):
        super().__init__()
        self.state = state
        self.batches_per_commit = batches_per_commit
        self.batches_left = batches_per_commit

    def on_train_begin(self, logs=None):
        self.batches_left = self.batches_per_commit  # the same count on every rank after a reset

    def on_train_batch_end(self, batch, logs=None):
        self.batches_left -= 1
        if self.batches_left == 0:
            self.state.commit()
            self.batches_left = self.batches_per_commit

    def on_epoch_end(self, epoch, logs=None):
        self.state.commit()


class UpdateBatchStateCallback(keras.callbacks.Callback):
    """`state.batch`: the batch just done in this epoch, 0 at each epoch's end."""

    def __init__(self, state: Any):
        super().__init__()
        self.state = state

    def on_train_batch_end(self, batch, logs=None):
        self.state.batch = batch

    def on_epoch_end(self, epoch, logs=None):
        self.state.batch = 0


class UpdateEpochStateCallback(keras.callbacks.Callback):
    """`state.epoch`: the epochs done, counted across resets (fit counts from 0 each time)."""

    def __init__(self, state: Any):
        super().__init__()
        self.state = state
        self.initial_epoch = state.epoch

    def on_train_begin(self, logs=None):
        self.initial_epoch = self.state.epoch

    def on_epoch_end(self, epoch, logs=None):
        self.state.epoch = self.initial_epoch + epoch + 1


elastic = types.SimpleNamespace(
    KerasState=KerasState, TensorFlowKerasState=KerasState, run=run, CommitStateCallback=CommitStateCallback,
    UpdateBatchStateCallback=UpdateBatchStateCallback, UpdateEpochStateCallback=UpdateEpochStateCallback)
