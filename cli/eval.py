"""``sparc eval RUN_OR_CHECKPOINT``: zero-shot, retrieval and segmentation metrics as a table and as JSON, or
(``--task heatmaps --image PATH --text CAPTION``) SPARC alignment heat maps of one image and caption as PNGs.

Thin: the library's :func:`~sparc_kit.evaluate.build_eval_specs`, :func:`~sparc_kit.pretrained.load_pretrained` and
:func:`~sparc_kit.evaluate.run_evaluations` do the work; heat maps are
:func:`~sparc_kit.evaluate.heatmaps.alignment_maps` and :func:`~sparc_kit.evaluate.heatmaps.write_heatmaps` (not a
registered evaluator: they take one image and caption, not a data set). Bad input exits 2 with one line and no
traceback.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional

import typer

from sparc_cli._errors import fail, reported

ORDER = 20

HEATMAPS = "heatmaps"  # handled here, before the registered evaluators (one image and caption, not a data set)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)


def eval_command(
    target: str = typer.Argument(..., help="Run folder, checkpoint folder (RUN/checkpoints/step_N) or .safetensors."),
    task: str = typer.Option(
        "all",
        "--task",
        "-t",
        help="zeroshot, retrieval, segmentation or all; heatmaps: alignment heat maps of --image and --text.",
    ),
    data: Optional[List[str]] = typer.Option(
        None,
        "--data",
        "-d",
        help="Evaluation set: a manifest (JSONL/CSV) or webdataset shards (test-{000..001}.tar); TASK=PATH to say "
        "which task (repeatable). Default: the recipe's eval: section.",
    ),
    classnames: Optional[str] = typer.Option(
        None,
        "--classnames",
        help="zeroshot: file of class names, one a line (default: classnames.txt beside the data).",
    ),
    templates: Optional[str] = typer.Option(
        None, "--templates", help="zeroshot prompts: label (class name only), clip (ensemble; default) or a file."
    ),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="Images per batch (default 64)."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1, help="Evaluate the first N images only."),
    ignore_index: Optional[int] = typer.Option(
        None, "--ignore-index", min=0, max=255, help="segmentation: the mask value of unlabelled pixels (default 255; CamVid 11)."
    ),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:1, ... or auto."),
    out: Optional[str] = typer.Option(
        None,
        "--out",
        "-o",
        help="Also write all results to this JSON file (RUN/eval/NAME.json is always written, NAME = the task). "
        "heatmaps: the folder for the PNGs (default RUN/heatmaps/IMAGE_NAME).",
    ),
    image: Optional[str] = typer.Option(None, "--image", help="heatmaps: the image file."),
    text: Optional[List[str]] = typer.Option(
        None, "--text", help="heatmaps: a caption (repeatable: one folder of maps per caption)."
    ),
) -> None:
    """Evaluate a trained model: zero-shot top-1/top-5, retrieval Recall@1/5/10, segmentation mIoU; or heat maps.

    --task heatmaps --image PATH --text CAPTION: for each token of the caption, SPARC's alignment weights (threshold 1/P) and the raw token-patch similarity over the image's patch grid, as PNG overlays, a contact sheet (sheet.png) and heatmaps.json, for a run of any loss.
    """
    if task == HEATMAPS:
        given = [name for name, value in (("--data", data), ("--classnames", classnames), ("--templates", templates),
                 ("--batch-size", batch_size), ("--max-samples", max_samples), ("--ignore-index", ignore_index))
                 if value is not None and value != []]
        if given:
            fail(f"--task heatmaps takes no {', '.join(given)} (it draws one --image with each --text)")
        if not image or not text:
            fail("--task heatmaps needs --image PATH and --text CAPTION")
        heatmaps_command(target, image, text, device, out)
        return
    if image is not None or text:
        fail("--image and --text are for --task heatmaps")
    from sparc_kit.engines.base import resolve_device
    from sparc_kit.evaluate import build_eval_specs, check_task, result_rows, run_evaluations
    from sparc_kit.pretrained import load_pretrained

    specs = None  # without --data the run's recipe (its eval: section) decides, once it is loaded
    with reported():
        check_task(task)  # the task, data and device are checked before the model is loaded: a typo fails fast
        if data:
            specs = build_eval_specs(task, data, classnames, templates, batch_size, max_samples, ignore_index=ignore_index)
        device = str(resolve_device(device, field="--device"))
        pretrained = load_pretrained(target, device=device)
        if specs is None:
            recipe_specs = getattr(pretrained.recipe, "eval", None) or []
            specs = build_eval_specs(
                task, [], classnames, templates, batch_size, max_samples, recipe_specs, ignore_index=ignore_index
            )
        results = run_evaluations(pretrained, specs)

    from rich.console import Console
    from rich.table import Table

    step = f"step {pretrained.step}" if pretrained.step is not None else "checkpoint"
    table = Table(title=f"{target} ({step})", title_justify="left")
    for column, justify in (("eval", "left"), ("data", "left"), ("metric", "left"), ("%", "right"), ("n", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in result_rows(results):
        table.add_row(*row)
    console = Console(soft_wrap=False)
    console.print(table)
    for r in results:
        typer.echo(f"wrote {r.path}")
    if out:
        payload = {"results": [r.to_json(pretrained.step, pretrained.checkpoint) for r in results]}
        try:
            with open(out, "w") as f:
                json.dump(payload, f, indent=1)
                f.write("\n")
        except OSError as exc:
            fail(f"{out}: cannot write ({exc.strerror or exc})")
        typer.echo(f"wrote {out}")


def heatmaps_command(target: str, image_path: str, texts: List[str], device: str, out: Optional[str]) -> None:
    """``--task heatmaps``: the maps of each caption over the image, in OUT (one caption) or OUT/text_N (several)."""
    from sparc_kit.engines.base import resolve_device
    from sparc_kit.evaluate.heatmaps import SHEET, SUMMARY, alignment_maps, read_image, write_heatmaps
    from sparc_kit.pretrained import load_pretrained

    with reported():
        picture = read_image(image_path)  # before the model is loaded: a wrong path fails fast
        device = str(resolve_device(device, field="--device"))
        pretrained = load_pretrained(target, device=device)
        stem = os.path.splitext(os.path.basename(image_path))[0] or "image"
        folder = out or os.path.join(pretrained.run_dir, HEATMAPS, stem)
        for n, caption in enumerate(texts, start=1):
            maps = alignment_maps(pretrained.model, pretrained.tokenizer, pretrained.transform, picture, caption)
            maps.extra.update(image=image_path, step=pretrained.step, checkpoint=pretrained.checkpoint)
            where = folder if len(texts) == 1 else os.path.join(folder, f"text_{n}")
            written = write_heatmaps(maps, where)
            typer.echo(f"{caption!r}: {len(maps.pieces)} tokens ({' '.join(maps.pieces)}), {len(written)} files")
            typer.echo(f"wrote {os.path.join(where, SHEET)}")
            typer.echo(f"wrote {os.path.join(where, SUMMARY)}")
