import keras
import numpy as np
import pytest

from common.data.pipeline import shard_rows, sharded_batches, unshard_rows
from common.optimizers import WarmupCosine, build_slots, scaled_lr
from tests.unit.one_process import ONE_PROCESS


def test_lr_scaling_depends_on_the_global_batch_only():
    assert scaled_lr(0.1, 256, 64, "none") == 0.1
    assert scaled_lr(0.1, 256, 64, "linear") == pytest.approx(0.4)
    assert scaled_lr(0.1, 256, 64, "sqrt") == pytest.approx(0.2)


def test_warmup_then_cosine_decay():
    schedule = WarmupCosine(1.0, warmup_steps=4, total_steps=14, final_fraction=0.1)
    values = [float(schedule(step)) for step in range(16)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[4] == pytest.approx(1.0)
    assert values[9] == pytest.approx(0.55)
    assert values[14] == pytest.approx(0.1) and values[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


@pytest.mark.parametrize("num_shards", [2, 4])
def test_shards_together_make_the_single_process_batches(num_shards):
    rows = np.arange(40).reshape(20, 2)
    labels = np.arange(20)
    whole = sharded_batches((rows, labels), batch_size=8, num_shards=1, shard_index=0, seed=3)
    parts = [sharded_batches((rows, labels), batch_size=8 // num_shards, num_shards=num_shards,
                             shard_index=i, seed=3) for i in range(num_shards)]
    for _ in range(7):  # crosses epoch boundaries
        expected = sorted(next(whole)[1].numpy().tolist())
        got = sorted(sum((next(p)[1].numpy().tolist() for p in parts), []))
        assert got == expected


def test_skip_resumes_the_same_stream():
    rows = np.arange(30)
    stream = sharded_batches((rows,), batch_size=4, num_shards=1, shard_index=0, seed=1)
    batches = [next(stream)[0].numpy().tolist() for _ in range(10)]
    resumed = sharded_batches((rows,), batch_size=4, num_shards=1, shard_index=0, seed=1, skip_batches=6)
    assert next(resumed)[0].numpy().tolist() == batches[6]


def test_unshard_inverts_shard():
    rows = list("abcdefghij")
    assert unshard_rows([shard_rows(rows, 3, i) for i in range(3)]) == rows


def test_build_slots_returns_each_kind_in_the_weights_order_and_splits_slots_like_their_weights():
    from common.plans.tensor import mark_split, split_axis
    weights = [mark_split(keras.Variable(np.zeros((2, 3)), name="split"), 1), keras.Variable(np.zeros(4), name="whole")]
    optimizer = keras.optimizers.Adam(0.1)
    slots = build_slots(optimizer, weights, ONE_PROCESS)
    assert sorted(slots) == ["momentum", "velocity"]
    for kind in slots:
        assert [tuple(v.shape) for v in slots[kind]] == [(2, 3), (4,)]
        assert [split_axis(v) for v in slots[kind]] == [1, None]
    assert "add_variable_from_reference" not in vars(optimizer)  # Keras' own method again
    with pytest.raises(ValueError, match="not been built"):
        build_slots(optimizer, weights, ONE_PROCESS)
