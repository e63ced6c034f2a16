"""The one type every plan's step factory returns."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

Metrics = dict  # {"loss": global mean, <metric>: global mean, ..., "count": global weight count}


@dataclasses.dataclass(frozen=True)
class Step:
    """A compiled training step and what the loop and the checkpoints need to know of it.

    `run(batch)` takes this process's share of the global batch, updates the weights and returns
    global metrics. `replica_state` is the state each data-parallel replica holds its own value
    of ({name: variable}: a codec's residuals, per-replica optimizer moments), which checkpoints
    keep once per replica. `wire_bytes` is what one replica sends per step of its gradients (or,
    under topk_updates, of its updates), `float32_bytes` the same as one float32 all-reduce. `report` holds facts of the
    plan for summary.json (a pipeline's micro-batches in flight)."""

    run: Callable[[Any], Metrics]
    wire_bytes: int
    float32_bytes: int
    replica_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    report: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self, batch) -> Metrics:
        return self.run(batch)
