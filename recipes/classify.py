"""Image classification with a residual ConvNet on Fashion-MNIST, data parallel.

Trains on the 60,000 Fashion-MNIST training images that Debian's dataset-fashion-mnist
installs and reports top-1 accuracy on the 10,000 test images, evaluated by all ranks together.

    horovodrun -np 2 python recipes/classify.py                 # minutes on 2 CPU cores
    horovodrun -np 2 python recipes/classify.py --compression=powersgd:4
    python recipes/classify.py --backend=mirrored               # one process, 2 logical CPU devices
    horovodrun -np 8 -H a:4,b:4 python recipes/classify.py --dataset=cifar10 --data_dir=/shared/tfds
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import keras
import numpy as np

from common import launch
from common.compression import make_compressor
from common.config import TrainConfig, flag
from common.data.images import DEFAULT_SOURCE_DIR, ImageData, load_images
from common.data.pipeline import sharded_batches
from common.errors import ConfigError
from common.loop import held_out_metrics, train
from common.models.convnet import ConvNetSize, build_convnet, loss_sums
from common.plans.data import WarmupCosine, make_train_step, scaled_lr
from common.state import variable_names


@dataclasses.dataclass(frozen=True)
class ClassifyConfig(TrainConfig):
    steps: int = flag(800, "optimizer steps to train")
    global_batch_size: int = flag(128, "images per optimizer step, over all ranks")
    lr: float = flag(2e-3, "peak learning rate")
    optimizer: str = flag("adam", "adam, or momentum (SGD with Nesterov momentum 0.9)", choices=("adam", "momentum"))
    warmup_steps: int = flag(50, "linear learning-rate warm-up steps")
    log_every: int = flag(50, "steps between metrics lines")
    checkpoint_every: int = flag(400, "steps between checkpoints; 0 = only at the end")
    widths: str = flag("32,64,128,256", "channels of each stage; each stage after the first halves the resolution")
    blocks: int = flag(1, "residual blocks per stage")
    groups: int = flag(8, "GroupNorm groups (must divide every width)")
    max_test: int = flag(0, "test images evaluated; 0 = all")
    source_dir: str = flag(DEFAULT_SOURCE_DIR, "the Debian Fashion-MNIST files the embedded data is made from")

    DEBUG = {"steps": 20, "global_batch_size": 16, "log_every": 1, "checkpoint_every": 10, "warmup_steps": 5,
             "widths": "8,16", "groups": 4, "max_test": 200}

    def stage_widths(self) -> tuple[int, ...]:
        try:
            widths = tuple(int(w) for w in self.widths.split(","))
        except ValueError:
            widths = ()
        if not widths or min(widths) <= 0:
            raise ConfigError(f"--widths takes positive channel counts separated by commas, got {self.widths!r}")
        return widths

    def validate(self):
        super().validate()
        if self.max_test < 0:
            raise ConfigError(f"--max_test must be >= 0, got {self.max_test}")
        if self.blocks <= 0 or self.groups <= 0:
            raise ConfigError(f"--blocks and --groups must be positive, got {self.blocks} and {self.groups}")
        uneven = [w for w in self.stage_widths() if w % self.groups]
        if uneven:
            raise ConfigError(f"--groups={self.groups} does not divide the widths {uneven}: "
                              "pick --groups dividing every --widths entry")

    def model_size(self, data: ImageData) -> ConvNetSize:
        return ConvNetSize(tuple(data.train_images.shape[1:]), len(data.class_names), self.stage_widths(),
                           self.blocks, self.groups)


def evaluate(run, model: keras.Model, data: ImageData, max_test: int) -> dict:
    """Top-1 accuracy and mean loss on the test split ("test_accuracy", "test_loss"), scored by
    all ranks together."""
    count = len(data.test_labels) if not max_test else min(max_test, len(data.test_labels))
    scores = held_out_metrics(run.dist, model, loss_sums, (data.test_images[:count], data.test_labels[:count]))
    return {**scores, "test_images": count}


def load_trained(out_dir: str) -> tuple[keras.Model, list[str]]:
    """The exported model of a finished run, on one process, and its class names."""
    out = Path(out_dir)
    saved = json.loads((out / "config.json").read_text())
    cfg = ClassifyConfig(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(ClassifyConfig)}})
    images = json.loads((out / "images.json").read_text())
    class_names = images["class_names"]
    model = build_convnet(ConvNetSize(tuple(images["image_shape"]), len(class_names), cfg.stage_widths(),
                                      cfg.blocks, cfg.groups))
    with np.load(out / "model.npz") as weights:
        for name, v in zip(variable_names(model.variables), model.variables):
            v.assign(weights[name])
    return model, class_names


# -------------------------------------------------------------------------------------- main
@launch.guarded
def main():
    run = launch.start(ClassifyConfig, "classify", axes=("data",))
    cfg, dist = run.config, run.dist
    data = load_images(data_dir=run.data_dir, dataset=cfg.dataset or None, debug=cfg.debug,
                       source_dir=cfg.source_dir)
    with dist.model_scope(cfg.seed):
        model = build_convnet(cfg.model_size(data))
        peak = scaled_lr(cfg.lr, cfg.global_batch_size, cfg.lr_reference_batch, cfg.lr_scaling)
        schedule = WarmupCosine(peak, cfg.warmup_steps, cfg.steps)
        optimizer = (keras.optimizers.Adam(schedule) if cfg.optimizer == "adam" else
                     keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True))
    train_step = make_train_step(dist, model, optimizer, loss_sums, cfg.accum_steps, make_compressor(cfg.compression),
                                 cfg.clip_norm)

    def make_batches(start_step):
        # Horovod: each process reads its interleaved shard of the same shuffled stream.
        return sharded_batches((data.train_images, data.train_labels), batch_size=run.process_batch_size,
                               num_shards=dist.input_shards, shard_index=dist.coords["data"],
                               seed=cfg.seed, skip_batches=start_step)

    def export(out_dir, weights):
        np.savez(out_dir / "model.npz", **weights)  # reload with load_trained()
        images = {"image_shape": list(data.train_images.shape[1:]), "class_names": data.class_names}
        (out_dir / "images.json").write_text(json.dumps(images) + "\n")

    summary = train(cfg, dist, model=model, optimizer=optimizer, train_step=train_step,
                    make_batches=make_batches, evaluate=lambda: evaluate(run, model, data, cfg.max_test),
                    export=export, out_dir=run.out_dir)
    if dist.is_chief:
        print(f"test accuracy = {summary['test_accuracy']:.4f} on {summary['test_images']} test images "
              f"({summary['world_size']} replicas, final loss {summary['final_loss']:.4f})")


if __name__ == "__main__":
    main()
