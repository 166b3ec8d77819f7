"""Zero-shot segmentation on the built-in synthetic shapes: a SPARC run and a CLIP run of the same size, beside
chance (random patch labels), with the alignment heat maps of one image for each.

    python benchmarks/segmentation_shapes.py --sparc runs/sparc_tiny --clip runs/clip_tiny [--images 300]

Both runs are ordinary run folders (``sparc train sparc_tiny``, ``sparc train clip_tiny``: the same towers, data
and schedule; only the loss differs). The held-out set is drawn from the synthetic generator with another seed
than training's and written as a segmentation manifest: ``images/N.png``, ``masks/N.png`` (each shape's pixels
labelled with its colour, 0-5; background 255: not scored, since no caption ever names it), ``classnames.txt``
(the six colours), ``val.jsonl``. Colours, not shape types: a patch inside a shape is one flat colour whatever the
shape, so only the colour is a patch-level property a caption names. Each model is evaluated with the paper's protocol (the classes present in each
image compete; an image with one shape, or two of a kind, then has a single candidate, so that number is high for
every model) and the open-vocabulary variant (all six compete), which is the one that tells models apart;
chance is the same evaluator on a model whose patch and text embeddings are random, so each patch takes a random
class among the candidates. Prints a table and writes ``results/segmentation_shapes.json`` and, with
``--heatmaps DIR``, each run's contact sheet for one image.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sparc_kit import load_pretrained
from sparc_kit.data.synthetic import COLOURS, SyntheticShapes, _shape_mask
from sparc_kit.data.transforms import EvalTransform
from sparc_kit.evaluate.data import iter_segmentation_samples
from sparc_kit.evaluate.heatmaps import alignment_maps, write_heatmaps
from sparc_kit.evaluate.segmentation import segmentation_evaluate

CLASSNAMES = tuple(COLOURS)  # the shapes are segmented by the colour their caption names
IGNORE = 255  # background


def write_shapes_set(folder: str | Path, images: int, seed: int = 12345, image_size: int = 64) -> Path:
    """A segmentation manifest of ``images`` synthetic samples (``seed`` unlike any training seed)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    data = SyntheticShapes(num_samples=images, image_size=image_size, seed=seed)
    rows = []
    for i in range(images):
        sample = data[i]
        Image.fromarray(sample["image"].permute(1, 2, 0).numpy()).save(folder / "images" / f"{i:05d}.png")
        items, _ = data._layout(data._rng(i))  # what __getitem__ drew the sample from: shapes, colours, places
        mask = np.full((image_size, image_size), IGNORE, dtype=np.int64)
        for item in items:  # later shapes cover earlier ones, as in the image
            inside = _shape_mask(item["shape"], item["cx"], item["cy"], item["r"], image_size)
            mask[inside] = CLASSNAMES.index(item["colour"])
        assert ((mask != IGNORE) == (sample["mask"].numpy() > 0)).all()  # the same pixels as the dataset's mask
        Image.fromarray(mask.astype(np.uint8), mode="L").save(folder / "masks" / f"{i:05d}.png")
        rows.append({"image": f"images/{i:05d}.png", "mask": f"masks/{i:05d}.png", "caption": sample["caption"]})
    (folder / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    with open(folder / "val.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return folder / "val.jsonl"


class RandomEmbeddings:
    """Chance: patch embeddings drawn at random, so each patch takes a uniformly random class among the
    candidates (the class embeddings are random too, passed as ``class_embeds``)."""

    def __init__(self, patches: int, dim: int, seed: int):
        self.patches, self.dim = patches, dim
        self.generator = torch.Generator().manual_seed(seed)

    def parameters(self):
        return iter([torch.zeros(1)])

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        return torch.randn(images.shape[0], self.patches, self.dim, generator=self.generator)


def evaluate_run(run: str, manifest: Path, open_vocabulary: bool) -> dict:
    pretrained = load_pretrained(run)
    metrics, per_class = segmentation_evaluate(
        pretrained.model, pretrained.tokenizer, iter_segmentation_samples(str(manifest)), CLASSNAMES, "label",
        open_vocabulary=open_vocabulary, transform=pretrained.transform,
    )
    return {**metrics, "per_class_iou": per_class}


def evaluate_chance(manifest: Path, open_vocabulary: bool, patches: int, seeds: int = 3) -> dict:
    runs = []
    for seed in range(seeds):
        model = RandomEmbeddings(patches, 16, seed)
        class_embeds = torch.randn(len(CLASSNAMES), 16, generator=torch.Generator().manual_seed(100 + seed))
        metrics, _ = segmentation_evaluate(
            model, None, iter_segmentation_samples(str(manifest)), CLASSNAMES, "label",
            open_vocabulary=open_vocabulary, transform=EvalTransform(64), class_embeds=class_embeds,
        )
        runs.append(metrics)
    return {key: float(np.mean([r[key] for r in runs])) for key in ("miou", "pixel_accuracy")} | {"seeds": seeds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparc", required=True, help="a sparc_tiny run folder")
    parser.add_argument("--clip", required=True, help="a clip_tiny run folder (same towers, CLIP loss)")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--work", default="results/segmentation_shapes", help="where the held-out set is written")
    parser.add_argument("--heatmaps", default=None, help="write each run's heat maps of image 0 here")
    args = parser.parse_args(argv)
    manifest = write_shapes_set(args.work, args.images)
    patches = (64 // 8) ** 2
    table: dict[str, dict] = {}
    for label, run in (("SPARC (sparc_tiny)", args.sparc), ("CLIP (clip_tiny)", args.clip)):
        table[label] = {mode: evaluate_run(run, manifest, mode == "open") for mode in ("present", "open")}
    table["chance (random patch labels)"] = {
        mode: evaluate_chance(manifest, mode == "open", patches) for mode in ("present", "open")
    }
    print(f"zero-shot segmentation, {args.images} held-out synthetic images, classes {', '.join(CLASSNAMES)}")
    print(f"{'model':<30} {'mIoU present':>13} {'mIoU open':>10} {'pixel acc. present':>19}")
    for label, row in table.items():
        print(
            f"{label:<30} {100 * row['present']['miou']:>12.1f}% {100 * row['open']['miou']:>9.1f}% "
            f"{100 * row['present']['pixel_accuracy']:>18.1f}%"
        )
    Path(args.work).mkdir(parents=True, exist_ok=True)
    with open(Path(args.work) / "segmentation_shapes.json", "w") as f:
        json.dump(table, f, indent=1)
    if args.heatmaps:
        row = json.loads((Path(manifest)).read_text().splitlines()[0])
        image = Image.open(Path(manifest).parent / row["image"]).convert("RGB")
        for name, run in (("sparc_tiny", args.sparc), ("clip_tiny", args.clip)):
            pretrained = load_pretrained(run)
            maps = alignment_maps(pretrained.model, pretrained.tokenizer, pretrained.transform, image, row["caption"])
            write_heatmaps(maps, os.path.join(args.heatmaps, name))
        print(f"heat maps of {row['caption']!r} in {args.heatmaps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
