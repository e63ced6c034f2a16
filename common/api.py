"""The public API: train your own Keras 3 model with this project's plans.

    run = api.start(MyConfig, "my_task")                # flags, backend, mesh, folders
    with run.model_scope():                              # seeded; MirroredStrategy's scope
        model, optimizer = build_my_model(), api.make_optimizer(run.config)
    step = api.make_step(run, model, optimizer, loss_sums)
    api.train(run, model, optimizer, step, (x_train, y_train),
              evaluate=lambda: api.held_out_metrics(run.dist, model, loss_sums, (x_test, y_test)))

`loss_sums(model, batch, training)` returns (the sum of the per-example losses, the number of
examples or tokens, {metric: sum}): the plans divide by the *global* count, so N processes
train exactly like one. A user's config subclasses `TrainConfig` with `flag(...)` fields.
`examples/keras_model.py` is a complete script; README.md walks through it.
"""
from common import compressed_updates
from common.config import TrainConfig, check_flags, flag, load_saved
from common.evaluation import gathered_outputs, held_out_metrics
from common.launch import Run, guarded, start
from common.loop import train
from common.optimizers import make_optimizer
from common.plans import data, pipeline
from common.state import load_weights
from common.step import Step

__all__ = ["Run", "Step", "TrainConfig", "check_flags", "flag", "gathered_outputs", "guarded", "held_out_metrics",
           "load_saved", "load_weights", "make_optimizer", "make_step", "start", "train"]


def make_step(run: Run, model, optimizer, loss_sums) -> Step:
    """The training step of the run's plan: the pipeline schedule's when the plan has stages
    (`model` is then this rank's stage, `plans.pipeline.cut`), the data (x tensor) plan's
    otherwise, with each replica's optimizer update compressed under --compression=topk_updates."""
    if run.dist.pipeline.size > 1:
        return pipeline.make_train_step(run, model, optimizer, loss_sums)
    if compressed_updates.is_update_compression(run.config.compression):
        return compressed_updates.make_train_step(run, model, optimizer, loss_sums)
    return data.make_train_step(run, model, optimizer, loss_sums)
