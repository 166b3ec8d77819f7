"""One point of a parallel sweep, as its own process: ``python -m sparc_kit.ablate.child RECIPE_FILE RUN_DIR``.

:func:`sparc_kit.ablate.run_sweep` with ``jobs > 1`` starts one such process per point, its output going to
``RUN_DIR/train.log``. It trains the recipe file into the run folder without progress output (resuming a checkpoint
there) and answers as ``sparc train RECIPE_FILE --out RUN_DIR --quiet`` would:

- exit status 0: the run is complete;
- 1: a run that started and cannot go on (:class:`~sparc_kit.errors.RunError`: a non-finite loss, a busy or
  mismatched run folder, too many unreadable samples), or an error nobody anticipated, a bug or the machine (its
  traceback in ``RUN_DIR/error.log``, :func:`sparc_kit.train.launch.write_traceback`);
- 2: input it cannot use (:class:`~sparc_kit.errors.SparcError`): the recipe, a plugin, a component or engine
  that rejects its options;
- 130: interrupted (Ctrl-C, or the SIGINT the sweep sends its children); a run past its first step saves a
  checkpoint of its last step first.

Each failure ends with one ``error: ...`` line, which the sweep reads back from the log. The plugins named by
``SPARC_PLUGINS`` (the sweep's environment, passed on) are loaded by :func:`sparc_kit.config.load_recipe`, so a
point may use a user's own components. Warnings are written one line each (``warning: ...``).
"""

from __future__ import annotations

import sys
import warnings

from sparc_kit.config import RecipeError, load_recipe
from sparc_kit.errors import RunError, SparcError
from sparc_kit.train import TrainingInterrupted, train
from sparc_kit.train.launch import write_traceback

__all__ = ["main"]

USAGE = "usage: python -m sparc_kit.ablate.child RECIPE_FILE RUN_DIR"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Train ``RECIPE_FILE`` into ``RUN_DIR`` (``argv``, default the command line); returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 2:
        _say(f"error: {USAGE}")
        return 2
    recipe_file, run_dir = args
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_a, **_k: _say("warning: " + " ".join(str(message).split()))
        try:
            train(load_recipe(recipe_file), run_dir, progress=False)
        except RecipeError as exc:
            source = f"{exc.source}: " if exc.source else ""
            for problem in exc.problems:
                _say(f"error: {problem if problem.startswith('recipe') else source + problem}")
            return 2
        except RunError as exc:
            _say(f"error: {_first_line(exc)}")
            return 1
        except SparcError as exc:  # a plugin, component or engine that rejected the recipe
            _say(f"error: {_first_line(exc)}")
            return 2
        except TrainingInterrupted as exc:
            _say(f"\n{exc}")
            return 130
        except KeyboardInterrupt:  # before the first step: there is no step to save
            _say(f"\ninterrupted before the first step; nothing new was saved in {run_dir}")
            return 130
        except Exception as exc:  # noqa: BLE001  a bug or the disk: one line naming the file with the traceback
            _say(f"error: {type(exc).__name__}: {_first_line(exc)} (traceback: {write_traceback(exc, run_dir)})")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
