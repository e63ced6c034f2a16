"""common.hvd in one process: Horovod's API surface, its errors, the optimizer's accumulation
and the learning-rate callbacks' schedules (the formulas of Horovod's documentation)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import common.hvd as hvd
from common.dist import Dist, Group
from common.mesh import Mesh
from common.models import norm
from tests.unit.one_process import MIRRORED, ONE_PROCESS

HOROVOD_NAMES = ["init", "is_initialized", "size", "rank", "local_rank", "local_size", "cross_rank", "cross_size",
                 "Average", "Sum", "Min", "Max", "Product", "Adasum", "Compression", "DistributedOptimizer",
                 "DistributedGradientTape", "broadcast_variables", "allreduce", "grouped_allreduce", "allgather",
                 "broadcast", "broadcast_object", "allgather_object", "SyncBatchNormalization"]
CALLBACKS = ["BroadcastGlobalVariablesCallback", "MetricAverageCallback", "LearningRateWarmupCallback",
             "LearningRateScheduleCallback"]
ELASTIC = ["KerasState", "CommitStateCallback", "UpdateBatchStateCallback", "UpdateEpochStateCallback", "run"]


@pytest.fixture
def started(monkeypatch):
    """The module as `hvd.init()` leaves it in a job of one process."""
    monkeypatch.setattr(hvd, "_world", ONE_PROCESS)


@pytest.fixture
def not_started(monkeypatch):
    monkeypatch.setattr(hvd, "_world", None)


def world_of(size: int) -> Dist:
    """Rank 0's view of a job of `size` processes (for the schedules, which only ask the size)."""
    world = Group(tuple(range(size)), 0)
    return Dist("horovod", 0, size, 0, Mesh(size, 1, 1), world, Group((0,), 0), Group((0,), 0))


def test_the_names_horovod_scripts_use_are_there():
    missing = [name for name in HOROVOD_NAMES if not hasattr(hvd, name)]
    missing += [f"callbacks.{name}" for name in CALLBACKS if not hasattr(hvd.callbacks, name)]
    missing += [f"elastic.{name}" for name in ELASTIC if not hasattr(hvd.elastic, name)]
    assert not missing
    assert hvd.Compression.none and hvd.Compression.fp16


@pytest.mark.parametrize("call", [
    hvd.size, hvd.rank, hvd.local_rank, hvd.local_size,
    lambda: hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)),
    lambda: hvd.allreduce(tf.constant(1.0)),
    lambda: hvd.broadcast_variables([tf.Variable(1.0)], root_rank=0),
    lambda: hvd.callbacks.MetricAverageCallback().on_epoch_end(0, {"loss": 1.0}),
    lambda: hvd.SyncBatchNormalization(),
])
def test_every_call_before_init_names_hvd_init(not_started, call):
    with pytest.raises(hvd.HvdError, match=r"call hvd\.init\(\) first"):
        call()
    assert not hvd.is_initialized()


def test_init_from_takes_a_job_already_started_on_horovod(not_started):
    with pytest.raises(hvd.HvdError, match="pass --backend=horovod"):
        hvd.init_from(MIRRORED)
    hvd.init_from(ONE_PROCESS)
    assert hvd.is_initialized() and (hvd.size(), hvd.rank(), hvd.local_rank()) == (1, 0, 0)


@pytest.mark.parametrize("optimizer", [object(), tf.compat.v1.train.GradientDescentOptimizer(0.1), "adam"])
def test_distributed_optimizer_takes_keras_3_optimizers_only(started, optimizer):
    with pytest.raises(hvd.HvdError, match=r"wraps a Keras 3 optimizer.*keras\.optimizers"):
        hvd.DistributedOptimizer(optimizer)


@pytest.mark.parametrize("arguments, message", [
    ({"op": hvd.Adasum}, "Adasum is not supported"),
    ({"op": hvd.Max}, "averaged or summed"),
    ({"op": hvd.Sum, "gradient_predivide_factor": 2.0}, "op=hvd.Average only"),
    ({"backward_passes_per_step": 0}, "1 or more"),
])
def test_arguments_it_cannot_serve_are_one_clear_error(started, arguments, message):
    with pytest.raises(hvd.HvdError, match=message):
        hvd.DistributedOptimizer(keras.optimizers.SGD(0.1), **arguments)


def test_the_distributed_optimizer_is_still_its_class(started):
    adam = keras.optimizers.Adam(learning_rate=0.003, beta_1=0.8)
    wrapped = hvd.DistributedOptimizer(adam)
    assert isinstance(wrapped, keras.optimizers.Adam) and type(wrapped).__name__ == "Adam"
    assert wrapped.get_config() == adam.get_config()
    assert wrapped.from_config(wrapped.get_config()).get_config() == adam.get_config()
    assert float(wrapped.learning_rate) == pytest.approx(0.003)
    wrapped.learning_rate = 0.001
    assert float(wrapped.learning_rate) == pytest.approx(0.001)


@pytest.mark.parametrize("average_aggregated_gradients", [False, True])
@pytest.mark.parametrize("traced", [False, True])
def test_backward_passes_are_summed_and_applied_every_nth_call(started, average_aggregated_gradients, traced):
    """loss = 2x - y[0] (y[0] through tf.gather: a sparse gradient): SGD with learning rate 1
    moves x by -2 and y[0] by +1 per pass, applied at every third call, averaged if asked."""
    passes = 3
    optimizer = hvd.DistributedOptimizer(keras.optimizers.SGD(1.0), backward_passes_per_step=passes,
                                         average_aggregated_gradients=average_aggregated_gradients)
    x, y = tf.Variable([0.0]), tf.Variable([1.0, 2.0])

    def step():
        with tf.GradientTape() as tape:
            loss = 2.0 * x - tf.gather(y, [0])
        optimizer.apply_gradients(zip(tape.gradient(loss, [x, y]), [x, y]))

    step = tf.function(step) if traced else step
    scale = 1.0 if average_aggregated_gradients else passes
    for call in range(1, 8):
        step()
        updates = call // passes
        np.testing.assert_allclose(x.numpy(), [-2.0 * scale * updates])
        np.testing.assert_allclose(y.numpy(), [1.0 + scale * updates, 2.0])
        assert int(optimizer.iterations.numpy()) == call


def test_the_tape_gives_the_gradients_of_its_tape_in_their_structure(started):
    x, y, unused = tf.Variable(3.0), tf.Variable([1.0, 2.0]), tf.Variable(0.0)
    with tf.GradientTape() as tape:
        loss = x * x + tf.reduce_sum(y * y)
    grads = hvd.DistributedGradientTape(tape).gradient(loss, {"x": x, "pair": [y, unused]})
    assert float(grads["x"]) == 6.0 and grads["pair"][1] is None
    np.testing.assert_allclose(grads["pair"][0].numpy(), [2.0, 4.0])


def test_fp16_compression_sends_float16_and_gives_back_the_dtype():
    sent, dtype = hvd.Compression.fp16.compress(tf.constant([1.0, 2.5], tf.float32))
    assert sent.dtype == tf.float16
    assert hvd.Compression.fp16.decompress(sent, dtype).dtype == tf.float32
    counts, context = hvd.Compression.fp16.compress(tf.constant([3]))
    assert counts.dtype == tf.int32 and hvd.Compression.fp16.decompress(counts, context).dtype == tf.int32


def test_collectives_of_one_process_give_its_own_values(started):
    assert float(hvd.allreduce(tf.constant(4.0))) == 4.0
    assert float(hvd.allreduce(tf.constant(4.0), op=hvd.Sum, postscale_factor=0.5)) == 2.0
    assert hvd.allgather(tf.constant([[1, 2]])).numpy().tolist() == [[1, 2]]
    assert bool(hvd.broadcast(tf.constant(True), root_rank=0))
    assert hvd.broadcast_object({"a": 1}) == {"a": 1} and hvd.allgather_object(7) == [7]


def test_sync_batch_normalization_is_bound_to_the_world(started):
    layer = hvd.SyncBatchNormalization(momentum=0.9)
    assert isinstance(layer, norm.SyncBatchNormalization) and layer.group == ONE_PROCESS.data


class LearningRates(keras.callbacks.Callback):
    """The learning rate each batch runs with, as (epoch, batch, rate)."""

    def __init__(self):
        super().__init__()
        self.rates, self.epoch = [], 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append((self.epoch, batch, float(self.model.optimizer.learning_rate)))


def rates_in_fit(schedule: keras.callbacks.Callback, epochs: int = 4, steps: int = 4) -> list:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.5), loss="mse")
    recorder = LearningRates()
    history = model.fit(np.ones((steps * 2, 2)), np.ones((steps * 2, 1)), batch_size=2, epochs=epochs, verbose=0,
                        callbacks=[schedule, recorder])
    return recorder.rates, history.history["lr"]


def test_warmup_climbs_from_a_size_th_to_the_initial_rate(monkeypatch):
    """Horovod: lr = initial_lr / size * (e * (size - 1) / warmup_epochs + 1), e the epoch
    counted to the end of the batch (epoch + (batch + 1) / steps_per_epoch)."""
    size, warmup_epochs, steps = 4, 2, 4
    monkeypatch.setattr(hvd, "_world", world_of(size))
    rates, logged = rates_in_fit(hvd.callbacks.LearningRateWarmupCallback(0.8, warmup_epochs=warmup_epochs),
                                 steps=steps)
    for epoch, batch, rate in rates:
        if epoch < warmup_epochs:
            e = epoch + (batch + 1) / steps
            assert rate == pytest.approx(0.8 / size * (e * (size - 1) / warmup_epochs + 1))
        else:
            assert rate == pytest.approx(0.8)  # warmup done: the rate stays
    assert rates[0][2] == pytest.approx(0.8 / size * (1 + 0.25 * 3 / 2))
    assert logged[warmup_epochs - 1] == pytest.approx(0.8)


def test_staircase_schedule_multiplies_at_each_epoch_start(started):
    rates, logged = rates_in_fit(hvd.callbacks.LearningRateScheduleCallback(
        0.4, multiplier=0.5, start_epoch=1, end_epoch=3))
    # Before start_epoch the optimizer's own rate; from end_epoch on, the rate is left as it was.
    expected = {0: 0.5, 1: 0.4, 2: 0.2, 3: 0.2}
    assert [rate for _, _, rate in rates] == pytest.approx([expected[epoch] for epoch, _, _ in rates])
    assert logged == pytest.approx([0.5, 0.4, 0.2, 0.2])


def test_smooth_schedule_follows_the_fractional_epoch(started):
    schedule = hvd.callbacks.LearningRateScheduleCallback(1.0, multiplier=lambda epoch: 1.0 / (1.0 + epoch),
                                                          staircase=False)
    rates, _ = rates_in_fit(schedule, epochs=2, steps=4)
    for epoch, batch, rate in rates:
        assert rate == pytest.approx(1.0 / (1.0 + epoch + batch / 4))


def test_a_schedule_needs_its_initial_rate():
    with pytest.raises(hvd.HvdError, match="initial_lr is required"):
        hvd.callbacks.LearningRateScheduleCallback(None, multiplier=0.5)


def test_metric_average_of_one_process_keeps_the_values_as_floats(started):
    logs = {"loss": np.float32(0.25), "accuracy": tf.constant(0.5)}
    hvd.callbacks.MetricAverageCallback().on_epoch_end(0, logs)
    assert logs == {"loss": 0.25, "accuracy": 0.5}
