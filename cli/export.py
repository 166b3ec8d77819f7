"""``sparc export RUN_OR_CHECKPOINT --format safetensors|onnx|torchscript [--out PATH]``: a trained model as files
another program loads (:func:`sparc_kit.export.export` does the work; docs/export.md).

Bad input (a path, an unfinished run, a pickle, a non-empty --out) exits 2 with one line and writes nothing; an
ONNX or TorchScript tower that differs from PyTorch by more than the tolerance exits 1 and writes nothing.
"""

from __future__ import annotations

from typing import Optional

import typer

from sparc_cli._errors import reported

ORDER = 25


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)


def export_command(
    target: str = typer.Argument(
        ..., help="Run folder, checkpoint folder (RUN/checkpoints/step_N), export folder or .safetensors."
    ),
    # a plain string, checked by the library: typer's own choice error is a box of several lines
    fmt: str = typer.Option("safetensors", "--format", "-f", help="safetensors, onnx or torchscript."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="The export folder (default RUN/export/FORMAT)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out folder."),
) -> None:
    """Export a trained model: safetensors + recipe + tokenizer, or ONNX / TorchScript image and text towers."""
    from sparc_kit.export import TOLERANCE, export

    with reported():
        result = export(target, fmt.lower(), out, force=force)
    for name, diff in result.max_abs_diff.items():
        typer.echo(f"{name}: worst |{result.format} - torch| = {diff:.3g} (limit {TOLERANCE[result.format]:g})")
    step = f" (step {result.step})" if result.step is not None else ""
    typer.echo(f"exported{step} to {result.out}: {', '.join(result.files)}")
