"""Alignment heat maps: where each token of a caption looks in an image, as SPARC's alignment weights see it.

For one image and one caption, :func:`alignment_maps` encodes both with a trained dual encoder and computes, for
every real token of the caption (``token_mask``):

- ``similarity[l, p] = t[l] . v[p]``: the raw inner products of the projected, un-normalised token and patch
  embeddings (``token_embeds``, ``patch_embeds``), in float32, as the fine-grained loss computes them;
- ``weights[l, p]``: :func:`~sparc_kit.losses.functional.sparc_alignment_weights` of that row (min-max over the
  patches, entries below the threshold 1/P zeroed, divided by the row sum: eqs. 2-4), so each token's weights sum
  to 1 over the patches.

Both are reshaped to the patch grid ``[L, H, W]``. Nothing depends on the run's loss: a CLIP-trained run has the
same adapters, only nothing trained them to align tokens with patches.

:func:`write_heatmaps` draws them (one overlay PNG per token and map, a contact sheet, ``heatmaps.json``).
Importing this module has no side effects; matplotlib is imported only when drawing.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sparc_kit.data.transforms import BadImageError, decode_image
from sparc_kit.errors import SparcError
from sparc_kit.io import atomic_path, atomic_write
from sparc_kit.losses.functional import sparc_alignment_weights, wide

__all__ = [
    "HeatMaps", "HeatMapError", "alignment_maps", "overlays", "write_heatmaps", "read_image", "SHEET", "SUMMARY"
]

SHEET = "sheet.png"  # the contact sheet: rows tokens, columns image / weights / similarity
SUMMARY = "heatmaps.json"
TOP_PATCHES = 5
_MIN_DISPLAY = 224  # overlays are drawn at least this many pixels wide (tiny models see 32 x 32 images)


class HeatMapError(SparcError, ValueError):
    """Input heat maps cannot be drawn for: a caption with no token."""


@dataclass
class HeatMaps:
    """The maps of one caption over one image; ``L`` is the number of the caption's real tokens."""

    text: str
    pieces: list[str]  # the SentencePiece piece of each real token
    token_ids: list[int]
    positions: list[int]  # each token's index among the caption's ids
    weights: torch.Tensor  # [L, H, W] SPARC alignment weights; each token's sum to 1
    similarity: torch.Tensor  # [L, H, W] raw token-patch inner products
    image: torch.Tensor  # [3, S, S] in [0, 1]: the model's view (the evaluation transform, before normalising)
    threshold: float  # the sparsity threshold used (1/P)
    extra: dict[str, Any] = field(default_factory=dict)  # written into heatmaps.json as is (step, checkpoint, ...)

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.weights.shape[1]), int(self.weights.shape[2])

    def summary(self, top: int = TOP_PATCHES) -> dict[str, Any]:
        """What ``heatmaps.json`` holds besides the file names: per token its piece, the weight sum, how many
        patches keep a weight, and the ``top`` patches by similarity (row-major index, row, column, weight,
        similarity)."""
        h, w = self.grid
        tokens = []
        for i, piece in enumerate(self.pieces):
            weights, similarity = self.weights[i].flatten(), self.similarity[i].flatten()
            best = similarity.argsort(descending=True, stable=True)[: min(top, h * w)].tolist()
            tokens.append({
                "index": i,
                "position": self.positions[i],
                "id": self.token_ids[i],
                "piece": piece,
                "weight_sum": float(weights.sum()),
                "nonzero_patches": int((weights > 0).sum()),
                "top_patches": [
                    {"patch": p, "row": p // w, "col": p % w, "weight": float(weights[p]),
                     "similarity": float(similarity[p])}
                    for p in best
                ],
            })
        return {
            "text": self.text,
            "grid": [h, w],
            "patches": h * w,
            "threshold": self.threshold,
            "image_size": int(self.image.shape[-1]),
            "pieces": list(self.pieces),
            "tokens": tokens,
            **self.extra,
        }


def read_image(path: str | os.PathLike) -> Any:
    """An RGB PIL image from a file; a missing or undecodable file raises :class:`BadImageError` (one line)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise BadImageError(f"{path}: cannot read the image ({exc.strerror or exc})") from None
    try:
        return decode_image(data)
    except BadImageError as exc:  # PIL names the in-memory file it read: "... file <_io.BytesIO object at 0x...>"
        raise BadImageError(f"{path}: {re.sub(r' ?<_io.BytesIO object at 0x[0-9a-f]+>', '', str(exc))}") from None


def _grid(model: torch.nn.Module, patches: int) -> tuple[int, int]:
    vision = getattr(model, "vision", None)
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if isinstance(size, int) and isinstance(patch, int) and patch > 0 and (size // patch) ** 2 == patches:
        return size // patch, size // patch
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"cannot lay {patches} patches out on a square grid")
    return side, side


@torch.no_grad()
def alignment_maps(model: torch.nn.Module, tokenizer: Any, transform: Any, image: Any, text: str) -> HeatMaps:
    """SPARC alignment weights and raw similarities of every real token of ``text`` over ``image``'s patches.

    ``model``: a dual encoder (``image_features`` -> ``patch_embeds`` [B, P, E], ``text_features`` ->
    ``token_embeds`` [B, L, E] and ``token_mask``), e.g. from :func:`~sparc_kit.pretrained.load_pretrained`,
    which also gives ``tokenizer`` and ``transform``. ``image``: whatever ``transform`` takes (a PIL image, an
    image tensor). The threshold is 1/P, the method's default. The model's mode is left as it is (a loaded model
    is in eval mode)."""
    model = getattr(model, "module", model)
    device = next(model.parameters()).device
    pixels = transform(image)  # [3, S, S], normalised
    ids, mask = tokenizer([text])
    patches = model.image_features(pixels.unsqueeze(0).to(device))["patch_embeds"][0]  # [P, E]
    text_out = model.text_features(ids.to(device), mask.to(device))
    real = text_out["token_mask"][0].cpu()  # [L]: the caption's tokens (the end token too, unless excluded)
    tokens = text_out["token_embeds"][0][real.to(device)]  # [L_real, E]
    similarity = wide(tokens) @ wide(patches).T  # [L_real, P], as sparc_fine_grained_loss computes it
    weights = sparc_alignment_weights(similarity[None], threshold=None)[0]  # threshold None = 1/P
    h, w = _grid(model, similarity.shape[-1])
    positions = torch.nonzero(real).flatten().tolist()
    if not positions:
        raise HeatMapError(f"caption {text!r} has no tokens to draw")
    token_ids = [int(ids[0, p]) for p in positions]
    mean = getattr(transform, "mean", None)
    std = getattr(transform, "std", None)
    view = pixels * std + mean if mean is not None and std is not None else pixels
    return HeatMaps(
        text=text,
        pieces=[tokenizer.piece(i) for i in token_ids],
        token_ids=token_ids,
        positions=positions,
        weights=weights.reshape(-1, h, w).float().cpu(),
        similarity=similarity.reshape(-1, h, w).float().cpu(),
        image=view.clamp(0.0, 1.0).float().cpu(),
        threshold=1.0 / (h * w),
    )


def _display_size(image_size: int) -> int:
    return image_size * max(1, math.ceil(_MIN_DISPLAY / image_size))  # a whole multiple: patches stay square


def _upsample(grid: torch.Tensor, size: int) -> np.ndarray:
    """A [H, W] map as [size, size], each patch a block of equal values (nearest: the model's resolution)."""
    return torch.nn.functional.interpolate(grid[None, None].double(), size=(size, size), mode="nearest")[0, 0].numpy()


def _scaled(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((values - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(values)


def _overlay(rgb: np.ndarray, heat: np.ndarray, cmap: Any, alpha: float = 0.6) -> np.ndarray:
    """``cmap`` of ``heat`` [S, S] in [0, 1] blended over the grey of ``rgb`` [S, S, 3] in [0, 1] (grey, so that
    every colour is the map's, not the image's): uint8 [S, S, 3]."""
    grey = (rgb @ np.array([0.299, 0.587, 0.114]))[..., None]
    colours = cmap(heat)[..., :3]
    return np.round(255.0 * ((1.0 - alpha) * grey + alpha * colours)).astype(np.uint8)


def overlays(maps: HeatMaps, size: int | None = None) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """The pictures :func:`write_heatmaps` draws, in memory: the image (the model's view) at ``size`` x ``size``
    pixels as float RGB [S, S, 3] in [0, 1], and per real token ``{"weights": ..., "similarity": ...}``, each an
    overlay uint8 [S, S, 3] (the colour scales are described there). ``size``: by default the smallest whole
    multiple of the image size that is at least 224."""
    from matplotlib import colormaps  # imported here: importing sparc_kit.evaluate must stay cheap

    s = size or _display_size(int(maps.image.shape[-1]))
    view = torch.nn.functional.interpolate(maps.image[None].double(), size=(s, s), mode="bicubic", align_corners=False)
    rgb = view[0].clamp(0.0, 1.0).permute(1, 2, 0).numpy()
    cmap = colormaps["inferno"]
    panels = []
    for i in range(len(maps.pieces)):
        weights = _upsample(maps.weights[i], s)
        similarity = _upsample(maps.similarity[i], s)
        panels.append({
            "weights": _overlay(rgb, _scaled(weights, 0.0, float(weights.max())), cmap),
            "similarity": _overlay(rgb, _scaled(similarity, float(similarity.min()), float(similarity.max())), cmap),
        })
    return rgb, panels


def write_heatmaps(maps: HeatMaps, out_dir: str | os.PathLike, size: int | None = None) -> list[str]:
    """Draw ``maps`` into ``out_dir``; returns the paths written, ``heatmaps.json`` last.

    - ``token_NN_weights.png`` and ``token_NN_similarity.png`` (``NN``: the token's index among the real tokens):
      the image (the model's view) at ``size`` x ``size`` pixels (default: the smallest whole multiple of the
      image size that is at least 224), in grey, with the patch grid's values upsampled nearest-neighbour on top. The
      colour scale is each token's own: weights from 0 to the token's largest weight (patches below the threshold
      get the lowest colour), similarities from the token's smallest to its largest.
    - ``sheet.png``: one row per token, labelled with its piece: the image, the weights, the similarity.
    - ``heatmaps.json``: :meth:`HeatMaps.summary` plus the file names.
    """
    # matplotlib is imported here, not at the top: importing sparc_kit.evaluate (every evaluator module is
    # imported with it) must stay cheap, and only drawing needs it. Figure + savefig use the Agg canvas, headless,
    # without touching pyplot's global backend.
    from matplotlib.figure import Figure
    from PIL import Image

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rgb, panels = overlays(maps, size)
    paths, files = [], []
    for i, drawn in enumerate(panels):
        names = {}
        for kind, pixels in drawn.items():
            path = os.path.join(out_dir, f"token_{i:02d}_{kind}.png")
            with atomic_path(path) as tmp:
                Image.fromarray(pixels).save(tmp, format="PNG")
            paths.append(path)
            names[kind] = os.path.basename(path)
        files.append(names)

    rows = max(1, len(panels))
    height = 2.5 * rows + 0.5  # inches; the top 0.5 hold the caption
    fig = Figure(figsize=(7.5, height), dpi=100)
    image_pixels = np.round(255.0 * rgb).astype(np.uint8)
    for i, drawn in enumerate(panels):
        w, sim = maps.weights[i], maps.similarity[i]
        titles = ("image", f"weights (max {float(w.max()):.3f})",
                  f"similarity [{float(sim.min()):.2f}, {float(sim.max()):.2f}]")
        for j, (pixels, title) in enumerate(zip((image_pixels, drawn["weights"], drawn["similarity"]), titles)):
            ax = fig.add_subplot(rows, 3, 3 * i + j + 1)
            ax.imshow(pixels)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=9)
            if j == 0:
                ax.set_ylabel(repr(maps.pieces[i]), fontsize=11)
    fig.suptitle(maps.text, fontsize=11)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.5 / height))
    sheet = os.path.join(out_dir, SHEET)
    with atomic_path(sheet) as tmp:
        fig.savefig(tmp, format="png")
    paths.append(sheet)

    summary = maps.summary()
    for token, names in zip(summary["tokens"], files):
        token["files"] = names
    summary["sheet"] = SHEET
    summary_path = os.path.join(out_dir, SUMMARY)
    atomic_write(summary_path, json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    paths.append(summary_path)
    return paths
