"""``sparc recipes list|show|validate|cp``: thin layers over :mod:`sparc_kit.config` (``builtin_recipes``,
``load_recipe``, ``dump_recipe``, ``resolve_recipe_path``)."""

from __future__ import annotations

import os
import shutil
from typing import List, Optional

import typer

from sparc_cli._errors import fail, reported

ORDER = 50

recipes_app = typer.Typer(help="List, show, copy and validate recipes.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(recipes_app, name="recipes")


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
    from sparc_kit.config import dump_recipe, load_recipe

    with reported():
        cfg = load_recipe(recipe, set_ or [])
    typer.echo(dump_recipe(cfg), nl=False)


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
        except RecipeError as exc:  # every recipe is checked; each problem is named with its recipe
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
    from sparc_kit.config import resolve_recipe_path

    with reported():
        src = resolve_recipe_path(name)
    if os.path.isdir(dest):
        dest = os.path.join(dest, os.path.basename(src))
    if os.path.exists(dest):
        fail(f"{dest} exists; not overwriting it")
    shutil.copyfile(src, dest)
    typer.echo(f"wrote {dest}")
