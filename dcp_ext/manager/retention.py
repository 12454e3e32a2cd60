"""Which checkpoints a manager deletes: pure policy, no I/O (tested on its own).

A committed checkpoint is *kept* when any rule keeps it (like Orbax's ``AnyPreservationPolicy``
over ``LatestN``, ``EveryNSteps`` and ``BestN``); with no rule set, everything is kept. Whatever
the rules say, a step is never deleted when it is protected (the newest complete checkpoint,
one being written, the one ``latest`` points to) or when the manager did not create it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

__all__ = ["RetentionPolicy", "StepRecord", "steps_to_delete"]


@dataclass(frozen=True)
class StepRecord:
    """What retention needs to know about one committed step."""

    step: int
    #: created by a :class:`~dcp_ext.CheckpointManager` (its step record is there)
    owned: bool
    metrics: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class RetentionPolicy:
    """``keep_last`` newest, every ``keep_every``-th step, the ``keep_best`` best by
    ``best_metric`` (``best_mode`` ``"min"`` or ``"max"``). ``None`` disables a rule."""

    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: str = "min"

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.keep_last, self.keep_every, self.keep_best))

    def metric_of(self, rec: StepRecord) -> float | None:
        """The ranking metric of ``rec`` (None if absent or not a finite number)."""
        if not self.best_metric or not rec.metrics:
            return None
        v = rec.metrics.get(self.best_metric)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        return float(v)

    def kept(self, records: Iterable[StepRecord]) -> set[int]:
        """Steps some rule keeps (all of them when no rule is set)."""
        recs = sorted(records, key=lambda r: r.step)
        if not self.active:
            return {r.step for r in recs}
        keep: set[int] = set()
        if self.keep_last is not None:
            keep.update(r.step for r in recs[-self.keep_last:])
        if self.keep_every is not None:
            keep.update(r.step for r in recs if r.step % self.keep_every == 0)
        if self.keep_best is not None:
            scored = [(m, r.step) for r in recs if (m := self.metric_of(r)) is not None]
            # best first; among equal metrics the newer step wins
            scored.sort(key=lambda ms: (ms[0] if self.best_mode == "min" else -ms[0], -ms[1]))
            keep.update(s for _m, s in scored[:self.keep_best])
            # a checkpoint without the metric cannot be ranked: never delete it for that
            keep.update(r.step for r in recs if self.metric_of(r) is None)
        return keep


def steps_to_delete(records: Iterable[StepRecord], policy: RetentionPolicy,
                    protected: Iterable[int] = ()) -> list[int]:
    """Committed steps to delete: owned, not kept by ``policy``, not ``protected`` and not the
    newest of ``records`` (sorted ascending)."""
    recs = list(records)
    if not recs:
        return []
    keep = policy.kept(recs) | set(protected) | {max(r.step for r in recs)}
    return sorted(r.step for r in recs if r.owned and r.step not in keep)
