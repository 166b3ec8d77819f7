"""``sparc components [KIND]``: the registry's kinds, entries and parameters (:mod:`sparc_kit.registry`)."""

from __future__ import annotations

from typing import Optional

import typer

from sparc_cli._errors import reported

ORDER = 40


def register(app: typer.Typer) -> None:
    app.command("components")(components)


def components(
    kind: Optional[str] = typer.Argument(None, help="One kind (e.g. loss, vision_encoder); all when omitted."),
) -> None:
    """List the registered components with their parameters and defaults."""
    import sparc_kit  # noqa: F401  (registers the built-ins)
    from sparc_kit import registry

    with reported():  # an unknown kind is a SparcError: one line, exit 2
        kinds = [registry.get_registry(kind).kind] if kind else registry.kinds()
    for k in kinds:
        reg = registry.get_registry(k)
        typer.echo(f"{k}: {reg.description}")
        for entry in reg.entries():
            typer.echo(f"  {entry.name}  {entry.doc}")
            for pname, ptype, default in entry.parameters():
                shown = "(required)" if repr(default) == "PydanticUndefined" else f"= {default!r}"
                typer.echo(f"      {pname}: {ptype} {shown}")
        typer.echo("")
