"""The parameter-server plan's parsing, TF_CONFIG checks and shard helpers (no cluster)."""
import json
import shutil
import socket
import time

import numpy as np
import pytest

from common.errors import ConfigError, RecipeError
from common.plans import ps, ps_cluster


def test_is_ps_plan():
    assert ps.is_ps_plan("ps") and ps.is_ps_plan("ps,workers=3,servers=1")
    assert not ps.is_ps_plan("data") and not ps.is_ps_plan("data=2,tensor=1") and not ps.is_ps_plan("pipeline=2")


def test_parse_ps_plan():
    assert ps.parse_ps_plan("ps") == ps.PSPlan(workers=2, servers=2)
    assert ps.parse_ps_plan("ps, workers=3 ,servers=1") == ps.PSPlan(workers=3, servers=1)
    assert ps.parse_ps_plan("ps,servers=4") == ps.PSPlan(workers=2, servers=4)


@pytest.mark.parametrize("text, message", [
    ("ps,workers=0", "workers must be at least 1"), ("ps,servers=-1", "servers must be at least 1"),
    ("ps,workers=two", "whole number"), ("ps,chiefs=1", "unknown or repeated 'chiefs'"),
    ("ps,workers=1,workers=2", "unknown or repeated 'workers'"), ("data", "not a parameter-server plan"),
])
def test_bad_ps_plan(text, message):
    with pytest.raises(ConfigError, match=message):
        ps.parse_ps_plan(text)


@pytest.mark.parametrize("flags, message", [
    (["--optimizer=adam"], "--optimizer=adam does not work with --plan=ps (the parameter servers apply Adagrad)"),
    (["--accum_steps=2"], "--accum_steps=2 does not work with --plan=ps"),
    (["--compression=fp16"], "--compression=fp16 does not work with --plan=ps"),
    (["--elastic"], "--elastic=true does not work with --plan=ps"),
    (["--backend=mirrored"], "--backend=mirrored does not work with --plan=ps"),
    (["--allreduce=per_tensor"], "--allreduce=per_tensor does not work with --plan=ps"),
    (["--deterministic"], "--deterministic=true does not work with --plan=ps (workers apply their steps "
                          "asynchronously"),
    (["--eval_every=10"], "--eval_every=10 does not work with --plan=ps"),
    (["--plan=ps,workers=0"], "workers must be at least 1"),
])
def test_recommend_rejects_flags_the_ps_plan_does_not_implement(flags, message):
    """The recipe itself, as a script with TensorFlow made unimportable: its flag parsing ends
    it first, with one error line and exit code 2."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    code = ("import runpy, sys\n"
            "sys.modules['tensorflow'] = None  # importing it raises ImportError\n"
            "sys.argv[0] = 'recipes/recommend.py'\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    plan = [] if any(flag.startswith("--plan") for flag in flags) else ["--plan=ps"]
    result = subprocess.run([sys.executable, "-c", code, *plan, *flags], cwd=root, capture_output=True, text=True,
                            env={"PYTHONPATH": str(root)}, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_ps_plan_takes_the_flags_it_implements():
    from common.config import TrainConfig, parse
    config = parse(TrainConfig, ["--plan=ps,workers=3", "--clip_norm=0.5", "--steps=5"])
    assert ps.check_ps_config(config) == ps.PSPlan(workers=3, servers=2)
    with pytest.raises(ConfigError, match="--deterministic=true does not work with --plan=ps"):
        ps.check_ps_config(parse(TrainConfig, ["--plan=ps", "--deterministic"]))


CLUSTER = {"chief": ["host0:2222"], "worker": ["host1:2222", "host2:2222"], "ps": ["host3:2222"]}


def tf_config(task_type="chief", index=0, cluster=CLUSTER):
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


def test_parse_tf_config():
    assert ps_cluster.parse_tf_config(tf_config()) == (CLUSTER, "chief", 0)
    assert ps_cluster.parse_tf_config(tf_config("ps", 0), role=None)[1:] == ("ps", 0)


@pytest.mark.parametrize("text, message", [
    ("{not json", "TF_CONFIG does not parse"), ('{"cluster": {}}', "TF_CONFIG does not parse"),
    (tf_config(cluster={"chief": ["h:1"], "worker": ["h:2"]}), "names no ps task"),
    (tf_config(cluster={**CLUSTER, "ps": ["host3"]}), "'host3' is not host:port"),
    (tf_config("worker", 5), "task worker:5 is not in its cluster"),
    (tf_config("worker", 1), "start workers and parameter servers with"),
])
def test_bad_tf_config(text, message):
    with pytest.raises(ConfigError, match=message):
        ps_cluster.parse_tf_config(text)


def test_wait_listening_names_the_silent_address():
    with socket.socket() as listening:
        listening.bind(("localhost", 0))
        listening.listen()
        alive = f"localhost:{listening.getsockname()[1]}"
        with socket.socket() as closed:
            closed.bind(("localhost", 0))  # bound, never listening: connections are refused
            silent = f"localhost:{closed.getsockname()[1]}"
            ps_cluster.wait_listening({"chief": [alive], "worker": [alive], "ps": [alive]}, seconds=1)
            started = time.monotonic()
            with pytest.raises(RecipeError, match=f"no server answers at {silent} \\(ps:1 in TF_CONFIG\\)"):
                ps_cluster.wait_listening({"chief": [alive], "worker": [alive], "ps": [alive, silent]}, seconds=1)
            assert time.monotonic() - started < 5


def local_processes(tmp_path, threads: int, workers: int = 1) -> ps_cluster.LocalProcesses:
    import portpicker
    spec = {job: [f"localhost:{portpicker.pick_unused_port()}" for _ in range(count)]
            for job, count in (("chief", 1), ("worker", workers), ("ps", 1))}
    return ps_cluster.LocalProcesses(spec, tmp_path, threads)


def failure_of(processes: ps_cluster.LocalProcesses, seconds: float = 60) -> str:
    """The error the chief's check raises, once the watcher has given up (within `seconds`)."""
    deadline = time.monotonic() + seconds
    while processes.failure is None and time.monotonic() < deadline:
        time.sleep(0.2)
    with pytest.raises(RecipeError) as raised:
        processes.check_servers()
    return str(raised.value)


def test_a_worker_that_keeps_exiting_at_start_ends_the_run(tmp_path):
    """Real server processes given an argument they refuse (they exit at once): the watcher
    starts the worker again twice, then gives up with the error the chief raises."""
    processes = local_processes(tmp_path, threads=-1)
    try:
        message = failure_of(processes)
        assert processes.restarts == ps_cluster.QUICK_EXITS - 1
    finally:
        processes.stop()
    assert message.startswith(f"worker:0 ({processes.spec['worker'][0]}) exited 3 times within"), message
    assert f"see {tmp_path / 'worker-0.log'}" in message and "takes only --intra_op_threads" in \
        (tmp_path / "worker-0.log").read_text()


def test_an_error_in_the_watcher_ends_the_run(tmp_path):
    processes = local_processes(tmp_path / "logs", threads=-1)
    try:
        shutil.rmtree(tmp_path / "logs")  # the restart cannot open the worker's log
        message = failure_of(processes)
    finally:
        processes.stop()
    assert message.startswith("the local cluster's watcher failed (FileNotFoundError: "), message


def test_shards_round_trip():
    import tensorflow as tf
    shards = [tf.Variable(np.zeros((3, 2), np.float32)), tf.Variable(np.zeros((2, 2), np.float32))]
    table = np.arange(10, dtype=np.float32).reshape(5, 2)
    ps.assign_full(shards, table)
    np.testing.assert_array_equal(shards[1].numpy(), table[3:])
    np.testing.assert_array_equal(ps.full_value(shards), table)
    whole = tf.Variable(np.zeros(4, np.float32))
    assert ps.shards_of(whole) == [whole]
    ps.assign_full([whole], np.ones(4, np.float32))
    np.testing.assert_array_equal(ps.full_value([whole]), np.ones(4))


def test_sharded_adagrad_matches_keras_adagrad():
    """The sparse update on two shards equals Keras's Adagrad on the whole table's dense gradient."""
    import keras
    import tensorflow as tf
    table = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    rows = tf.constant([0, 4, 4, 5])  # a repeated row, rows on both shards
    shards = [tf.Variable(table[:3]), tf.Variable(table[3:])]
    optimizer = ps.ShardedAdagrad(tf.distribute.get_strategy(), shards, lambda step: 0.5, clip_norm=0.0)
    reference = keras.Variable(table)
    keras_adagrad = keras.optimizers.Adagrad(0.5)
    for _ in range(3):
        with tf.GradientTape(persistent=True) as tape:
            # Each shard's gradient is tf.IndexedSlices of its looked-up rows, as under the strategy.
            loss = tf.reduce_sum(tf.square(tf.gather(shards[0], [0]))) + \
                tf.reduce_sum(tf.square(tf.gather(shards[1], [1, 1, 2])))
            reference_loss = tf.reduce_sum(tf.square(tf.gather(reference.value, rows)))
        optimizer.apply(tape.gradient(loss, shards))
        # Dense, as the data plan gives it (rows of the same index added, not squared apart).
        keras_adagrad.apply([tf.convert_to_tensor(tape.gradient(reference_loss, reference.value))], [reference])
    np.testing.assert_allclose(ps.full_value(shards), reference.numpy(), rtol=1e-6)
    assert int(optimizer.iterations.numpy()) == 3
