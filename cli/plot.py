"""``sparc plot RUN [RUN ...]``: training curves of one or several runs on shared axes, as a PNG
(:func:`sparc_kit.train.curves.plot_curves`)."""

from __future__ import annotations

from typing import List, Optional

import typer

from sparc_cli._errors import reported

ORDER = 36


def register(app: typer.Typer) -> None:
    app.command("plot")(plot)


def plot(
    runs: List[str] = typer.Argument(..., metavar="RUN", help="Run folders (what `sparc train --out` wrote)."),
    metric: Optional[List[str]] = typer.Option(
        None, "--metric", "-m", help="A metrics.jsonl key to draw, one subplot each (repeatable; default loss)."
    ),
    out: str = typer.Option("curves.png", "--out", "-o", help="The PNG to write."),
    smooth: float = typer.Option(
        0.0, "--smooth", help="Exponential moving average weight in [0, 1), as TensorBoard's slider (0: none)."
    ),
) -> None:
    """Draw the curves of one or several runs: one subplot per metric, one line and legend entry per run."""
    from sparc_kit.train.curves import plot_curves

    with reported():
        path = plot_curves(runs, out, metrics=metric, smooth=smooth)
    typer.echo(f"wrote {path}")
