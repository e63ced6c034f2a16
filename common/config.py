"""Recipe configuration: one frozen dataclass per recipe, set from `--key=value` flags.

Pure Python, so recipes check flags before TensorFlow loads. Every field is a flag with a type,
a default and a help line (`flag(...)`); `DEBUG` lists what `--debug` overrides (explicit
flags still win). A bad flag is a `ConfigError`, which `parse_or_exit` makes one line on
stderr and exit code 2, on every rank by itself, before any collective.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any, ClassVar, Sequence

from common.errors import ConfigError, exit_with

COMPRESSION_HELP = ("none, fp16, bf16, topk:F (0 < F < 1, e.g. topk:0.01), powersgd:R (R >= 1, e.g. powersgd:4), "
                    "or topk_updates:F (top-k of each replica's optimizer update, data plans)")


def flag(default: Any, help: str, choices: Sequence[Any] | None = None) -> Any:
    """A dataclass field that is also a command-line flag."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The flags every recipe shares (the recipe contract)."""

    steps: int = flag(200, "optimizer steps to train")
    global_batch_size: int = flag(64, "examples per optimizer step, summed over data-parallel ranks")
    lr: float = flag(1e-3, "peak learning rate at --lr_reference_batch examples per step")
    lr_scaling: str = flag("none", "scale --lr with the global batch: none, linear or sqrt",
                           choices=("none", "linear", "sqrt"))
    lr_reference_batch: int = flag(64, "global batch size at which --lr applies unscaled")
    warmup_steps: int = flag(20, "linear learning-rate warm-up steps")
    clip_norm: float = flag(1.0, "clip gradients to this global norm; 0 = no clipping")
    accum_steps: int = flag(1, "micro-batches accumulated per optimizer step on each rank")
    seed: int = flag(0, "random seed (weights, data order)")
    out_dir: str = flag("", "output folder (default runs/<recipe>)")
    dataset: str = flag("", "a prepared TFDS dataset name; empty: the recipe's embedded data")
    data_dir: str = flag("", "TFDS data folder (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    plan: str = flag("data", "parallel plan and its degrees, e.g. data")
    backend: str = flag("horovod", "horovod (processes) or mirrored (devices of one process)",
                        choices=("horovod", "mirrored"))
    mirrored_devices: int = flag(0, "mirrored: devices to use; 0 = all GPUs, or 2 logical CPUs")
    compression: str = flag("none", f"gradient compression on the wire: {COMPRESSION_HELP}")
    allreduce: str = flag("grouped", "horovod: each collective sum as one grouped all-reduce, or per_tensor: one "
                          "all-reduce per tensor (gradients: as each becomes ready)", choices=("grouped", "per_tensor"))
    intra_op_threads: int = flag(0, "TensorFlow intra-op threads per process; 0 = TF default")
    deterministic: bool = flag(False, "deterministic ops and no dropout: same losses for any plan")
    resume: bool = flag(False, "resume from the latest checkpoint in --out_dir")
    debug: bool = flag(False, "tiny model and data, for tests")
    log_every: int = flag(10, "steps between metrics lines")
    checkpoint_every: int = flag(100, "steps between checkpoints; 0 = only at the end")
    keep: int = flag(3, "checkpoints kept in --out_dir/checkpoints (the newest); older ones are deleted")
    eval_every: int = flag(0, "steps between evaluations; 0 = only at the end")
    elastic: bool = flag(False, "Horovod Elastic (horovodrun --min-np/--max-np or --host-discovery-script): "
                         "workers may leave and join; data plans only")
    commit_every: int = flag(10, "elastic: steps between in-memory commits, the point a reset goes back to")
    stall_timeout: int = flag(60, "seconds a rank may stay silent (frozen, cut off) or keep the others waiting in a "
                              "collective before the job ends with an error naming it (under --elastic, a "
                              "warning); 0 = never")

    DEBUG: ClassVar[dict[str, Any]] = {}

    def validate(self) -> None:
        """Checks that need no knowledge of the world size; recipes may extend it."""
        for name in ("steps", "global_batch_size", "lr_reference_batch", "accum_steps", "log_every", "keep",
                     "commit_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.clip_norm < 0:
            raise ConfigError(f"--clip_norm must be >= 0, got {self.clip_norm}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "intra_op_threads", "mirrored_devices",
                     "stall_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        parse_compression(self.compression)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TransformerConfig(TrainConfig):
    """The model flags of the Transformer recipes."""

    vocab_size: int = flag(4000, "subword vocabulary size")
    d_model: int = flag(128, "model width")
    heads: int = flag(4, "attention heads")
    layers: int = flag(2, "Transformer layers")
    ff_dim: int = flag(512, "feed-forward width")
    dropout: float = flag(0.1, "dropout rate (0 under --deterministic)")

    def validate(self):
        super().validate()
        if self.d_model % self.heads:
            raise ConfigError(f"--d_model={self.d_model} must be a multiple of --heads={self.heads}")


def parse_compression(spec: str) -> tuple[str, float | int | None]:
    """`--compression` as (codec name, its argument or None); ConfigError if it names none."""
    name, has_arg, arg = spec.partition(":")
    try:
        if name in ("none", "fp16", "bf16") and not has_arg:
            return name, None
        if name in ("topk", "topk_updates") and 0 < float(arg) < 1:
            return name, float(arg)
        if name == "powersgd" and int(arg) >= 1:
            return name, int(arg)
    except ValueError:
        pass
    raise ConfigError(f"--compression must be {COMPRESSION_HELP}; got {spec!r}")


def _convert(name: str, text: str, kind: type) -> Any:
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name} takes true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"--{name} takes a {kind.__name__}, got {text!r}") from None


def _split_flags(argv: Sequence[str], fields: dict[str, dataclasses.Field],
                 types: dict[str, type]) -> dict[str, str]:
    """`--k=v`, `--k v` and bare boolean `--k` into {name: text}."""
    given: dict[str, str] = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: flags look like --key=value")
        name, has_value, value = arg[2:].partition("=")
        if name not in fields:
            raise ConfigError(f"unknown flag --{name}; run with --help to list the flags")
        if not has_value:
            if types[name] is bool and (not args or args[0].startswith("--")):
                value = "true"
            elif args:
                value = args.pop(0)
            else:
                raise ConfigError(f"--{name} needs a value")
        given[name] = value
    return given


def parse(cls: type[TrainConfig], argv: Sequence[str]) -> TrainConfig:
    """Build `cls` from flags; raises ConfigError on anything it cannot take."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = typing.get_type_hints(cls)
    given = _split_flags(argv, fields, types)
    values = {name: _convert(name, text, types[name]) for name, text in given.items()}
    if values.get("debug"):
        values = {**cls.DEBUG, **values}
    for name, value in values.items():
        choices = fields[name].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"--{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    config = cls(**values)
    config.validate()
    return config


def help_text(cls: type[TrainConfig]) -> str:
    types = typing.get_type_hints(cls)
    lines = [f"flags of {cls.__name__} (--key=value):"]
    for f in dataclasses.fields(cls):
        lines.append(f"  --{f.name}={f.default!r:<12} {types[f.name].__name__:<5} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def load_saved(cls: type[TrainConfig], out_dir: str | Path) -> TrainConfig:
    """The config a finished run wrote to its config.json (keys `cls` does not know are left out)."""
    saved = json.loads((Path(out_dir) / "config.json").read_text())
    return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


def parse_or_exit(cls: type[TrainConfig], argv: Sequence[str] | None = None) -> TrainConfig:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text(cls))
        sys.exit(0)
    try:
        return parse(cls, argv)
    except ConfigError as error:
        exit_with(error)
