"""The one module that talks to Horovod and tf.distribute.

Two backends share one interface, so plans and the loop never ask which one runs:
- `horovod` (default): processes launched by `horovodrun`, `mpirun` or `srun` (plain `python`
  gives one process), laid out on a data x tensor x pipeline `Mesh`; each axis of it is a
  `Group` (a Horovod process set). Gradients travel with Horovod's fused ring all-reduce.
- `mirrored`: `tf.distribute.MirroredStrategy` over the devices of one process (its GPUs,
  or N logical CPU devices, which is how the tests run it); data parallelism only.

A training step is written for one replica and its share of the global batch; it calls
`sum_across_replicas` for the values that must be global. `run_step` runs it on every replica.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from common.errors import ConfigError, RecipeError
from common.plans.mesh import AXES, Mesh

Nest = Any


@dataclasses.dataclass(frozen=True)
class Group:
    """Some of the processes (a Horovod process set) and this process's index among them.
    Its collectives work in graph and eager mode; a group of one process does nothing."""

    ranks: tuple[int, ...]
    index: int
    process_set: Any = None
    grouped: bool = True  # sum() as one grouped all-reduce, or one all-reduce per tensor

    @property
    def size(self) -> int:
        return len(self.ranks)

    def sum(self, tensors: Sequence[tf.Tensor], name: str | None = None) -> list[tf.Tensor]:
        """Element-wise sums over the group: one grouped all-reduce, which starts once every
        tensor is ready and is fused into as few buffers as the fusion threshold allows; or,
        if not `grouped`, one all-reduce per tensor, each issued as soon as its tensor is ready
        (in a graph: while the backward pass goes on), fused with those that arrive within the
        same Horovod cycle.

        Horovod matches a collective across processes by name, by default derived from the
        input's name in the graph. Members that trace different graphs (pipeline stages)
        must pass the same `name`."""
        if self.size == 1:
            return list(tensors)
        import horovod.tensorflow as hvd
        if not self.grouped:
            return [hvd.allreduce(t, op=hvd.Sum, process_set=self.process_set,
                                  name=name and f"{name}_{index}") for index, t in enumerate(tensors)]
        return list(hvd.grouped_allreduce(list(tensors), op=hvd.Sum, process_set=self.process_set, name=name))

    def max(self, tensor: tf.Tensor) -> tf.Tensor:
        if self.size == 1:
            return tensor
        import horovod.tensorflow as hvd
        return hvd.allreduce(tensor, op=hvd.Max, process_set=self.process_set)

    def gather(self, tensor: tf.Tensor) -> tf.Tensor:
        """The members' tensors concatenated along axis 0, in group order."""
        if self.size == 1:
            return tensor
        import horovod.tensorflow as hvd
        return hvd.allgather(tensor, process_set=self.process_set)

    def broadcast_from_first(self, variables: Sequence[Any]) -> None:
        """Give the group the values of its first member, in one collective over a flat
        buffer (a sum to which the others add zeros: unambiguous for any process set)."""
        if self.size == 1 or not variables:
            return
        flat = tf.concat([tf.reshape(tf.cast(v, tf.float64), [-1]) for v in variables], axis=0)
        flat = self.sum([flat * (1.0 if self.index == 0 else 0.0)])[0]
        offset = 0
        for v in variables:
            size = int(np.prod(v.shape))
            v.assign(tf.cast(tf.reshape(flat[offset:offset + size], v.shape), v.dtype))
            offset += size


@dataclasses.dataclass(frozen=True)
class Dist:
    backend: str
    process_rank: int
    num_processes: int
    local_rank: int
    num_replicas: int                  # data-parallel replicas in the whole job
    mesh: Mesh | None = None           # horovod: the process grid
    groups: Mapping[str, Group] = dataclasses.field(default_factory=dict)  # horovod: this process's
    strategy: tf.distribute.Strategy | None = None
    _pending_sends: list = dataclasses.field(default_factory=list)

    @property
    def is_chief(self) -> bool:
        return self.process_rank == 0

    @property
    def coords(self) -> dict[str, int]:
        """This process's place on the mesh (all zeros under mirrored)."""
        return self.mesh.coords(self.process_rank) if self.mesh else dict.fromkeys(AXES, 0)

    @property
    def input_shards(self) -> int:
        """Into how many shares the input stream is cut (one per data-parallel process)."""
        return self.mesh.data if self.mesh else 1

    @property
    def replicas_per_process(self) -> int:
        return self.num_replicas // self.input_shards

    def scope(self):
        """Where models and optimizers are built (MirroredStrategy places variables there)."""
        return self.strategy.scope() if self.strategy else contextlib.nullcontext()

    @contextlib.contextmanager
    def model_scope(self, seed: int):
        """Build the model here: the seed is set on entry, so whatever ran before (data
        preparation draws random numbers too) cannot change the initial weights."""
        import keras
        keras.utils.set_random_seed(seed)
        with self.scope():
            yield

    def group(self, axis: str) -> Group:
        """This process's group along a mesh axis (a group of one under mirrored)."""
        return self.groups.get(axis) or Group((self.process_rank,), 0)

    # ---------------------------------------------------------------- in-graph collectives
    def sum_across_replicas(self, tensors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Element-wise sums over the data-parallel replicas, in one fused collective."""
        if self.num_replicas == 1:
            return list(tensors)
        if self.backend == "mirrored":
            context = tf.distribute.get_replica_context()
            return list(context.all_reduce(tf.distribute.ReduceOp.SUM, list(tensors)))
        return self.group("data").sum(tensors)

    def gather_across_replicas(self, tensor: tf.Tensor) -> tf.Tensor:
        """Every data-parallel replica's `tensor` (the same shape on each), stacked along a new
        first axis in replica order. Horovod backend only (its all-gather moves any bits)."""
        if self.backend != "horovod" and self.num_replicas > 1:
            raise ConfigError("gathering gradients across replicas needs --backend=horovod")
        return self.group("data").gather(tensor[tf.newaxis])

    def run_step(self, step_fn: Callable[[Nest], Nest], batch: Nest) -> Nest:
        """Run a per-replica step. `batch` is this process's share of the global batch;
        under `mirrored` it is split into one contiguous slice per device. Returns the first
        replica's outputs (the step reduces what must be global)."""
        if self.strategy is None:
            return step_fn(batch)
        count = self.replicas_per_process

        def replica_slice(context: tf.distribute.ValueContext) -> Nest:
            index = context.replica_id_in_sync_group
            return tf.nest.map_structure(lambda t: tf.split(t, count)[index], batch)

        per_replica = self.strategy.experimental_distribute_values_from_function(replica_slice)
        outputs = self.strategy.run(step_fn, args=(per_replica,))
        return tf.nest.map_structure(lambda v: self.strategy.experimental_local_results(v)[0], outputs)

    # ---------------------------------------------------------------- host-side helpers
    def broadcast_error(self, message: str | None) -> None:
        """Raise the chief's error on every process: for checks only the chief can make
        (it alone reads a checkpoint), so no other rank waits forever in a collective."""
        message = self.broadcast_object(message)
        if message:
            raise RecipeError(message)

    def broadcast_object(self, obj: Any) -> Any:
        """The chief's `obj` (picklable) on every process."""
        if self.backend == "horovod" and self.num_processes > 1:
            import horovod.tensorflow as hvd
            return hvd.broadcast_object(obj, root_rank=0)
        return obj

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, on every process (host-side, picklable)."""
        if self.backend == "horovod" and self.num_processes > 1:
            import horovod.tensorflow as hvd
            return list(hvd.allgather_object(obj, name="gather_objects"))
        return [obj]

    def barrier(self) -> None:
        if self.backend == "horovod" and self.num_processes > 1:
            import horovod.tensorflow as hvd
            hvd.allreduce(tf.constant(0.0), op=hvd.Sum, name="barrier")

    # ---------------------------------------------------------------- point-to-point (mpi4py)
    def send(self, array: np.ndarray, dest: int, tag: int) -> None:
        """Start sending `array` to process `dest`; `wait_sends` completes it. Non-blocking, so
        two stages that send to each other before receiving cannot deadlock."""
        from mpi4py import MPI
        array = np.ascontiguousarray(array)
        self._pending_sends.append((MPI.COMM_WORLD.Isend(array, dest=dest, tag=tag), array))

    def receive(self, shape, source: int, tag: int, dtype=np.float32) -> np.ndarray:
        from mpi4py import MPI
        buffer = np.empty(shape, dtype)
        MPI.COMM_WORLD.Recv(buffer, source=source, tag=tag)
        return buffer

    def wait_sends(self) -> None:
        from mpi4py import MPI
        MPI.Request.Waitall([request for request, _ in self._pending_sends])
        self._pending_sends.clear()

    def with_mesh(self, mesh: Mesh, grouped_allreduce: bool = True) -> "Dist":
        """Lay the processes out on `mesh`: one process set per group, created in the same
        order on every rank (Horovod requires it). Call on every rank. `grouped_allreduce`:
        see `Group.sum`."""
        if self.backend != "horovod":
            if (mesh.tensor, mesh.pipeline) != (1, 1):
                raise ConfigError("tensor and pipeline plans run on Horovod processes: "
                                  "drop --backend=mirrored")
            return self
        import horovod.tensorflow as hvd
        if mesh.pipeline > 1 and not hvd.mpi_enabled():
            raise ConfigError("pipeline plans send activations over MPI: launch with mpirun or "
                              "horovodrun without --gloo")
        groups = {}
        for axis in AXES:
            for ranks in mesh.groups(axis):
                if len(ranks) == self.num_processes:
                    process_set = hvd.global_process_set
                elif len(ranks) > 1:
                    process_set = hvd.add_process_set(list(ranks))
                else:
                    process_set = None
                if self.process_rank in ranks:
                    groups[axis] = Group(ranks, ranks.index(self.process_rank), process_set, grouped_allreduce)
        return dataclasses.replace(self, mesh=mesh, groups=groups, num_replicas=mesh.data)


def configure_threads(intra_op_threads: int) -> None:
    """Before any TensorFlow work: as many inter-op as intra-op threads, so that a process
    given one thread uses one core (0 keeps TensorFlow's defaults)."""
    if intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(intra_op_threads)


def _init_horovod() -> Dist:
    # Open MPI busy-polls while a rank waits in a collective, so Horovod's background thread
    # spins on a core the TensorFlow threads need. Yielding measured 1.3x the 2-process
    # throughput of translate on 2 cores. Set before MPI starts (hvd.init); a user's value wins.
    os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    try:
        import horovod.tensorflow as hvd
    except ImportError as error:
        raise RecipeError(f"Horovod is not installed ({error}): run scripts/setup.sh, "
                          "or pass --backend=mirrored") from None
    hvd.init(process_sets="dynamic")
    # Horovod: pin one GPU per process, by local rank.
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        gpu = gpus[hvd.local_rank() % len(gpus)]
        tf.config.experimental.set_memory_growth(gpu, True)
        tf.config.set_visible_devices(gpu, "GPU")
    return Dist("horovod", hvd.rank(), hvd.size(), hvd.local_rank(), hvd.size())


def _launched_by_mpi() -> bool:
    return any(key in os.environ for key in ("OMPI_COMM_WORLD_SIZE", "HOROVOD_SIZE", "PMI_SIZE"))


def _init_mirrored(requested_devices: int) -> Dist:
    if _launched_by_mpi():
        raise ConfigError("--backend=mirrored runs in one process: start it with plain python, "
                          "not horovodrun/mpirun")
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
    strategy = tf.distribute.MirroredStrategy(devices)
    return Dist("mirrored", 0, 1, 0, count, strategy=strategy)


def init(backend: str, *, seed: int, deterministic: bool, intra_op_threads: int = 0,
         mirrored_devices: int = 0) -> Dist:
    """Start the backend; call once, before any other TensorFlow work. Horovod processes
    then need `with_mesh` before any collective."""
    configure_threads(intra_op_threads)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    dist = _init_mirrored(mirrored_devices) if backend == "mirrored" else _init_horovod()
    # The same seed everywhere: equal data order on every rank (models reseed in model_scope).
    import keras
    keras.utils.set_random_seed(seed)
    return dist
