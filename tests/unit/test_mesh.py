import itertools
import random

import pytest

from common.errors import ConfigError
from common.mesh import (AXES, Mesh, Plan, build_mesh, check_batch_splits, check_divisible, parse_plan,
                               split_layers)


def config_error(call, *args, **kwargs) -> str:
    """The message of the ConfigError `call` raises, checked to be one line."""
    with pytest.raises(ConfigError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and message
    assert caught.value.exit_code == 2
    return message


# --- parse_plan -------------------------------------------------------------------------

@pytest.mark.parametrize("text, plan", [
    ("data", Plan()),
    ("data=2", Plan(data=2)),
    ("tensor=2", Plan(tensor=2)),
    ("pipeline=2,microbatches=8,schedule=1f1b", Plan(pipeline=2, microbatches=8, schedule="1f1b")),
    ("data=2,tensor=2", Plan(data=2, tensor=2)),
    ("data=2,pipeline=2", Plan(data=2, pipeline=2)),
    ("tensor=2,pipeline=2,recompute=true", Plan(tensor=2, pipeline=2, recompute=True)),
    ("data,tensor=4", Plan(tensor=4)),
    ("recompute", Plan(recompute=True)),
    ("recompute=FALSE", Plan()),
    (" data = 2 , tensor = 2 ", Plan(data=2, tensor=2)),
    ("order=dp-tp-pp,tensor=2", Plan(tensor=2, order="dp-tp-pp")),
])
def test_parse_plan(text, plan):
    assert parse_plan(text) == plan


@pytest.mark.parametrize("plan", [
    Plan(), Plan(data=4), Plan(tensor=2), Plan(data=2, tensor=2, pipeline=2),
    Plan(pipeline=4, microbatches=8, schedule="1f1b", recompute=True, order="pp-tp-dp"),
])
def test_text_round_trip(plan):
    assert parse_plan(str(plan)) == plan


def test_canonical_text_names_only_what_changed():
    assert str(Plan()) == "data"
    assert str(parse_plan("tensor=2,data=2")) == "data=2,tensor=2"
    assert str(parse_plan("pipeline=2,schedule=1f1b")) == "pipeline=2,schedule=1f1b"


@pytest.mark.parametrize("text, fix", [
    ("tensr=2",
     "unknown key 'tensr'; keys: data, tensor, pipeline, microbatches, schedule, recompute, order"),
    ("", "use e.g. --plan=data"),
    ("data,,tensor=2", "unknown key ''"),
    ("tensor", "tensor needs a value, e.g. tensor=2"),
    ("tensor=two", "tensor takes a positive integer, e.g. tensor=2; got 'two'"),
    ("tensor=1.5", "tensor takes a positive integer"),
    ("pipeline=0", "pipeline takes a positive integer, e.g. pipeline=2; got 0"),
    ("data=-1", "data takes a positive integer"),
    ("pipeline=2,microbatches=0", "microbatches takes a positive integer"),
    ("pipeline=2,schedule=interleaved", "schedule must be one of gpipe, 1f1b; got 'interleaved'"),
    ("recompute=maybe", "recompute takes true or false"),
    ("order=tp-dp", "order must name tp, pp and dp once each, e.g. order=tp-pp-dp"),
    ("order=tp-tp-dp", "order must name tp, pp and dp once each"),
    ("microbatches=8", "microbatches and schedule only apply to pipeline plans: add pipeline=2"),
    ("data=2,schedule=1f1b", "only apply to pipeline plans"),
    ("pipeline=1,microbatches=4", "only apply to pipeline plans"),
    ("tensor=2,tensor=4", "tensor is given twice; name each key once"),
])
def test_parse_plan_errors_name_the_fix(text, fix):
    message = config_error(parse_plan, text)
    assert message.startswith("--plan")
    assert fix in message


def test_plan_checks_values_built_in_code_too():
    assert "positive integer" in config_error(Plan, tensor=True)
    assert "schedule must be one of" in config_error(Plan, pipeline=2, schedule="GPipe")


# --- build_mesh --------------------------------------------------------------------------

def test_data_degree_fills_the_world():
    assert build_mesh(parse_plan("data"), 8) == Mesh(data=8, tensor=1, pipeline=1)
    assert build_mesh(parse_plan("tensor=2"), 8) == Mesh(data=4, tensor=2, pipeline=1)
    assert build_mesh(parse_plan("tensor=2,pipeline=2"), 8) == Mesh(data=2, tensor=2, pipeline=2)
    mesh = build_mesh(parse_plan("data=2,pipeline=4,order=pp-dp-tp"), 8)
    assert (mesh.data, mesh.tensor, mesh.pipeline, mesh.world_size, mesh.order) == (2, 1, 4, 8, "pp-dp-tp")


@pytest.mark.parametrize("text, world_size, expected", [
    ("tensor=3", 2, "--plan=tensor=3 needs a multiple of 3 processes (data x tensor x pipeline "
                    "= ? x 3 x 1), got 2: launch with -np 3 or change the degrees"),
    ("tensor=2", 5, "needs a multiple of 2 processes (data x tensor x pipeline = ? x 2 x 1), "
                    "got 5: launch with -np 4"),
    ("data=2,tensor=2", 8, "--plan=data=2,tensor=2 needs 4 processes (data x tensor x pipeline "
                           "= 2 x 2 x 1), got 8: launch with -np 4 or change the degrees"),
    ("data=4", 2, "needs 4 processes"),
    ("tensor=2,pipeline=2", 2, "needs a multiple of 4 processes"),
])
def test_world_size_mismatch(text, world_size, expected):
    assert expected in config_error(build_mesh, parse_plan(text), world_size)


def test_mesh_rejects_bad_inputs():
    with pytest.raises(ValueError):
        build_mesh(Plan(), 0)
    with pytest.raises(ValueError):
        Mesh(data=0, tensor=1, pipeline=1)
    mesh = Mesh(data=2, tensor=1, pipeline=1)
    with pytest.raises(ValueError, match="outside a world of 2"):
        mesh.coords(2)
    with pytest.raises(ValueError, match="unknown axis"):
        mesh.group("model", 0)


# --- groups ------------------------------------------------------------------------------

@pytest.fixture
def mesh_2x2x2():
    return build_mesh(parse_plan("data=2,tensor=2,pipeline=2"), 8)


def test_tp_pp_dp_layout(mesh_2x2x2):
    """tp varies fastest, then pp, then dp: rank = tensor + 2 * pipeline + 4 * data."""
    assert mesh_2x2x2.groups("tensor") == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert mesh_2x2x2.groups("pipeline") == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert mesh_2x2x2.groups("data") == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert mesh_2x2x2.coords(6) == {"data": 1, "tensor": 0, "pipeline": 1}
    assert mesh_2x2x2.group("tensor", 5) == (4, 5)


def test_order_changes_which_axis_is_consecutive():
    mesh = build_mesh(parse_plan("data=2,tensor=2,pipeline=2,order=dp-tp-pp"), 8)
    assert mesh.groups("data") == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert mesh.groups("tensor") == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert mesh.groups("pipeline") == [(0, 4), (1, 5), (2, 6), (3, 7)]


MESHES = [Mesh(2, 2, 2), Mesh(1, 1, 1), Mesh(3, 2, 1), Mesh(2, 1, 4, "pp-dp-tp"),
          Mesh(1, 3, 2, "dp-pp-tp"), Mesh(4, 2, 3, "pp-tp-dp")]


@pytest.mark.parametrize("mesh", MESHES, ids=str)
def test_group_structure(mesh):
    for axis in AXES:
        groups = mesh.groups(axis)
        members = sorted(itertools.chain.from_iterable(groups))
        assert members == list(range(mesh.world_size)), "each rank in exactly one group per axis"
        assert len(groups) == mesh.world_size // mesh.degree(axis)
        assert set(groups) == {mesh.group(axis, rank) for rank in range(mesh.world_size)}
        for rank in range(mesh.world_size):
            group = mesh.group(axis, rank)
            assert rank in group
            assert [mesh.coords(peer)[axis] for peer in group] == list(range(mesh.degree(axis)))
            for other in set(AXES) - {axis}:
                assert {mesh.coords(peer)[other] for peer in group} == {mesh.coords(rank)[other]}


@pytest.mark.parametrize("mesh", MESHES, ids=str)
def test_coords_are_a_bijection(mesh):
    all_coords = {tuple(mesh.coords(rank).values()) for rank in range(mesh.world_size)}
    assert all_coords == set(itertools.product(range(mesh.data), range(mesh.tensor), range(mesh.pipeline)))


def test_stage_neighbours(mesh_2x2x2):
    assert mesh_2x2x2.stage_neighbours(0) == (None, 2)
    assert mesh_2x2x2.stage_neighbours(2) == (0, None)
    assert mesh_2x2x2.stage_neighbours(5) == (None, 7)


def test_stage_neighbours_of_a_four_stage_pipeline():
    mesh = Mesh(data=2, tensor=1, pipeline=4)  # tp-pp-dp: stages of replica 0 are ranks 0..3
    assert [mesh.stage_neighbours(rank) for rank in range(4)] == [(None, 1), (0, 2), (1, 3), (2, None)]
    assert mesh.stage_neighbours(6) == (5, 7)
    single = Mesh(data=2, tensor=1, pipeline=1)
    assert single.stage_neighbours(1) == (None, None)


# --- check_divisible ----------------------------------------------------------------------

def check(text, world_size, global_batch_size=64, accum_steps=1, **sizes):
    plan = parse_plan(text)
    model = {"layers": 4, "heads": 8, "ff_dim": 512, "vocab_size": 1000}
    mesh = build_mesh(plan, world_size)
    check_batch_splits(global_batch_size, mesh.data, accum_steps, plan.microbatches)
    check_divisible(mesh, **{**model, **sizes})


def test_check_divisible_accepts_a_fitting_plan():
    check("data=2,tensor=2,pipeline=2,microbatches=4", 8)
    check("tensor=3", 3, heads=None, ff_dim=None, vocab_size=None)


@pytest.mark.parametrize("text, world_size, sizes, fix", [
    ("pipeline=8", 8, {}, "--plan: pipeline=8 needs at least 8 layers, the model has 4: lower pipeline"),
    ("data=4", 4, {"global_batch_size": 10},
     "--global_batch_size=10 does not divide into 4 data-parallel ranks: use a multiple of 4"),
    ("data=2", 2, {"global_batch_size": 30, "accum_steps": 2},
     "--global_batch_size=30 does not divide into 2 data-parallel ranks x 2 accumulation steps: use a multiple of 4"),
    ("data=2,pipeline=2,microbatches=3", 4, {"global_batch_size": 8},
     "gives 4 examples per data-parallel rank, which do not split into microbatches=3: use a multiple of 6"),
    ("tensor=3", 3, {"heads": 8},
     "--plan: tensor=3 does not divide the attention heads (8): use a tensor degree that divides 8"),
    ("tensor=3", 3, {"heads": 6, "ff_dim": 100}, "does not divide the feed-forward width (100)"),
    ("tensor=3", 3, {"heads": 6, "ff_dim": 99, "vocab_size": 1000},
     "vocabulary size (1000): use a tensor degree that divides 1000, or pad the vocabulary to a multiple of 3"),
])
def test_check_divisible_errors_name_the_fix(text, world_size, sizes, fix):
    assert fix in config_error(check, text, world_size, **sizes)


# --- split_layers ------------------------------------------------------------------------

def brute_force_best(costs, stages) -> float:
    """The least possible cost of the costliest stage, over every contiguous split."""
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = (0, *cuts, len(costs))
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


def assert_partition(ranges, layers, stages):
    assert len(ranges) == stages
    assert all(len(r) > 0 and r.step == 1 for r in ranges)
    assert [i for r in ranges for i in r] == list(range(layers))


def test_split_layers_examples():
    assert split_layers([1, 1, 1, 1], 2) == [range(0, 2), range(2, 4)]
    assert split_layers([5, 1, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 6)]
    assert split_layers([1, 1, 1, 1, 1, 5], 2) == [range(0, 5), range(5, 6)]
    assert split_layers([3.0, 1.5, 2.5], 1) == [range(0, 3)]
    assert split_layers([3, 1, 2], 3) == [range(0, 1), range(1, 2), range(2, 3)]


def test_split_layers_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        layers = rng.randint(1, 8)
        stages = rng.randint(1, layers)
        costs = [rng.choice([0, rng.randint(1, 20)]) for _ in range(layers)]
        ranges = split_layers(costs, stages)
        assert_partition(ranges, layers, stages)
        assert max(sum(costs[i] for i in r) for r in ranges) == brute_force_best(costs, stages)


def test_split_layers_with_float_costs_is_optimal_and_deterministic():
    rng = random.Random(1)
    for _ in range(50):
        costs = [rng.uniform(0.1, 10.0) for _ in range(7)]
        ranges = split_layers(costs, 3)
        assert split_layers(costs, 3) == ranges
        worst = max(sum(costs[i] for i in r) for r in ranges)
        assert worst == pytest.approx(brute_force_best(costs, 3), rel=1e-12)


def test_split_layers_errors():
    message = config_error(split_layers, [1, 1], 3)
    assert "pipeline=3 needs at least 3 layers, the model has 2" in message
    with pytest.raises(ValueError):
        split_layers([1, 1], 0)
    with pytest.raises(ValueError):
        split_layers([1, -1], 1)


def test_a_plan_along_an_axis_the_recipe_lacks_is_a_config_error():
    from common.api import check_plan_axes
    check_plan_axes(parse_plan("data=2"), "classify", ("data",))
    check_plan_axes(parse_plan("tensor=2"), "translate", ("data", "tensor"))
    with pytest.raises(ConfigError, match="classify.py does not implement pipeline parallelism"):
        check_plan_axes(parse_plan("pipeline=2"), "classify", ("data",))
