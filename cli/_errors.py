"""How every ``sparc`` command reports a failure: ``error:`` lines on stderr and an exit code.

- :class:`~sparc_kit.errors.SparcError` (input the package cannot use): its line, or one line per problem for
  errors that carry ``problems`` (``RecipeError``, ``AblationError``); exit 2, no traceback.
- :class:`~sparc_kit.errors.RunError` (a run that started and cannot go on: a non-finite loss, a resume that does
  not fit, a busy run folder, too many unreadable samples): its line; exit 1.
- ``KeyboardInterrupt``: one line (``interrupted`` unless the command says more); exit 130.
- Anything else is a bug (in the package, a user's component) or the machine (a full disk): one line naming the
  file that holds the whole traceback (``RUN/error.log`` for a training run, else a temporary file); exit 1. So a
  plain ``ValueError`` from inside the package never looks like bad input.

Commands use :func:`reported` around the library calls and :func:`fail` for the checks they make themselves.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, NoReturn, Optional, Sequence

import click
import typer

__all__ = ["fail", "interrupted", "reported", "error_lines"]

_OWN_EXITS = (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.exceptions.ClickException)

#: ``relay(exc, lines, code)``: the lines this process prints for a failure (a run of several processes leaves
#: them to the process that started it; :func:`sparc_kit.train.launch.relay_failure`)
Relay = Callable[[BaseException, list, int], Sequence[str]]


def fail(lines: Sequence[str] | str, code: int = 2, source: str | None = None) -> NoReturn:
    """Print each line as ``error: [SOURCE: ]LINE`` and exit with ``code``. ``source`` (a recipe's file or name)
    prefixes lines that do not already start with ``recipe``."""
    for line in _prefixed([lines] if isinstance(lines, str) else lines, source):
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code)


def _prefixed(lines: Sequence[str], source: str | None) -> list[str]:
    return [f"{source}: {line}" if source and not line.startswith("recipe") else line for line in lines]


def interrupted(message: str | None = "interrupted") -> NoReturn:
    """Exit 130 after ``message`` (None: print nothing, e.g. on the processes of a run other than rank 0)."""
    if message:
        typer.echo(message, err=True)
    raise typer.Exit(130)


def first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def error_lines(exc: BaseException) -> list[str]:
    """The lines a project error prints: its ``problems`` when it has them, else its first line; each prefixed
    with the error's ``source`` (the recipe it is about) unless it names the recipe itself."""
    problems = getattr(exc, "problems", None)
    lines = [str(p) for p in problems] if isinstance(problems, (list, tuple)) and problems else [first_line(exc)]
    return _prefixed(lines, getattr(exc, "source", None))


def _report(exc: BaseException, lines: list[str], code: int, relay: Optional[Relay]) -> NoReturn:
    fail(list(relay(exc, lines, code)) if relay else lines, code)


@contextlib.contextmanager
def reported(
    *, run_dir: str | None = None, interrupt_message: str | None = "interrupted", relay: Optional[Relay] = None
) -> Iterator[None]:
    """Turn what the block raises into ``error:`` lines and an exit code (see the module docstring).

    ``run_dir``: where an unexpected error's traceback goes (``RUN/error.log``; default a temporary file).
    ``interrupt_message``: the line for Ctrl-C. ``relay``: hands the lines of one process of several to the
    process that started them (``sparc train``)."""
    from sparc_kit.errors import RunError, SparcError  # the package's lowest layer: no torch

    try:
        yield
    except _OWN_EXITS:
        raise  # a command's own exit (typer.Exit is a RuntimeError)
    except RunError as exc:
        _report(exc, [first_line(exc)], 1, relay)
    except SparcError as exc:
        _report(exc, error_lines(exc), 2, relay)
    except KeyboardInterrupt:
        interrupted(interrupt_message)
    except Exception as exc:
        from sparc_kit.train.launch import write_traceback

        line = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        _report(exc, [f"{line} (traceback: {write_traceback(exc, run_dir)})"], 1, relay)
