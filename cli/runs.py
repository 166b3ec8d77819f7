"""``sparc runs [DIR]``: the run folders under DIR, one line each (:func:`sparc_kit.runs.list_runs`)."""

from __future__ import annotations

import json
import os
from typing import Optional

import typer

from sparc_cli._errors import reported

ORDER = 35

COLUMNS = ("run", "recipe", "loss", "step", "last loss", "best eval", "status", "size")


def register(app: typer.Typer) -> None:
    app.command("runs")(runs)


def default_root() -> str:
    """``runs`` (where ``sparc train`` puts its run folders) when the current folder has one, else ``.``."""
    return "runs" if os.path.isdir("runs") else "."


def runs(
    folder: Optional[str] = typer.Argument(
        None, metavar="[DIR]", help="Where to look for run folders (default: ./runs when it exists, else .)."
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object: the runs and the folders passed over."),
) -> None:
    """List the run folders under DIR: recipe, loss, step / total, last loss, best evaluation, status, size."""
    from sparc_kit.runs import list_runs

    root = folder or default_root()
    with reported():
        found = list_runs(root)
    if as_json:
        payload = {"root": root, "runs": [r.to_json() for r in found.runs], "skipped": found.skipped}
        typer.echo(json.dumps(payload, indent=1))
        return
    if not found.runs:
        typer.echo(f"no run folders under {root}")
    else:
        table = [COLUMNS] + [_cells(r, root) for r in found.runs]
        widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
        for row in table:
            typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if found.skipped:
        typer.echo(f"note: {len(found.skipped)} folder(s) passed over, unreadable:", err=True)
        for line in found.skipped:
            typer.echo(f"  {line}", err=True)


def _cells(run, root: str) -> tuple[str, ...]:
    best = "—"
    if run.best_metric is not None:
        at = f" @{run.best_step}" if run.best_step is not None else ""
        best = f"{run.best_metric.removeprefix('eval/')} {run.best_value:.4g}{at}"
    where = os.path.relpath(run.path, root)
    return (
        run.path if where == "." else where,
        run.recipe,
        run.loss or "?",
        f"{run.step}/{run.total if run.total is not None else '?'}",
        "—" if run.last_loss is None else f"{run.last_loss:.4f}",
        best,
        run.status_text,
        _human(run.size_bytes),
    )


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
