"""The timing loop that bench/synthetic.py and bench/upstream.py share (standard library only:
upstream.py runs in another environment), so that their numbers compare directly."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def clocks() -> tuple[float, float]:
    """Wall time and this process's CPU time (all its threads). Images per CPU second hold
    still while other jobs take turns on the cores, as images per wall second do not."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds since `start`, a `clocks()` reading."""
    return tuple(now - then for now, then in zip(clocks(), start))


def iteration_seconds(step: Callable[[], Any], warmup: int, iterations: int,
                      steps_per_iteration: int) -> list[tuple[float, float]]:
    """`warmup` steps, then (wall, CPU) seconds of each of `iterations` runs of
    `steps_per_iteration` steps. `step()` returns a tensor; the last one's value is read
    before the clocks stop, so every step has finished."""
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(iterations):
        start = clocks()
        for _ in range(steps_per_iteration):
            result = step()
        result.numpy()
        seconds.append(since(start))
    return seconds


def rates(seconds: list[tuple[float, float]], images_per_iteration: int) -> dict[str, Any]:
    """Images per wall second and per CPU second of each iteration, and their means."""
    wall, cpu = ([images_per_iteration / took[clock] for took in seconds] for clock in (0, 1))
    return {"img_sec": wall, "mean_img_sec": statistics.fmean(wall),
            "cpu_img_sec": cpu, "mean_cpu_img_sec": statistics.fmean(cpu)}
