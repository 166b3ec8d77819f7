"""Other projects' weights under this model's names: open_clip CLIP checkpoints and timm ViTs (``model.init_from``).

Each ``*_names`` function maps a source state dict to ``{model name: (source name, tensor)}`` plus the source
names that map to nothing; :func:`fit_weights` then checks every tensor against the built model (resampling
position embeddings to the recipe's image size and context length) and loads them. Reading the file and the
recipe section is :mod:`sparc_kit.train.init_from`'s; nothing here touches a file.

open_clip's layout (``open_clip.model.CLIP``), and where each tensor goes:

- ``visual.conv1`` (no bias) -> ``vision.patch_embed``; ``visual.class_embedding`` [W] -> ``vision.cls_token``;
  ``visual.positional_embedding`` [1 + P, W] -> ``vision.pos_embed``; ``visual.ln_pre`` -> ``vision.pre_norm``;
  ``visual.ln_post`` -> ``vision.norm``; ``visual.proj`` [W, E] (``x @ proj``) -> ``vision_adapter.weight`` = its
  transpose (the adapter has no bias, as ``proj`` has none);
- each block (``transformer.resblocks.N``): ``ln_1`` / ``ln_2`` -> ``norm1`` / ``norm2``; ``attn.in_proj_*``
  (``nn.MultiheadAttention``'s fused q, k, v rows, in that order, each head's rows together) -> ``attn.qkv``, the
  same row layout; ``attn.out_proj`` -> ``attn.proj``; ``mlp.c_fc`` / ``mlp.c_proj`` -> ``mlp.fc1`` / ``mlp.fc2``;
- ``token_embedding``, ``positional_embedding``, ``ln_final`` -> ``text.token_embed``, ``text.pos_embed``,
  ``text.norm``; ``text_projection`` [W, E] -> ``text_adapter.weight`` (transposed); ``logit_scale`` (a log) ->
  ``log_logit_scale``. A ``text.`` prefix (open_clip's CustomTextCLIP) is read the same way.

timm's ``vision_transformer`` names are this ViT's but for ``patch_embed.proj`` (-> ``patch_embed``) and
``norm_pre`` (-> ``pre_norm``); its classification head (``head``, ``fc_norm``, ...) is set aside, not reported.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sparc_kit.errors import RecipeError
from sparc_kit.models.timm_encoder import HEAD_PREFIXES

__all__ = ["open_clip_names", "timm_names", "sparc_names", "resample_grid", "resample_sequence", "fit_weights", "Fitted"]

FIELD = "model.init_from"

Mapped = dict[str, tuple[str, torch.Tensor]]

_BLOCK = {  # open_clip's block names -> this package's
    "ln_1": "norm1",
    "ln_2": "norm2",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight",
    "attn.out_proj.bias": "attn.proj.bias",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_BLOCK_KEY = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def _block_name(rest: str) -> str | None:
    """``transformer.resblocks.N.ln_1.weight`` -> ``transformer.blocks.N.norm1.weight`` (None if unknown)."""
    found = _BLOCK_KEY.match(rest)
    if not found:
        return None
    index, inner = found.groups()
    for source, target in _BLOCK.items():
        if inner == source or inner.startswith(source + "."):
            return f"transformer.blocks.{index}.{target}{inner[len(source):]}"
    return None


def _tower(rest: str, fixed: dict[str, str]) -> str | None:
    for source, target in fixed.items():
        if rest == source or rest.startswith(source + "."):
            return target + rest[len(source):]
    return _block_name(rest)


_VISUAL = {"conv1": "patch_embed", "ln_pre": "pre_norm", "ln_post": "norm"}
_TEXT = {"token_embedding": "token_embed", "ln_final": "norm"}


def open_clip_names(state: dict[str, torch.Tensor]) -> tuple[Mapped, list[str]]:
    """An open_clip CLIP state dict under this model's names; and the names that map to nothing."""
    mapped: Mapped = {}
    unmapped: list[str] = []
    for name, tensor in state.items():
        target, value = None, tensor
        if name.startswith("visual."):
            rest = name[len("visual."):]
            if rest == "class_embedding":
                target, value = "vision.cls_token", tensor.reshape(1, 1, -1)
            elif rest == "positional_embedding":
                target, value = "vision.pos_embed", tensor.reshape(1, *tensor.shape[-2:])
            elif rest == "proj":
                target, value = "vision_adapter.weight", tensor.t()
            else:
                inner = _tower(rest, _VISUAL)
                target = f"vision.{inner}" if inner else None
        elif name == "logit_scale":
            target, value = "log_logit_scale", tensor.reshape(())
        else:
            rest = name[len("text."):] if name.startswith("text.") else name
            if rest == "positional_embedding":
                target, value = "text.pos_embed", tensor.reshape(1, *tensor.shape[-2:])
            elif rest == "text_projection":
                target, value = "text_adapter.weight", tensor.t()
            elif rest == "text_projection.weight":  # a Linear projection (proj_bias); its bias has no place here
                target = "text_adapter.weight"
            else:
                inner = _tower(rest, _TEXT)
                target = f"text.{inner}" if inner else None
        if target is None:
            unmapped.append(name)
        else:
            mapped[target] = (name, value)
    return mapped, unmapped


_TIMM = {"patch_embed.proj": "patch_embed", "norm_pre": "pre_norm"}


def timm_names(state: dict[str, torch.Tensor], into_timm: bool) -> tuple[Mapped, list[str]]:
    """A timm ViT state dict under the native ViT's names (``into_timm``: under the timm encoder's, which are
    timm's own); the classification head's tensors are left out, neither mapped nor reported."""
    mapped: Mapped = {}
    for name, tensor in state.items():
        if name.startswith(HEAD_PREFIXES):
            continue
        if into_timm:
            mapped[f"vision.model.{name}"] = (name, tensor)
            continue
        inner = next((t + name[len(s):] for s, t in _TIMM.items() if name == s or name.startswith(s + ".")), name)
        inner = inner.replace("blocks.", "transformer.blocks.", 1) if inner.startswith("blocks.") else inner
        mapped[f"vision.{inner}"] = (name, tensor)
    return mapped, []


def sparc_names(state: dict[str, torch.Tensor]) -> tuple[Mapped, list[str]]:
    """A sparc-kit model's state dict: its names are this model's."""
    return {name: (name, tensor) for name, tensor in state.items()}, []


# ------------------------------------------------------------------------------------------ position embeddings


def _prefix(tokens: int) -> int | None:
    """How many leading positions are not grid cells (a class token): ``tokens - g*g`` when that is 0 or 1."""
    extra = tokens - math.isqrt(tokens) ** 2
    return extra if extra in (0, 1) else None


def resample_grid(pos: torch.Tensor, tokens: int) -> tuple[torch.Tensor, str]:
    """ViT positions [1, prefix + g*g, W] resampled to ``tokens`` positions: the patch grid by bicubic
    interpolation (``align_corners=False``), the class token's position kept (dropped or zero-filled when only
    one side has a class token). Returns the tensor and what was done, in words."""
    have, want = _prefix(pos.shape[1]), _prefix(tokens)
    if have is None or want is None:
        raise ValueError(f"{pos.shape[1]} and {tokens} positions are not a class token and a square patch grid")
    grid = pos[:, have:]
    g, h = math.isqrt(grid.shape[1]), math.isqrt(tokens - want)
    notes = []
    if g != h:
        cells = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
        cells = F.interpolate(cells, size=(h, h), mode="bicubic", align_corners=False)
        grid = cells.permute(0, 2, 3, 1).reshape(1, h * h, -1).to(pos.dtype)
        notes.append(f"patch grid {g}x{g} -> {h}x{h} (bicubic)")
    if want and have:
        grid = torch.cat([pos[:, :1], grid], dim=1)
    elif want:
        grid = torch.cat([torch.zeros_like(pos[:, :1]), grid], dim=1)
        notes.append("class-token position zero (the file has none)")
    elif have:
        notes.append("class-token position dropped (the model has no class token)")
    return grid, ", ".join(notes)


def resample_sequence(pos: torch.Tensor, tokens: int) -> tuple[torch.Tensor, str]:
    """Text positions [1, L, W] to ``tokens`` positions: the first ``tokens`` when fewer (exact for captions that
    fit), linear interpolation when more."""
    n = pos.shape[1]
    if tokens <= n:
        return pos[:, :tokens], f"context {n} -> {tokens} (first {tokens} kept)"
    longer = F.interpolate(pos.transpose(1, 2).float(), size=tokens, mode="linear", align_corners=False)
    return longer.transpose(1, 2).to(pos.dtype), f"context {n} -> {tokens} (linear)"


_GRID_POSITIONS = ("vision.pos_embed", "vision.model.pos_embed")
_SEQUENCE_POSITIONS = ("text.pos_embed",)


# ----------------------------------------------------------------------------------------------------- loading


@dataclass
class Fitted:
    """What :func:`fit_weights` did: tensors loaded, resampled (with how), unmapped, and left at initialisation."""

    loaded: list[str] = field(default_factory=list)
    resampled: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    unset: list[str] = field(default_factory=list)  # model tensors the file covers but did not hold
    kept: list[str] = field(default_factory=list)  # model tensors outside what the format covers
    clamped: str | None = None


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


def _count(names: list[str]) -> str:
    return f"{len(names)} tensor{'' if len(names) == 1 else 's'}"


def _listed(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def fit_weights(
    model: torch.nn.Module,
    mapped: Mapped,
    unmapped: list[str],
    covers: tuple[str, ...],
    strict: bool,
    source: str,
    bounds: dict[str, tuple[float, float]] | None = None,
) -> Fitted:
    """Check ``mapped`` against ``model`` and load it; return what was done.

    A tensor whose shape cannot fit (another width, depth of MLP, vocabulary) is a :class:`RecipeError` naming
    both tensors and shapes, whatever ``strict`` says; positions are resampled. ``covers``: the name prefixes of
    the model that the format fills (``""``: all). With ``strict``, source tensors that map to nothing and
    covered model tensors the file does not hold are refused too, one line for each kind. ``bounds``: the
    model's clamped parameters (the temperature), clamped on load.
    """
    target = model.state_dict()
    fitted = Fitted(unmapped=list(unmapped))
    problems: list[str] = []
    values: dict[str, torch.Tensor] = {}
    for name, (origin, tensor) in mapped.items():
        if name not in target:
            fitted.unmapped.append(origin)
            continue
        want = target[name]
        if tensor.shape != want.shape and tensor.dim() == want.dim() == 3 and tensor.shape[-1] == want.shape[-1]:
            try:
                if name in _GRID_POSITIONS:
                    tensor, note = resample_grid(tensor, want.shape[1])
                    fitted.resampled[name] = note
                elif name in _SEQUENCE_POSITIONS:
                    tensor, note = resample_sequence(tensor, want.shape[1])
                    fitted.resampled[name] = note
            except ValueError:
                pass
        if tensor.shape != want.shape:
            problems.append(f"{origin} {_shape(tensor)} in {source} does not fit {name} {_shape(want)} of the model")
            continue
        values[name] = tensor.to(want.dtype)
    if problems:  # one line: the first tensor that does not fit says what to change
        more = f" (and {len(problems) - 1} more tensors)" if len(problems) > 1 else ""
        raise RecipeError([
            f"{FIELD}: {problems[0]}{more}; make the recipe's sizes (width, mlp_ratio, patch_size, embed_dim, "
            "tokenizer.vocab_size) those of the file"
        ])
    for name, (low, high) in (bounds or {}).items():
        if name in values and not low <= float(values[name]) <= high:
            fitted.clamped = f"{name} {float(values[name]):.4g} clamped to [{low:.4g}, {high:.4g}]"
            values[name] = values[name].clamp(low, high)
    for name in target:
        if name in values:
            fitted.loaded.append(name)
        elif any(name.startswith(prefix) for prefix in covers):
            fitted.unset.append(name)
        else:
            fitted.kept.append(name)
    if strict and (fitted.unmapped or fitted.unset):
        lines = []
        if fitted.unmapped:
            lines.append(
                f"{FIELD}: {_count(fitted.unmapped)} of {source} with no place in the model: "
                f"{_listed(fitted.unmapped)} (is the format right? model.init_from.strict=false loads the rest)"
            )
        if fitted.unset:
            lines.append(
                f"{FIELD}: {source} holds no value for {_count(fitted.unset)} of the model: "
                f"{_listed(fitted.unset)} (check the recipe's architecture options; model.init_from.strict=false "
                "keeps their initialisation)"
            )
        raise RecipeError(lines)
    with torch.no_grad():
        own = dict(model.named_parameters())
        own.update(dict(model.named_buffers()))
        for name, tensor in values.items():
            own[name].copy_(tensor)
    return fitted
