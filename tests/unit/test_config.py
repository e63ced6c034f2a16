import dataclasses

import pytest

from common.api import check_elastic
from common.config import TrainConfig, flag, help_text, parse
from common.errors import ConfigError
from common.mesh import parse_plan


@dataclasses.dataclass(frozen=True)
class ToyConfig(TrainConfig):
    width: int = flag(8, "model width")
    DEBUG = {"steps": 3, "width": 2}


def test_defaults_and_typed_values():
    config = parse(ToyConfig, ["--steps=5", "--lr", "0.5", "--deterministic", "--width=16"])
    assert (config.steps, config.lr, config.deterministic, config.width) == (5, 0.5, True, 16)
    assert config.global_batch_size == 64


def test_debug_overrides_defaults_but_not_explicit_flags():
    config = parse(ToyConfig, ["--debug", "--width=4"])
    assert (config.debug, config.steps, config.width) == (True, 3, 4)


def test_boolean_spellings():
    assert parse(ToyConfig, ["--resume=false"]).resume is False
    assert parse(ToyConfig, ["--resume", "--debug"]).resume is True
    with pytest.raises(ConfigError, match="true or false"):
        parse(ToyConfig, ["--resume=maybe"])


@pytest.mark.parametrize("argv, message", [
    (["--stepz=3"], "unknown flag --stepz"),
    (["--steps=three"], "--steps takes a int"),
    (["--steps=0"], "--steps must be positive"),
    (["--backend=tpu"], "--backend must be one of horovod, mirrored"),
    (["steps=3"], "flags look like --key=value"),
    (["--steps"], "--steps needs a value"),
])
def test_bad_input_is_one_clear_error(argv, message):
    with pytest.raises(ConfigError) as error:
        parse(ToyConfig, argv)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse(ToyConfig, []).steps = 3


def test_help_lists_every_flag():
    text = help_text(ToyConfig)
    for field in dataclasses.fields(ToyConfig):
        assert f"--{field.name}=" in text


@pytest.mark.parametrize("flags, elastic_launch, message", [
    (["--elastic"], False, "needs --elastic: pass both or neither"),
    ([], True, "needs --elastic: pass both or neither"),
    (["--elastic", "--plan=tensor=2"], True, "drop tensor and pipeline"),
    (["--elastic", "--compression=topk:0.01"], True, "--compression=none, fp16 or bf16"),
])
def test_elastic_runs_need_the_elastic_launcher_a_data_plan_and_no_per_replica_state(
        flags, elastic_launch, message, monkeypatch):
    monkeypatch.setenv("HOROVOD_ELASTIC", "1" if elastic_launch else "0")
    config = parse(TrainConfig, flags)
    with pytest.raises(ConfigError, match=message):
        check_elastic(config, parse_plan(config.plan))


def test_an_elastic_run_on_a_data_plan_passes(monkeypatch):
    monkeypatch.setenv("HOROVOD_ELASTIC", "1")
    config = parse(TrainConfig, ["--elastic", "--compression=fp16"])
    check_elastic(config, parse_plan(config.plan))
