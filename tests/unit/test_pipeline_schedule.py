import pytest

from common.plans.pipeline import SCHEDULES, gpipe_schedule, one_f_one_b_schedule, peak_in_flight


def runs_to_completion(schedules: list[list[tuple[str, int]]]) -> bool:
    """Simulate stages with non-blocking sends and blocking receives: a forward on stage s
    waits for stage s-1's forward of that micro-batch, a backward for stage s+1's backward."""
    done = [set() for _ in schedules]
    positions = [0] * len(schedules)
    last = len(schedules) - 1
    progress = True
    while progress:
        progress = False
        for s, ops in enumerate(schedules):
            if positions[s] == len(ops):
                continue
            kind, i = ops[positions[s]]
            ready = (kind == "F" and (s == 0 or ("F", i) in done[s - 1])) or \
                    (kind == "B" and (s == last or ("B", i) in done[s + 1]))
            if ready:
                done[s].add((kind, i))
                positions[s] += 1
                progress = True
    return all(p == len(ops) for p, ops in zip(positions, schedules))


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("stages, microbatches", [(1, 1), (2, 1), (2, 4), (2, 8), (3, 2), (4, 8), (4, 3)])
def test_schedules_are_complete_and_cannot_deadlock(name, stages, microbatches):
    schedules = [SCHEDULES[name](microbatches, stages, s) for s in range(stages)]
    for ops in schedules:
        assert sorted(ops) == sorted([("F", i) for i in range(microbatches)] + [("B", i) for i in range(microbatches)])
        assert all(ops.index(("F", i)) < ops.index(("B", i)) for i in range(microbatches))
    assert runs_to_completion(schedules)


def test_1f1b_bounds_activations_by_the_stage_count():
    for stage in range(4):
        assert peak_in_flight(gpipe_schedule(8, 4, stage)) == 8
        assert peak_in_flight(one_f_one_b_schedule(8, 4, stage)) == 4 - stage


def test_1f1b_order_on_two_stages():
    assert one_f_one_b_schedule(3, 2, 0) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]
    assert one_f_one_b_schedule(3, 2, 1) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]


def test_the_simulator_catches_a_deadlock():
    backwards_first = [[("B", 0), ("F", 0)], [("F", 0), ("B", 0)]]
    assert not runs_to_completion(backwards_first)
