"""The one type every plan's step factory returns."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass
class Step:
    """A compiled training step and what the loop and the checkpoints need to know of it:
    `run(batch)` trains on this process's share of the batch; `replica_state` ({name: variable})
    is what each data-parallel replica holds its own value of (residuals, per-replica moments);
    `wire_bytes` is what one replica sends per step (a step that sends sparse rows sets it when
    traced, as their counts are known then), `float32_bytes` the same as one float32
    all-reduce; `report` holds facts of the plan for summary.json (micro-batches in flight)."""

    run: Callable[[Any], dict]  # batch -> {"loss": global mean, <metric>: global mean, "count": global count}
    wire_bytes: int
    float32_bytes: int
    replica_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    report: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self, batch) -> dict:
        return self.run(batch)
