"""The loop's state between steps: what a checkpoint's ``state.json`` records and a resumed run restores."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """``step``: optimizer steps done. ``samples_seen``: the global stream position after them (every batch
    taken counts, usable or not). ``counts``: samples used (``read``), unreadable ones skipped, captions cut at
    the context length, all processes together. ``trained_s``: training time, evaluation included."""

    step: int = 0
    samples_seen: int = 0
    trained_s: float = 0.0
    counts: dict[str, int] = field(default_factory=lambda: {"read": 0, "skipped": 0, "truncated": 0})
    last_finite: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("last_finite")
        return out

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> "TrainState":
        counts = {"read": 0, "skipped": 0, "truncated": 0}
        counts.update({k: int(v) for k, v in (state.get("counts") or {}).items()})
        step = int(state["step"])
        return cls(
            step=step,
            samples_seen=int(state["samples_seen"]),
            trained_s=float(state.get("trained_s", 0.0)),
            counts=counts,
            last_finite=step,
        )
