"""``sparc train RECIPE``: a thin layer over :func:`sparc_kit.train.launch.run_training` (one process) and
:func:`sparc_kit.train.launch.launch_train` (``--nproc N``).

Exit codes: 2 a project error (a recipe field, a component or engine that rejects the recipe when built); 1 a run
that could not go on, or an unexpected error (its traceback appended to RUN/error.log); 130 interrupted.
"""

from __future__ import annotations

from typing import List, Optional

import typer

from sparc_cli._errors import interrupted, reported

ORDER = 10


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)


def train_command(
    recipe: str = typer.Argument(..., help="Recipe file or URL, or a built-in recipe name (sparc_tiny)."),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", "-s", help="Override a recipe value: --set train.steps=100 (repeatable)."
    ),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run folder (default runs/RECIPE_NAME)."),
    nproc: Optional[int] = typer.Option(
        None,
        "--nproc",
        help="Start this many processes on this machine (torch.distributed.run; engine ddp or deepspeed).",
    ),
    print_config: bool = typer.Option(False, "--print-config", help="Print the fully resolved recipe and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Train a recipe; resumes automatically when the run folder holds a checkpoint.

    Several processes: `sparc train RECIPE --nproc N`, or any launcher (torchrun ... -m sparc_cli train RECIPE,
    srun, the deepspeed launcher) with engine.name ddp or deepspeed; train.batch_size is the global batch.
    """
    from sparc_kit.config import dump_recipe, load_recipe
    from sparc_kit.train import TrainingInterrupted
    from sparc_kit.train.launch import default_run_dir, launch_train, rank_and_world, relay_failure, run_training

    with reported():
        cfg = load_recipe(recipe, set_ or [])
    if print_config:
        typer.echo(dump_recipe(cfg), nl=False)
        return
    out_dir = out or default_run_dir(recipe, cfg)
    if nproc is not None and nproc != 1:
        with reported():
            launched = launch_train(recipe, set_ or [], out_dir, nproc, cfg, quiet=quiet)
        if launched.exit_code and launched.message:
            typer.echo(f"error: [rank {launched.rank}] {launched.message}", err=True)
        raise typer.Exit(launched.exit_code)

    rank0 = rank_and_world()[0] == 0  # rank 0 speaks for the run
    # before the first step (data, tokenizer, model, engine) there is no step to save
    before_first_step = f"\ninterrupted before the first step; nothing new was saved in {out_dir}"
    with reported(run_dir=out_dir, relay=relay_failure, interrupt_message=before_first_step if rank0 else None):
        try:
            result = run_training(cfg, out_dir, progress=not quiet)
        except TrainingInterrupted as exc:  # the step in progress finished and was saved
            interrupted(f"\n{exc}" if rank0 else None)
    if not quiet and rank0:
        if result.resumed_from is not None and result.resumed_from >= result.steps:
            typer.echo(f"run already complete at step {result.steps}: {out_dir}")
        else:
            resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
            typer.echo(
                f"done: {result.steps} steps{resumed} in {result.seconds:.0f}s; "
                f"loss {result.first_loss:.4f} -> {result.final_loss:.4f}; run folder {out_dir}"
            )
