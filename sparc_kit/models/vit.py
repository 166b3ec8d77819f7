"""A native Vision Transformer that returns patch tokens (SPARC needs every patch, not only a pooled vector)."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import PositiveFloat, PositiveInt

from sparc_kit.models.attention import TransformerTower, Transformer, divisibility_problems, init_weights, transformer_parameter_count
from sparc_kit.registry import vision_encoders

__all__ = ["VisionTransformer"]


def check_vit(recipe: Any, path: str) -> list[str]:
    """The sizes a field alone cannot judge: the patch must tile the image, the heads must divide the width."""
    v = recipe.model.vision
    problems = []
    if v.image_size % v.patch_size:
        divisors = [d for d in range(2, min(v.image_size, 64) + 1) if v.image_size % d == 0][:6]
        problems.append(
            f"{path}.patch_size: {v.patch_size} does not tile {path}.image_size={v.image_size}; use a divisor of "
            f"{v.image_size} ({', '.join(map(str, divisors))}, ...)"
        )
    return problems + divisibility_problems(path, v.width, v.heads)


@vision_encoders.register("vit", supplied=("attention", "grad_checkpointing"), check=check_vit)
class VisionTransformer(TransformerTower):
    """Pre-LN ViT. ``forward_features`` returns ``{"patch_tokens": [B, P, W], "cls_token": [B, W] | None}``.

    The paper's image towers have no class token (the global embedding is average-pooled); ``class_token``
    adds one for the class-token pooler. Sizes: B/32, B/16 = width 768, depth 12, heads 12; L/14 = 1024, 24, 16.

    What CLIP's (open_clip's) and timm's ViTs differ in, each off by default: ``pre_norm`` (a LayerNorm on the
    tokens after the positions are added, before the blocks: CLIP's ``ln_pre``), ``patch_bias: false`` (CLIP's
    patch embedding has no bias), ``act: quick_gelu`` (OpenAI's CLIP weights; open_clip's own use ``gelu``) and
    ``norm_eps`` (1e-5 as torch and CLIP; timm's ViTs use 1e-6). The final LayerNorm is applied to every token
    (CLIP's ``ln_post`` before its class-token pooling, timm's ``norm``).
    """

    def __init__(
        self,
        image_size: PositiveInt = 224,
        patch_size: PositiveInt = 16,
        width: PositiveInt = 768,
        depth: PositiveInt = 12,
        heads: PositiveInt = 12,
        mlp_ratio: PositiveFloat = 4.0,
        in_channels: PositiveInt = 3,
        class_token: bool = False,
        pre_norm: bool = False,
        patch_bias: bool = True,
        act: Literal["gelu", "quick_gelu"] = "gelu",
        norm_eps: PositiveFloat = 1e-5,
        attention: str = "auto",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.num_patches = self.grid**2
        self.width = width
        self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size, bias=patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if class_token else None
        num_tokens = self.num_patches + (1 if class_token else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.pre_norm = nn.LayerNorm(width, eps=norm_eps) if pre_norm else nn.Identity()
        self.transformer = Transformer(width, depth, heads, mlp_ratio, attention, act, norm_eps)
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.apply(init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self.set_grad_checkpointing(grad_checkpointing)

    @staticmethod
    def parameter_count(section: Any, recipe: Any = None) -> int:
        """The parameters of a ``vit`` recipe section, counted from its layers without building it."""
        w, p = section.width, section.patch_size
        tokens = (section.image_size // p) ** 2 + (1 if section.class_token else 0)
        patch_embed = section.in_channels * p * p * w + (w if section.patch_bias else 0)
        norms = (4 if section.pre_norm else 2) * w
        return patch_embed + tokens * w + (w if section.class_token else 0) + norms + transformer_parameter_count(
            w, section.depth, section.mlp_ratio
        )

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        x = embed_patches(images, self.patch_embed)  # [B, P, W]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.transformer(self.pre_norm(x + self.pos_embed)))
        if self.cls_token is not None:
            return {"patch_tokens": x[:, 1:], "cls_token": x[:, 0]}
        return {"patch_tokens": x, "cls_token": None}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)["patch_tokens"]


def embed_patches(images: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(images).flatten(2).transpose(1, 2)`` for a patch convolution (kernel = stride, no padding), as one
    matrix product over the unfolded patches: [B, C, H, W] -> [B, (H/p)(W/p), width].

    The same arithmetic with the convolution's own weights (the state dict keeps ``patch_embed.weight``
    [W, C, p, p]); what changes is the kernel. Under bf16 autocast on the CPU the convolution's backward took
    46 ms per ViT-B/16 batch of 8 against 9 ms for this (fp32: 26 against 20; docs/performance.md). Rows and
    columns past the last whole patch are dropped, as the strided convolution drops them.
    """
    p = conv.kernel_size[0]
    b, c, h, w = images.shape
    gh, gw = h // p, w // p
    if (gh * p, gw * p) != (h, w):
        images = images[:, :, : gh * p, : gw * p]
    patches = images.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)
    return F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)
