"""Progress lines on stderr while a run trains (rank 0 only)."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["Reporter"]


class Reporter:
    """A live progress bar on a terminal; one plain line per logged step elsewhere (CI logs, files)."""

    def __init__(self, total: int, start: int, enabled: bool, live: bool | None = None):
        self.total, self.start = total, start
        self.enabled = enabled
        self.live = sys.stderr.isatty() if live is None else live
        self.progress = None
        if enabled and self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.progress.add_task("train", total=total, completed=start, info="")
            self.progress.start()

    def update(self, step: int, row: dict[str, Any] | None, eta_s: float) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            info = _summary(row) if row else None
            self.progress.update(self.task, completed=step, **({"info": info} if info else {}))
        elif row is not None:
            print(f"step {step}/{self.total}  {_summary(row)}  eta {_duration(eta_s)}", flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _summary(row: dict[str, Any]) -> str:
    parts = [f"loss {row['loss']:.4f}"]
    for key, label in (("global_loss", "global"), ("fine_loss", "fine")):
        if key in row:
            parts.append(f"{label} {row[key]:.4f}")
    parts.append(f"lr {row['lr']:.2e}")
    parts.append(f"{row['samples_per_s']:.0f} samples/s")
    return "  ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
