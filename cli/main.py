"""The ``sparc`` command. Thin: each command parses, validates and calls the library.

Exit codes: 0 success; 1 a run that failed (non-finite loss, a run folder that does not fit the recipe, an
unexpected error: one line naming RUN/error.log, which holds the traceback); 2 bad input (a recipe or argument
error), printed one line per problem with no traceback; 130 interrupted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from sparc_cli.ablate_command import ablate_command
from sparc_cli.data_commands import add_to as add_data_commands
from sparc_cli.eval_command import eval_command

app = typer.Typer(
    name="sparc",
    help="Fine-grained image-text pretraining with SPARC: train, eval, ablate; recipes, components and data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipes_app = typer.Typer(help="List, show, copy and validate recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
app.command("eval")(eval_command)
add_data_commands(app)  # sparc data inspect|verify|convert, sparc tokenizer train
app.command("ablate")(ablate_command)


def _fail(lines: list[str] | str, code: int = 2, source: str | None = None) -> None:
    if isinstance(lines, str):
        lines = [lines]
    for line in lines:
        prefix = f"{source}: " if source and not line.startswith("recipe") else ""
        typer.echo(f"error: {prefix}{line}", err=True)
    raise typer.Exit(code)


def _load(recipe: str, overrides: list[str]):
    from sparc_kit.config import RecipeError, load_recipe

    try:
        return load_recipe(recipe, overrides)
    except RecipeError as exc:
        _fail(exc.problems, 2, exc.source)


def _default_out(recipe_arg: str, recipe) -> str:
    stem = recipe.name or Path(recipe_arg).stem
    return os.path.join("runs", stem)


def _rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


def _fail_run(exc: BaseException, code: int, line: str | None = None) -> None:
    """A training process's one-line error (``line``, else the error's first line). One process of several
    leaves it for `sparc train --nproc` to print (the root cause only); under another launcher it prints it
    with its rank, unless it merely repeats an error of rank 0's."""
    from sparc_kit.train.launch import record_failure

    if line is None:
        line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    rank, world = _rank_and_world()
    if world > 1:
        from_main = bool(getattr(exc, "from_main", False))
        if not record_failure(line, code, from_main=from_main) and not from_main:
            typer.echo(f"error: [rank {rank}] {line}", err=True)
        raise typer.Exit(code)
    _fail(line, code)


def _write_traceback(exc: BaseException, out_dir: str) -> str:
    """The whole traceback of ``exc``, appended to ``RUN/error.log`` (``error.rankN.log`` for process N > 0 of
    several) under a line saying when and what ran; a temporary file when the run folder cannot be written.
    Returns the file's path."""
    import datetime
    import tempfile
    import traceback

    rank, world = _rank_and_world()
    header = (
        f"--- {datetime.datetime.now().isoformat(timespec='seconds')} pid {os.getpid()}"
        f"{f' rank {rank}' if world > 1 else ''}: sparc {' '.join(sys.argv[1:])}\n"
    )
    text = header + "".join(traceback.format_exception(exc))
    path = os.path.join(out_dir, "error.log" if rank == 0 else f"error.rank{rank}.log")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(path, "a") as f:
            f.write(text)
    except OSError:
        fd, path = tempfile.mkstemp(prefix="sparc-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return path


@contextlib.contextmanager
def _one_line_warnings():
    """Warnings raised during a command (a run's, torch's, DeepSpeed's, a plugin's) as one ``warning: ...`` line
    each on stderr (Python's own format takes two, the second a line of source)."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: typer.echo(_warning_line(message), err=True)
        yield


def _warning_line(message: Warning | str) -> str:
    """``warning: MESSAGE`` on one line, whatever line breaks the message holds."""
    return "warning: " + " ".join(line.strip() for line in str(message).splitlines() if line.strip())


@app.callback()
def _global_options(
    ctx: typer.Context,
    plugin: Optional[List[str]] = typer.Option(
        None,
        "--plugin",
        metavar="FILE.py|MODULE",
        help="Import a module that registers components of your own before the command runs: a .py file, or a "
        "module importable from the current folder (repeatable). Passed on to the processes a command starts "
        "through SPARC_PLUGINS, which names plugins too (comma-separated).",
    ),
) -> None:
    # every command: Python warnings as one line each; then the plugins, so recipes can name their components
    ctx.with_resource(_one_line_warnings())
    _load_plugins(plugin or [])


def _load_plugins(specs: list[str]) -> None:
    """``--plugin`` modules, then those SPARC_PLUGINS names and the ``sparc_kit.plugins`` entry points of the
    installed packages. A plugin that fails to import is one line naming it and the exception (exit 2)."""
    from importlib.metadata import entry_points

    if not specs and not os.environ.get("SPARC_PLUGINS", "").strip() and not entry_points(group="sparc_kit.plugins"):
        return  # nothing to load: no need to import the library (and torch) for `sparc train --help`
    from sparc_kit.plugins import PluginError, ensure_plugins, load_plugins

    try:
        load_plugins(specs, export=True)
        ensure_plugins()
    except PluginError as exc:
        _fail(str(exc))


def _launch(recipe: str, set_: list[str], out_dir: str, quiet: bool, nproc: int, cfg) -> None:
    from sparc_kit.engines import BatchLayout, EngineSetupError
    from sparc_kit.train.launch import launch

    if cfg.engine.name == "local":
        _fail(
            f"--nproc {nproc}: engine.name is 'local', which runs one process; add --set engine.name=ddp "
            "(or engine.name=deepspeed)"
        )
    try:
        BatchLayout(cfg.train.batch_size, nproc, cfg.train.accum_steps)
    except EngineSetupError as exc:
        _fail(f"--nproc {nproc}: {exc}")
    argv = ["train", recipe, "--out", out_dir]
    for item in set_:
        argv += ["--set", item]
    if quiet:
        argv.append("--quiet")
    result = launch(argv, nproc)
    if result.exit_code and result.message:
        typer.echo(f"error: [rank {result.rank}] {result.message}", err=True)
    raise typer.Exit(result.exit_code)


@app.command()
def train(
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
    from sparc_kit.config import dump_recipe

    cfg = _load(recipe, set_ or [])
    if print_config:
        typer.echo(dump_recipe(cfg), nl=False)
        return
    out_dir = out or _default_out(recipe, cfg)
    if nproc is not None:
        if nproc < 1:
            _fail(f"--nproc: must be at least 1, got {nproc}")
        if nproc > 1:
            _launch(recipe, set_ or [], out_dir, quiet, nproc, cfg)
    from sparc_kit.engines import EngineSetupError
    from sparc_kit.train import (
        NonFiniteGradientError,
        NonFiniteLossError,
        ResumeMismatchError,
        RunFolderBusyError,
        TooManyBadSamplesError,
        TrainingInterrupted,
    )
    from sparc_kit.train import train as run_train
    from sparc_kit.train.launch import is_peer_failure, record_failure

    rank, world = _rank_and_world()
    try:
        result = run_train(cfg, out_dir, progress=not quiet)
    except (
        ResumeMismatchError, RunFolderBusyError, NonFiniteLossError, NonFiniteGradientError, TooManyBadSamplesError
    ) as exc:
        _fail_run(exc, 1)
    except TrainingInterrupted as exc:
        if rank == 0:
            typer.echo(f"\n{exc}", err=True)
        raise typer.Exit(130)
    except KeyboardInterrupt:  # before the first step (data, tokenizer, model, engine): there is no step to save
        if rank == 0:
            typer.echo(f"\ninterrupted before the first step; nothing new was saved in {out_dir}", err=True)
        raise typer.Exit(130)
    except (EngineSetupError, ValueError) as exc:  # a component or engine that rejected the recipe at build time
        _fail_run(exc, 2)
    except Exception as exc:
        if world > 1 and is_peer_failure(exc):  # another process went away: its own error is the one to read
            line = f"stopped: another process of this run failed ({str(exc).splitlines()[0][:120]})"
            if not record_failure(line, 1, peer=True):
                typer.echo(f"error: [rank {rank}] {line}", err=True)
            raise typer.Exit(1)
        # an error nobody anticipated (a bug, the disk): one line naming the file that holds the whole traceback
        first = str(exc).splitlines()[0] if str(exc) else ""
        _fail_run(exc, 1, f"{type(exc).__name__}: {first} (traceback: {_write_traceback(exc, out_dir)})")
    if not quiet and rank == 0:
        if result.resumed_from is not None and result.resumed_from >= result.steps:
            typer.echo(f"run already complete at step {result.steps}: {out_dir}")
        else:
            resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
            typer.echo(
                f"done: {result.steps} steps{resumed} in {result.seconds:.0f}s; "
                f"loss {result.first_loss:.4f} -> {result.final_loss:.4f}; run folder {out_dir}"
            )


@app.command()
def components(
    kind: Optional[str] = typer.Argument(None, help="One kind (e.g. loss, vision_encoder); all when omitted."),
) -> None:
    """List the registered components with their parameters and defaults."""
    import sparc_kit  # noqa: F401  (registers the built-ins)
    from sparc_kit import registry

    try:
        kinds = [registry.get_registry(kind).kind] if kind else registry.kinds()
    except registry.UnknownComponentError as exc:
        _fail(str(exc))
    for k in kinds:
        reg = registry.get_registry(k)
        typer.echo(f"{k}: {reg.description}")
        for entry in reg.entries():
            typer.echo(f"  {entry.name}  {entry.doc}")
            for pname, ptype, default in entry.parameters():
                shown = "(required)" if repr(default) == "PydanticUndefined" else f"= {default!r}"
                typer.echo(f"      {pname}: {ptype} {shown}")
        typer.echo("")


@recipes_app.command("list")
def recipes_list() -> None:
    """The built-in recipes."""
    from sparc_kit.config import builtin_recipes, load_recipe

    for name, path in builtin_recipes().items():
        try:
            desc = load_recipe(path).description or ""
        except Exception as exc:  # a broken built-in is still listed, with why
            desc = f"(invalid: {str(exc).splitlines()[0]})"
        typer.echo(f"{name:<16} {desc}")


@recipes_app.command("show")
def recipes_show(
    recipe: str = typer.Argument(..., help="Recipe file or built-in name."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override a value."),
) -> None:
    """Print a recipe fully resolved (extends merged, overrides applied, defaults written out)."""
    from sparc_kit.config import dump_recipe

    typer.echo(dump_recipe(_load(recipe, set_ or [])), nl=False)


@recipes_app.command("validate")
def recipes_validate(
    recipes: List[str] = typer.Argument(..., help="Recipe files or built-in names."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override a value."),
) -> None:
    """Validate recipes; prints one line per problem and exits 2 if any recipe is invalid."""
    from sparc_kit.config import RecipeError, load_recipe

    bad = 0
    for item in recipes:
        try:
            load_recipe(item, set_ or [])
            typer.echo(f"ok: {item}")
        except RecipeError as exc:
            bad += 1
            for line in exc.problems:
                typer.echo(f"error: {item}: {line}", err=True)
    if bad:
        raise typer.Exit(2)


@recipes_app.command("cp")
def recipes_cp(
    name: str = typer.Argument(..., help="Built-in recipe name."),
    dest: str = typer.Argument(..., help="Where to write the copy."),
) -> None:
    """Copy a built-in recipe to edit it."""
    from sparc_kit.config import RecipeError, resolve_recipe_path

    try:
        src = resolve_recipe_path(name)
    except RecipeError as exc:
        _fail(exc.problems)
    if os.path.isdir(dest):
        dest = os.path.join(dest, os.path.basename(src))
    if os.path.exists(dest):
        _fail(f"{dest} exists; not overwriting it")
    shutil.copyfile(src, dest)
    typer.echo(f"wrote {dest}")


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher (without --no_local_rank) and torch.distributed.launch insert --local_rank=N
    right after the program; LOCAL_RANK in the environment says the same, so it is taken out of argv."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        for flag in ("--local_rank", "--local-rank"):
            if arg == flag and i + 1 < len(argv):
                os.environ.setdefault("LOCAL_RANK", argv[i + 1])
                skip = True
                break
            if arg.startswith(flag + "="):
                os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
                break
        else:
            out.append(arg)
    return out


def main() -> None:
    sys.argv = _strip_local_rank(sys.argv)
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
