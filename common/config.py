"""Recipe configuration: one frozen dataclass per recipe, set from `--key=value` flags.

Every field is a flag with a type, a default and a one-line help (`flag(...)`). A recipe
subclasses `TrainConfig`, adds its own fields and may list `DEBUG` overrides that `--debug`
applies (flags given explicitly still win). An unknown flag or a bad value raises
`ConfigError`; `parse_or_exit` turns that into one line on stderr and exit code 2, which
every rank does on its own, before any collective, so no rank is left waiting.
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any, ClassVar, Sequence

from common.compression import SPEC_HELP, make_compressor
from common.errors import ConfigError, exit_with


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
    compression: str = flag("none", f"gradient compression on the wire: {SPEC_HELP}")
    allreduce: str = flag("grouped", "horovod: each collective sum as one grouped all-reduce, or per_tensor: one "
                          "all-reduce per tensor (gradients: as each becomes ready)", choices=("grouped", "per_tensor"))
    intra_op_threads: int = flag(0, "TensorFlow intra-op threads per process; 0 = TF default")
    deterministic: bool = flag(False, "deterministic ops and no dropout: same losses for any plan")
    resume: bool = flag(False, "resume from the latest checkpoint in --out_dir")
    debug: bool = flag(False, "tiny model and data, for tests")
    log_every: int = flag(10, "steps between metrics lines")
    checkpoint_every: int = flag(100, "steps between checkpoints; 0 = only at the end")
    eval_every: int = flag(0, "steps between evaluations; 0 = only at the end")

    DEBUG: ClassVar[dict[str, Any]] = {}

    def validate(self) -> None:
        """Checks that need no knowledge of the world size; recipes may extend it."""
        for name in ("steps", "global_batch_size", "lr_reference_batch", "accum_steps", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.clip_norm < 0:
            raise ConfigError(f"--clip_norm must be >= 0, got {self.clip_norm}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "intra_op_threads", "mirrored_devices"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        make_compressor(self.compression)  # raises on a bad spec

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def parse_or_exit(cls: type[TrainConfig], argv: Sequence[str] | None = None) -> TrainConfig:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text(cls))
        sys.exit(0)
    try:
        return parse(cls, argv)
    except ConfigError as error:
        exit_with(error)
