"""The ``sparc`` command: the app, its global options and ``main()``; each command is a module of its own.

Every module of this package other than ``main`` and those starting with ``_`` is a command: it defines ``ORDER``
(its place in ``sparc --help``; typer lists single commands before command groups) and ``register(app)``, which
adds its command or command group. A new command is one new file here; nothing else is edited. Each command is a
thin layer over a library function and reports failures through :mod:`sparc_cli._errors`.

Exit codes: 0 success; 1 a run that failed (non-finite loss, a run folder that does not fit the recipe, an
unexpected error: one line naming RUN/error.log or a temporary file, which holds the traceback); 2 bad input (a
project error: a recipe, option, path or data set that cannot be used), printed one line per problem with no
traceback; 130 interrupted.

Imports: the command modules import the library (and torch, which takes seconds) inside their command
functions, never at module level, so that ``sparc --help`` and a mistyped option answer at once.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pkgutil
import sys
import warnings
from types import ModuleType
from typing import Any, List, Optional

import typer

from sparc_cli._errors import reported

app = typer.Typer(
    name="sparc",
    help="Fine-grained image-text pretraining with SPARC: train, eval, ablate; recipes, components and data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def command_modules() -> list[ModuleType]:
    """The command modules of this package, in ``ORDER``."""
    package = sys.modules[__package__]  # this module's own package, already loaded (no import of its facade)
    names = [m.name for m in pkgutil.iter_modules(package.__path__)]
    modules = [importlib.import_module(f"{__package__}.{n}") for n in names if n != "main" and not n.startswith("_")]
    return sorted(modules, key=lambda m: (m.ORDER, m.__name__))


for _module in command_modules():
    _module.register(app)


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
    from sparc_kit.plugins import ensure_plugins, load_plugins

    with reported():
        load_plugins(specs, export=True)
        ensure_plugins()


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
        code: Any = 0
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        code = 130
    except SystemExit as exc:  # typer ends every command this way
        code = exc.code
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        _leave_worker(code)
    sys.exit(code)


def _leave_worker(code: Any) -> None:
    """One process of a multi-process run leaves without the interpreter's teardown. Everything it writes is
    written and closed, and its process group destroyed, by then; under load a library's C++ thread destroyed
    during teardown has aborted a finished worker ("terminate called without an active exception", SIGABRT),
    turning a finished run into a failed one."""
    if isinstance(code, str):  # sys.exit("message"): printed, exit 1, as the interpreter would
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0 if code is None else int(code))


if __name__ == "__main__":
    main()
