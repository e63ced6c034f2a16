"""Image classification with a residual ConvNet (or ResNet-20) on Fashion-MNIST, data parallel.

Trains on the 60,000 Fashion-MNIST training images that Debian's dataset-fashion-mnist
installs and reports top-1 accuracy on the 10,000 test images, evaluated by all ranks together.
With GroupNorm (the default) the project's own step trains it; with batch norm (--norm=batch:
each replica's statistics, TensorFlow's fused kernel; --norm=sync_batch: the global batch's),
or with --fit, Keras `model.fit` does, through the Horovod drop-in `common.hvd` (`common.fit`).

    horovodrun -np 2 python recipes/classify.py                 # minutes on 2 CPU cores
    horovodrun -np 2 python recipes/classify.py --compression=powersgd:4
    horovodrun -np 2 python recipes/classify.py --model=resnet20 --norm=sync_batch   # model.fit
    python recipes/classify.py --backend=mirrored               # one process, 2 logical CPU devices
    horovodrun -np 8 -H a:4,b:4 python recipes/classify.py --dataset=cifar10 --data_dir=/shared/tfds
    horovodrun -np 2 python recipes/classify.py --predict=images/     # label PNG/JPEG files with the run in --out_dir
"""
from __future__ import annotations

import dataclasses

from common.config import TrainConfig, flag, parse_or_exit
from common.data.images import DEFAULT_SOURCE_DIR
from common.errors import ConfigError, RecipeError
from common.startup import load_tensorflow


# ResNet-20 of He et al. (2016) for small images, as a shape of the ConvNet: three stages of
# three basic blocks, 16, 32 and 64 channels (with 1x1 projection shortcuts where the shape changes).
RESNET20 = {"widths": (16, 32, 64), "blocks": 3}


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
    model: str = flag("convnet", "convnet (shaped by --widths and --blocks) or resnet20 (ResNet-20: 16, 32, 64 "
                      "channels, 3 blocks a stage)", choices=("convnet", "resnet20"))
    norm: str = flag("group", "group (GroupNorm), batch (each replica's batch statistics, TensorFlow's fused "
                     "kernel) or sync_batch (the global batch's statistics); batch norms train with --fit",
                     choices=("group", "batch", "sync_batch"))
    fit: bool = flag(False, "train through Keras model.fit and common.hvd (always with --norm=batch or sync_batch)")
    max_test: int = flag(0, "test images evaluated; 0 = all")
    source_dir: str = flag(DEFAULT_SOURCE_DIR, "the Debian Fashion-MNIST files the embedded data is made from")
    predict: str = flag("", "label this image file, or the PNG and JPEG files of this folder, with the finished run "
                        "in --out_dir instead of training; the chief prints path, class and probability a line")
    predict_batch: int = flag(256, "--predict: images each replica labels at a time; 0 = all of its share")

    DEBUG = {"steps": 20, "global_batch_size": 16, "log_every": 1, "checkpoint_every": 10, "warmup_steps": 5,
             "widths": "8,16", "groups": 4, "max_test": 200}

    @property
    def uses_fit(self) -> bool:
        return self.fit or self.norm != "group"

    def stage_widths(self) -> tuple[int, ...]:
        if self.model == "resnet20":
            return RESNET20["widths"]
        try:
            widths = tuple(int(w) for w in self.widths.split(","))
        except ValueError:
            widths = ()
        if not widths or min(widths) <= 0:
            raise ConfigError(f"--widths takes positive channel counts separated by commas, got {self.widths!r}")
        return widths

    def validate(self):
        super().validate()
        if self.max_test < 0 or self.predict_batch < 0:
            raise ConfigError(f"--max_test and --predict_batch must be >= 0, got {self.max_test} and "
                              f"{self.predict_batch}")
        if self.blocks <= 0 or self.groups <= 0:
            raise ConfigError(f"--blocks and --groups must be positive, got {self.blocks} and {self.groups}")
        uneven = [w for w in self.stage_widths() if w % self.groups]
        if uneven:
            raise ConfigError(f"--groups={self.groups} does not divide the widths {uneven}: "
                              "pick --groups dividing every --widths entry")
        if self.uses_fit:
            self.check_fit()

    def check_fit(self):
        """model.fit runs in windows of --log_every steps (Keras epochs; common.fit) and
        implements the data plan on Horovod, with fp16 compression at most."""
        unsupported = {"--backend=mirrored": self.backend != "horovod", "--elastic": self.elastic,
                       "--accum_steps": self.accum_steps != 1, "--allreduce=per_tensor": self.allreduce != "grouped",
                       f"--compression={self.compression}": self.compression not in ("none", "fp16")}
        given = [name for name, is_set in unsupported.items() if is_set]
        if given:
            raise ConfigError(f"model.fit (--fit, --norm={self.norm}) does not implement {', '.join(given)}: "
                              "drop it, or train with --norm=group and no --fit")
        uneven = [f"--{name}={getattr(self, name)}" for name in ("steps", "checkpoint_every", "eval_every")
                  if getattr(self, name) % self.log_every]
        if uneven:
            raise ConfigError(f"model.fit logs, checkpoints and evaluates every --log_every={self.log_every} "
                              f"steps: make {', '.join(uneven)} a multiple of it")


if __name__ == "__main__":
    parse_or_exit(ClassifyConfig)  # a bad flag fails here, in a moment, before TensorFlow loads
    load_tensorflow()  # without its start-up lines

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from common import api, fit, inference  # noqa: E402
from common.data.images import load_images  # noqa: E402
from common.export import export_classifier  # noqa: E402
from common.models.convnet import ConvNetSize, build_convnet, loss_sums  # noqa: E402


def model_size(cfg: ClassifyConfig, image_shape, num_classes: int, norm: str | None = None) -> ConvNetSize:
    blocks = RESNET20["blocks"] if cfg.model == "resnet20" else cfg.blocks
    return ConvNetSize(tuple(image_shape), num_classes, cfg.stage_widths(), blocks, cfg.groups, norm or cfg.norm)


def load_trained(out_dir: str):
    """The exported model of a finished run, on one process, and its class names (a
    sync_batch run's weights in a "batch" model: inference reads the moving statistics alone)."""
    cfg = api.load_saved(ClassifyConfig, out_dir)
    images = json.loads((Path(out_dir) / "images.json").read_text())
    norm = "batch" if cfg.norm == "sync_batch" else cfg.norm
    model = build_convnet(model_size(cfg, images["image_shape"], len(images["class_names"]), norm))
    api.load_weights(model, Path(out_dir) / "model.npz")
    return model, images["class_names"]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def image_files(path: str) -> list[str]:
    """[path] for an image file; the PNG and JPEG files of a folder, sorted."""
    target = Path(path)
    if target.is_file():
        return [path]
    if not target.is_dir():
        raise RecipeError(f"--predict: {path} does not exist: pass an image file or a folder of PNG or JPEG files")
    files = sorted(str(child) for child in target.iterdir() if child.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RecipeError(f"--predict: no PNG or JPEG files (.png, .jpg, .jpeg) in {path}: "
                          "pass a folder that holds some")
    return files


def image_array(path: str, shape) -> np.ndarray:
    """uint8 [height, width, channels] of an image file, as the training images are: its colours
    converted to their channels, resized (bilinear, rounded) only where its size differs; the
    model does the scaling to [0, 1] itself."""
    try:
        image = tf.io.decode_image(tf.io.read_file(path), channels=shape[2], expand_animations=False)
    except tf.errors.OpError:
        raise RecipeError(f"--predict: {path} is not a PNG or JPEG image TensorFlow can decode: "
                          "pass PNG or JPEG files") from None
    if tuple(image.shape[:2]) != tuple(shape[:2]):
        image = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(image, shape[:2])), 0, 255), tf.uint8)
    return image.numpy()


def predict(run) -> None:
    """--predict: the finished run in --out_dir labels the image files, each replica its share;
    the chief prints `path<TAB>class<TAB>probability` a line, in sorted path order."""
    out_dir = inference.finished_run(run.dist, run.out_dir)
    files, error = [], None
    try:
        files = image_files(run.config.predict)
    except RecipeError as failure:
        error = str(failure)
    run.dist.raise_any(error)
    model, class_names = load_trained(str(out_dir))
    shape = model.input_shape[1:]

    def label(paths):
        probabilities = tf.nn.softmax(model(np.stack([image_array(p, shape) for p in paths]), training=False)).numpy()
        return [(class_names[best], float(row[best])) for row, best in zip(probabilities, probabilities.argmax(-1))]

    labels = inference.predictions(run.dist, label, files, run.config.predict_batch, "images")
    if run.dist.is_chief:
        for path, (name, probability) in zip(files, labels):
            print(f"{path}\t{name}\t{probability:.4f}")


@api.guarded
def main():
    run = api.start(ClassifyConfig, "classify")  # data parallel: the ConvNet's layers are Keras' own
    cfg = run.config
    if cfg.predict:
        return predict(run)
    data = load_images(data_dir=run.data_dir, dataset=cfg.dataset or None, debug=cfg.debug,
                       source_dir=cfg.source_dir)
    with run.model_scope():
        model = build_convnet(model_size(cfg, data.train_images.shape[1:], len(data.class_names)), run.dist.data)
        optimizer = api.make_optimizer(cfg, cfg.optimizer)
    count = min(cfg.max_test or len(data.test_labels), len(data.test_labels))
    test_set = (data.test_images[:count], data.test_labels[:count])

    def export(out_dir):  # beside model.npz (reload both with load_trained()), and saved_model/ for serving
        images = {"image_shape": list(data.train_images.shape[1:]), "class_names": data.class_names}
        (out_dir / "images.json").write_text(json.dumps(images) + "\n")
        export_classifier(out_dir, load_trained(str(out_dir))[0], images["image_shape"])

    def evaluate():
        return {**api.held_out_metrics(run.dist, model, loss_sums, test_set), "test_images": count}

    train_data = (data.train_images, data.train_labels)
    if cfg.uses_fit:
        summary = fit.train(run, model, optimizer, train_data, evaluate=evaluate, export=export, metrics=["accuracy"],
                            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    else:
        step = api.make_step(run, model, optimizer, loss_sums)
        summary = api.train(run, model, optimizer, step, train_data, export=export, evaluate=evaluate)
    if run.dist.is_chief:
        print(f"test accuracy = {summary['test_accuracy']:.4f} on {summary['test_images']} test images "
              f"({summary['world_size']} replicas, final loss {summary['final_loss']:.4f})")


if __name__ == "__main__":
    main()
