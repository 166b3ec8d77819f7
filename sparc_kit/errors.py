"""The project's error types: input it cannot use, said in one line.

Every error the package raises for a bad recipe, data set, checkpoint, plugin or command-line argument derives
from :class:`SparcError`. The CLI reports a :class:`SparcError` as its message alone with exit code 2; anything
else is a bug in the package (or in a user's component) and keeps its traceback, so a library bug never looks
like bad input. Each concrete type also keeps the built-in base it had before (``RecipeError`` is still a
``ValueError``), so code that caught those goes on working.

This module imports nothing of the package: every layer may raise these.
"""

from __future__ import annotations

__all__ = [
    "SparcError",
    "RunError",
    "RecipeError",
    "ComponentError",
    "DataError",
    "EngineSetupError",
    "one_line",
    "require_recipe",
]


class SparcError(Exception):
    """Input the package cannot use; ``str()`` is one line that names the field, file or value and what would be
    accepted."""


def one_line(text: str) -> str:
    """``text`` with control characters escaped, so whatever a user's key or value brought in stays on one line."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class RecipeError(SparcError, ValueError):
    """A recipe that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = [one_line(p) for p in problems]
        self.source = source
        super().__init__("\n".join(problems))

    def __reduce__(self):  # survives pickling (sent between processes)
        return (RecipeError, (self.problems, self.source))


class RunError(SparcError):
    """A run that started and cannot go on (a non-finite loss, a run folder that does not fit its recipe, too many
    unreadable samples): the CLI exits 1 with the line, not 2, since the input was valid when it began."""


class ComponentError(SparcError, ValueError):
    """A component's builder refused the values a recipe gave it (``Entry.build`` turns the builder's
    ``ValueError`` into this): a recipe problem, said in the builder's own words."""


class DataError(SparcError, ValueError):
    """Data that cannot be trained or evaluated on as asked (an empty data set, no captions to train a tokenizer)."""


class EngineSetupError(SparcError, ValueError):
    """An engine that cannot run as the recipe asks (missing package, impossible layout, bad launcher state)."""


def require_recipe(recipe: object, caller: str) -> None:
    """Builders take a validated recipe object; files are read at the edges (``load_recipe``, ``load_pretrained``,
    the CLI). A path or dict handed to a builder is a programming error: a ``TypeError`` that says what to write."""
    if not (hasattr(recipe, "model") and hasattr(recipe, "model_dump")):
        raise TypeError(
            f"{caller} takes a validated recipe, got {type(recipe).__name__}: "
            f"{caller}(sparc_kit.load_recipe({recipe!r:.60}))"
        )
