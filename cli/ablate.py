"""``sparc ablate``: sweep recipe parameters, one run folder per grid point, then a results table and a plot.

A thin call of :mod:`sparc_kit.ablate`: ``plan_sweep``, ``format_plan``, ``run_sweep`` and ``write_report``.
Exit codes as for ``sparc train``: 2 bad input (one line per problem), 1 a point that failed (the others still
run), 130 interrupted.
"""

from __future__ import annotations

from typing import List, Optional

import typer

from sparc_cli._errors import fail, reported

ORDER = 30

__all__ = ["ablate_command"]


def register(app: typer.Typer) -> None:
    app.command("ablate")(ablate_command)


def ablate_command(
    recipe: Optional[str] = typer.Argument(
        None, help="Recipe file or URL, or a built-in recipe name; default sparc_tiny."
    ),
    vary: Optional[List[str]] = typer.Option(
        None,
        "--vary",
        help="PARAM or PARAM=V1,V2,... (repeatable; several make the product grid). PARAM is a dotted path or a "
        "short name matching exactly one path (lambda_f, vision.width). Without values: the default grid "
        "(sparsity_threshold 0, 0.5/P, 1/P, 2/P, 4/P; lambda_f 0.5, 1, 5, 10; a Literal or bool's choices). "
        "Values are typed like --set; 'K/P' means K divided by the patch count.",
    ),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Repeat every point with train.seed = 0..N-1."),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", "-s", help="Override a recipe value for every point: --set train.steps=200 (repeatable)."
    ),
    out: Optional[str] = typer.Option(
        None, "--out", "-o", help="Sweep folder (default runs/ablate/RECIPE_NAME/PARAMS)."
    ),
    jobs: int = typer.Option(
        1, "--jobs", "-j", min=1, help="Points trained side by side, each a `sparc train` process with cpus/N threads."
    ),
    metric: Optional[str] = typer.Option(
        None, "--metric", help="Name the best point by this metric (default: an evaluation, else global_loss or final_loss when comparable across the points)."
    ),
    mode: Optional[str] = typer.Option(
        None, "--mode", help="min or max (default: max for accuracy/recall-like names, else min)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the grid and run folders; train nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-step progress while training."),
) -> None:
    """Sweep recipe parameters: every point validated first, finished points skipped, a table and plot at the end."""
    from sparc_kit.ablate import format_plan, plan_sweep, run_sweep, write_report

    if mode is not None and mode not in ("min", "max"):
        fail(f"--mode {mode}: expected min or max")
    with reported():
        sweep = plan_sweep(recipe, vary or [], seeds=seeds, overrides=set_ or [], out_dir=out)
    typer.echo(format_plan(sweep))
    if dry_run:
        return
    with reported():
        outcome = run_sweep(sweep, jobs=jobs, progress=not quiet, log=typer.echo)
        report = write_report(sweep, metric=metric, mode=mode, failed=outcome.failed)
    typer.echo("")
    typer.echo(report.markdown, nl=False)
    typer.echo(f"\nwrote {', '.join(report.files.values())}")
    if report.problems:
        fail(report.problems)
    if outcome.interrupted:
        typer.echo("interrupted: finished points are kept; run the same command again to continue", err=True)
        raise typer.Exit(130)
    if outcome.failed:
        fail([f"{d}: {why}" for d, why in outcome.failed.items()], 1)
