"""The one module that talks to Horovod and tf.distribute. Two backends, one interface:
- `horovod` (default): processes (`horovodrun`, `mpirun`, `srun`; plain `python` is one) on a
  data x tensor x pipeline `Mesh`, a `Group` (Horovod process set) per axis: `dist.data`, ...;
- `mirrored`: MirroredStrategy over one process's GPUs, or N logical CPUs, data parallel only
  (a `ReplicaGroup`). A step is written for one replica; `run_step` runs it on each.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf

from common import watchdog
from common.errors import ConfigError, RecipeError
from common.mesh import AXES, Mesh, Plan, build_mesh
from common.startup import start_up_lines_dropped

Nest = Any


@dataclasses.dataclass(frozen=True)
class Group:
    """Some of the processes (a Horovod process set) and this process's index among them.
    Its collectives work in graph and eager mode; a group of one process does nothing."""

    ranks: tuple[int, ...]
    index: int
    process_set: Any = None
    grouped: bool = True  # sum() as one grouped all-reduce, or one all-reduce per tensor
    elastic: bool = False  # the world of an elastic job: its size changes while a traced step lives on

    @property
    def size(self) -> int:
        return len(self.ranks)

    def sum(self, tensors: Sequence[tf.Tensor], name: str | None = None) -> list[tf.Tensor]:
        """Element-wise sums over the group: one grouped all-reduce, fused into as few buffers
        as the fusion threshold allows; or, if not `grouped`, one all-reduce per tensor, each
        issued as soon as its tensor is ready. Horovod matches collectives across processes by
        name, by default the input's name in the graph: members that trace different graphs
        (pipeline stages) must pass the same `name`."""
        if self.size == 1 and not self.elastic:
            return list(tensors)
        import horovod.tensorflow as hvd
        if not self.grouped:
            return [hvd.allreduce(t, op=hvd.Sum, process_set=self.process_set,
                                  name=name and f"{name}_{index}") for index, t in enumerate(tensors)]
        return list(hvd.grouped_allreduce(list(tensors), op=hvd.Sum, process_set=self.process_set, name=name))

    def max(self, tensor: tf.Tensor) -> tf.Tensor:
        return self.reduce(tensor, "max")

    def reduce(self, tensor: tf.Tensor, op: str) -> tf.Tensor:
        """`tensor` reduced element-wise over the group by `op`: sum, min, max or product."""
        if self.size == 1 and not self.elastic:
            return tensor
        import horovod.tensorflow as hvd
        horovod_op = {"sum": hvd.Sum, "min": hvd.Min, "max": hvd.Max, "product": hvd.Product}[op]
        return hvd.allreduce(tensor, op=horovod_op, process_set=self.process_set)

    def live_size(self) -> tf.Tensor | int:
        """The group's size when a step runs: an elastic world's changes under a traced step."""
        if not self.elastic:
            return self.size
        import horovod.tensorflow as hvd
        return hvd.size_op()

    def gather(self, tensor: tf.Tensor) -> tf.Tensor:
        """The members' tensors concatenated along axis 0, in group order."""
        if self.size == 1:
            return tensor
        import horovod.tensorflow as hvd
        return hvd.allgather(tensor, process_set=self.process_set)

    def gather_rows(self, slices: Sequence[tf.IndexedSlices]) -> list[tf.IndexedSlices]:
        """Each of `slices` with every member's rows and indices, concatenated in group order:
        two grouped all-gathers (values, indices), whatever the row counts of each member."""
        if self.size == 1 and not self.elastic:
            return list(slices)
        import horovod.tensorflow as hvd
        values = hvd.grouped_allgather([s.values for s in slices], process_set=self.process_set)
        indices = hvd.grouped_allgather([s.indices for s in slices], process_set=self.process_set)
        return [tf.IndexedSlices(v, i, s.dense_shape) for v, i, s in zip(values, indices, slices)]

    def broadcast(self, tensor: tf.Tensor, root: int = 0) -> tf.Tensor:
        """Member `root`'s `tensor` on every member: a sum to which the others add zeros, one
        collective that means the same for any process set. Inside a tf.function the zeros
        wait for `tensor` (as constants they would be sent first, out of the step's order of
        collectives), and the collective is named (Horovod matches it by its input's name)."""
        if self.size == 1:
            return tensor
        if self.index != root:
            with tf.control_dependencies([tensor]):
                tensor = tf.zeros_like(tensor)
        return self.sum([tensor], name="broadcast")[0]

    def broadcast_variables(self, variables: Sequence[Any], root: int = 0) -> None:
        """Give the group the values of member `root` (the first by default). Inside a
        tf.function over every process: one Horovod broadcast per variable (`broadcast_each`).
        Elsewhere: one collective over a flat float64 buffer (exact for float32 values and
        integer counters alike)."""
        if self.size == 1 or not variables:
            return
        if not tf.executing_eagerly() and self.is_world():
            self.broadcast_each(variables, root)
            return
        flat = self.broadcast(tf.concat([tf.reshape(tf.cast(v, tf.float64), [-1]) for v in variables], 0), root)
        for v, part in zip(variables, tf.split(flat, [int(np.prod(v.shape)) for v in variables])):
            v.assign(tf.cast(tf.reshape(part, v.shape), v.dtype))

    def is_world(self) -> bool:
        import horovod.tensorflow as hvd
        return self.process_set is hvd.global_process_set

    def broadcast_each(self, variables: Sequence[Any], root: int) -> None:
        """Member `root`'s values of `variables`, one Horovod broadcast each, traced into the
        same graph on every rank: each reads its variable on every rank (the root's sum of
        zeros sent by the others had rank-dependent inputs, and the zeros' control edge,
        hung on constants, did not hold inside a tf.function, so a non-root rank sent a
        broadcast before the step's gradient all-reduce and the ranks stalled). The read
        waits for the step's earlier updates of its variable, and each broadcast has its
        own name (TF makes a repeated one unique in the graph, alike on every rank)."""
        import horovod.tensorflow as hvd
        for index, variable in enumerate(variables):
            value = hvd.broadcast(tf.convert_to_tensor(variable), root, name=f"broadcast_variable_{index}",
                                  process_set=self.process_set)
            variable.assign(value)


@dataclasses.dataclass(frozen=True)
class ReplicaGroup:
    """The replicas of a MirroredStrategy: devices of this one process. Sums run in the
    strategy's replica context; its variables are mirrored, so a broadcast has nothing to do."""

    size: int

    def sum(self, tensors: Sequence[tf.Tensor], name: str | None = None) -> list[tf.Tensor]:
        context = tf.distribute.get_replica_context()
        return list(context.all_reduce(tf.distribute.ReduceOp.SUM, list(tensors)))

    def broadcast_variables(self, variables: Sequence[Any], root: int = 0) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in the job: its mesh coordinates and its group along each axis."""

    backend: str
    process_rank: int
    num_processes: int
    local_rank: int
    mesh: Mesh
    data: Group | ReplicaGroup
    tensor: Group
    pipeline: Group
    strategy: tf.distribute.Strategy | None = None

    @property
    def is_chief(self) -> bool:
        return self.process_rank == 0

    @property
    def coords(self) -> dict[str, int]:
        """This process's place on the mesh (all zeros under mirrored)."""
        return self.mesh.coords(self.process_rank)

    @property
    def num_replicas(self) -> int:
        return self.data.size

    @property
    def input_shards(self) -> int:
        """Into how many shares the input stream is cut (one per data-parallel process)."""
        return self.mesh.data

    def scope(self):
        """Where models and optimizers are built (MirroredStrategy places variables there)."""
        return self.strategy.scope() if self.strategy else contextlib.nullcontext()

    def run_step(self, step_fn: Callable[[Nest], Nest], batch: Nest) -> Nest:
        """Run a per-replica step. `batch` is this process's share of the global batch;
        under `mirrored` it is split into one contiguous slice per device. Returns the first
        replica's outputs (the step reduces what must be global)."""
        if self.strategy is None:
            return step_fn(batch)
        count = self.data.size

        def replica_slice(context: tf.distribute.ValueContext) -> Nest:
            index = context.replica_id_in_sync_group
            return tf.nest.map_structure(lambda t: tf.split(t, count)[index], batch)

        per_replica = self.strategy.experimental_distribute_values_from_function(replica_slice)
        outputs = self.strategy.run(step_fn, args=(per_replica,))
        return tf.nest.map_structure(lambda v: self.strategy.experimental_local_results(v)[0], outputs)

    # ---------------------------------------------------------------- host-side, every process
    def raise_any(self, message: str | None) -> None:
        """Raise on every process the first error any process met (None: no error), so that no
        rank goes on to wait forever in a collective the failed one never joins."""
        message = next((m for m in self.gather_objects(message) if m), None)
        if message:
            raise RecipeError(message)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """Process `root`'s `obj` (picklable; the chief's by default) on every process."""
        if self.num_processes == 1:
            return obj
        import horovod.tensorflow as hvd
        return hvd.broadcast_object(obj, root_rank=root)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, on every process (host-side, picklable)."""
        if self.num_processes == 1:
            return [obj]
        import horovod.tensorflow as hvd
        return list(hvd.allgather_object(obj, name="gather_objects"))

    def gather_replica_objects(self, obj: Any) -> list[Any]:
        """One `obj` per data-parallel replica, in replica order, on every process: the
        tensor and pipeline peers of a replica hold the same one, so only its first counts."""
        parts = self.gather_objects((self.coords, obj))
        firsts = [(coords["data"], value) for coords, value in parts
                  if coords["tensor"] == 0 and coords["pipeline"] == 0]
        return [value for _, value in sorted(firsts, key=lambda part: part[0])]

    def barrier(self) -> None:
        if self.num_processes > 1:
            import horovod.tensorflow as hvd
            hvd.allreduce(tf.constant(0.0), op=hvd.Sum, name="barrier")


def configure_threads(intra_op_threads: int) -> None:
    """Before any TensorFlow work: as many inter-op as intra-op threads, so that a process
    given one thread uses one core (0 keeps TensorFlow's defaults)."""
    if intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(intra_op_threads)


def _init_horovod(plan: Plan, grouped_allreduce: bool, stall_timeout: int) -> Dist:
    _set_stall_limits(stall_timeout)
    # Open MPI busy-polls while a rank waits in a collective, on a core the TensorFlow threads
    # need (README: Benchmarks). Set before MPI starts (hvd.init); a user's value wins.
    os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    try:
        with start_up_lines_dropped():  # Horovod's library logs TensorFlow's start-up lines again
            import horovod.tensorflow as hvd
    except ImportError as error:
        raise RecipeError(f"Horovod is not installed ({error}): run scripts/setup.sh, "
                          "or pass --backend=mirrored") from None
    elastic = launched_elastic()
    if elastic:
        hvd.init()  # Horovod Elastic keeps the global process set only
    else:
        hvd.init(process_sets="dynamic")
    mesh = build_mesh(plan, hvd.size())
    if mesh.pipeline > 1 and not hvd.mpi_enabled():
        raise ConfigError("pipeline plans send activations over MPI: launch with mpirun or "
                          "horovodrun without --gloo")
    # Horovod: pin one GPU per process, by local rank.
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        gpu = gpus[hvd.local_rank() % len(gpus)]
        tf.config.experimental.set_memory_growth(gpu, True)
        tf.config.set_visible_devices(gpu, "GPU")
    dist = _horovod_dist(mesh, grouped_allreduce, elastic)
    watchdog.start(dist.process_rank, dist.num_processes, dist.gather_objects, stall_timeout, elastic)
    return dist


def _set_stall_limits(stall_timeout: int) -> None:
    """Before Horovod starts (a user's values win; `common.watchdog` says why): its stall
    inspector, checking every half timeout, ends the job when a live rank keeps the others
    waiting in a collective for `stall_timeout` seconds (MPI controller), and Gloo's operation
    timeout waits longer than the watchdog, whose message names the stalled rank. Not under
    elastic Horovod: there Gloo's timeout (30 s by default) is what ends the collectives of the
    survivors of a lost worker, so that they reset."""
    if stall_timeout <= 0:
        return
    os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(1, (stall_timeout + 1) // 2)))
    os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(stall_timeout))
    if not launched_elastic():
        os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(max(30, stall_timeout + 30)))


def _horovod_dist(mesh: Mesh, grouped_allreduce: bool, elastic: bool) -> Dist:
    import horovod.tensorflow as hvd
    groups = _process_sets(mesh, hvd.rank(), grouped_allreduce, elastic)
    return Dist("horovod", hvd.rank(), hvd.size(), hvd.local_rank(), mesh, **groups)


def _process_sets(mesh: Mesh, rank: int, grouped_allreduce: bool, elastic: bool) -> dict[str, Group]:
    """This rank's group along each axis: one process set per group, created in the same
    order on every rank (Horovod requires it)."""
    import horovod.tensorflow as hvd
    groups = {}
    for axis in AXES:
        for ranks in mesh.groups(axis):
            if len(ranks) == mesh.world_size:
                process_set = hvd.global_process_set
            elif len(ranks) > 1:
                process_set = hvd.add_process_set(list(ranks))
            else:
                process_set = None
            if rank in ranks:
                groups[axis] = Group(ranks, ranks.index(rank), process_set, grouped_allreduce,
                                     elastic and len(ranks) == mesh.world_size)
    return groups


def launched_elastic() -> bool:
    """Started by horovodrun in elastic mode (--min-np/--max-np, --host-discovery-script)."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


def _launched_by_mpi() -> bool:
    return any(key in os.environ for key in ("OMPI_COMM_WORLD_SIZE", "HOROVOD_SIZE", "PMI_SIZE"))


def _init_mirrored(plan: Plan, requested_devices: int) -> Dist:
    if _launched_by_mpi():
        raise ConfigError("--backend=mirrored runs in one process: start it with plain python, "
                          "not horovodrun/mpirun")
    if (plan.tensor, plan.pipeline) != (1, 1):
        raise ConfigError("tensor and pipeline plans run on Horovod processes: drop --backend=mirrored")
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        count = requested_devices or len(gpus)
        if count > len(gpus):
            raise ConfigError(f"--mirrored_devices={count} but this host has {len(gpus)} GPUs")
        devices = [f"/gpu:{i}" for i in range(count)]
    else:
        count = requested_devices or 2
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
        devices = [f"/cpu:{i}" for i in range(count)]
    alone = Group((0,), 0)
    return Dist("mirrored", 0, 1, 0, Mesh(1, 1, 1), ReplicaGroup(count), alone, alone,
                tf.distribute.MirroredStrategy(devices))


def init(backend: str, plan: Plan, *, seed: int, deterministic: bool, intra_op_threads: int = 0,
         mirrored_devices: int = 0, grouped_allreduce: bool = True, stall_timeout: int = 0) -> Dist:
    """Start the backend and lay the processes out on the plan's mesh; call once on every
    process, before any other TensorFlow work. `grouped_allreduce`: see `Group.sum`;
    `stall_timeout`: seconds after which a silent or stuck rank ends the job (`common.watchdog`;
    under elastic Horovod a silent one is warned of; 0 = never)."""
    configure_threads(intra_op_threads)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    dist = (_init_mirrored(plan, mirrored_devices) if backend == "mirrored"
            else _init_horovod(plan, grouped_allreduce, stall_timeout))
    # The same seed everywhere: equal data order on every rank (models reseed in Run.model_scope).
    import keras
    keras.utils.set_random_seed(seed)
    return dist


def init_for_script(stall_timeout: int = 0) -> Dist:
    """Start Horovod for a user's own script (`common.hvd`): the plain data plan over every
    process, GPUs pinned by local rank; threads, seeds and determinism stay the script's."""
    return _init_horovod(Plan(), True, stall_timeout)


def host_layout() -> tuple[int, int, int]:
    """(processes on this host, this host's index, hosts) of a started Horovod job."""
    import horovod.tensorflow as hvd
    return hvd.local_size(), hvd.cross_rank(), hvd.cross_size()


# ------------------------------------------------------------------ Horovod Elastic (Gloo)
def run_elastic(body: Callable[[Callable[[], None]], Any], variables: Sequence[Any],
                on_reset: Callable[[Dist], None], dist: Dist, stall_timeout: int) -> Any:
    """`body(commit)` under Horovod Elastic. `commit()` copies `variables` to host memory and
    asks the driver whether hosts came or went. When a worker is lost mid-step, the collective
    fails on every survivor: each takes back the last commit, Horovod forms a new ring, and
    `on_reset(new_dist)` runs; when hosts were added or removed (seen at a commit), the reset
    starts from that commit. Then rank 0 gives every worker (a new one too) its variables and
    `body` runs again from the restored step. The stall watchdog stops at a reset and watches
    the new ring after it; it warns of a silent peer rather than ending the job (a worker
    that freezes, rather than dies, Horovod Elastic waits for)."""
    state = elastic_state(lambda: variables)
    run = elastic_runner(lambda committed: body(committed.commit), on_reset, dist.data.grouped, stall_timeout)
    return run(state)


def elastic_state(variables: Callable[[], Sequence[Any]], **objects: Any) -> Any:
    """A Horovod Elastic state of `variables()` and of picklable `objects` (its attributes, e.g.
    epoch and batch): `commit()` saves both to host memory, a failure takes the last commit
    back, a sync gives every worker rank 0's. `variables` is called at each of these, so the
    list may grow (an optimizer's slots, once it is built) if it does so on every worker alike.

    The state is built here on the variables themselves: Horovod's Keras state fails on Keras 3
    variables, and its TensorFlow state broadcasts in eager mode only when it is built, so a
    worker that joins later would start from its own initial weights."""
    return _committed_variables_class()(variables, **objects)


@functools.lru_cache(maxsize=None)
def _committed_variables_class() -> type:
    import horovod.tensorflow as hvd
    from horovod.common.elastic import ObjectState

    class CommittedVariables(ObjectState):
        def __init__(self, variables: Callable[[], Sequence[Any]], **objects: Any):
            self.variables = variables
            super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank, **objects)
            self.save()

        def save(self):
            self.committed_values = [np.array(v) for v in self.variables()]
            super().save()

        def restore(self):
            for v, value in zip(self.variables(), self.committed_values):
                v.assign(value)
            super().restore()

        def sync(self):
            world = Group(tuple(range(hvd.size())), hvd.rank(), hvd.global_process_set, elastic=True)
            world.broadcast_variables(list(self.variables()))
            super().sync()
            self.save()

    return CommittedVariables


def elastic_runner(func: Callable[..., Any], on_reset: Callable[[Dist], None], grouped_allreduce: bool,
                   stall_timeout: int) -> Callable[..., Any]:
    """`func(state, ...)` run under Horovod Elastic (`state` from `elastic_state`), again from
    the restored or synced state after each reset; `on_reset(new_dist)` runs once the new ring
    is up, before the state's own reset callbacks."""
    import horovod.tensorflow as hvd
    from horovod.common.elastic import run_fn
    from horovod.common.exceptions import HorovodInternalError

    def func_failing_as_horovod(state, *args, **kwargs):
        try:
            return func(state, *args, **kwargs)
        except tf.errors.OpError as error:  # a collective that lost a peer
            if "horovod" not in str(error).lower():
                raise
            raise HorovodInternalError(error) from error

    def reset():
        watchdog.stop()  # before the ring re-forms, which may take longer than the timeout
        hvd.shutdown()
        hvd.init()
        new_dist = _horovod_dist(build_mesh(Plan(), hvd.size()), grouped_allreduce, True)
        # A collective: a worker that joins takes part in it as it starts (`init`).
        watchdog.start(new_dist.process_rank, new_dist.num_processes, new_dist.gather_objects, stall_timeout,
                       elastic=True)
        on_reset(new_dist)

    return run_fn(func_failing_as_horovod, reset)
