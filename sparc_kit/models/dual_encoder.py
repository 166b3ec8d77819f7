"""The dual encoder SPARC trains: two towers, linear adapters into a shared space, poolers, one temperature."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparc_kit.data.tokenizer import PAD_ID
from sparc_kit.models.attention import init_weights
from sparc_kit.models.text import accepts_shorter_context, cut_padding

__all__ = ["DualEncoder"]


class DualEncoder(nn.Module):
    """Image and text towers with SPARC's adapters (paper section 2).

    - ``patch_embeds = g_v(f_v(x))`` [B, P, E] and ``token_embeds = g_t(f_t(x))`` [B, L, E]: linear adapters
      (no bias) on every patch / token.
    - Global image embedding: ``g_v(h_v(pool(f_v)))`` with ``h_v`` one non-linear layer (the paper's text,
      ``image_global_head="linear_gelu"``: one Linear + GELU; ``"mlp"`` is its earlier name), or ``g_v(pool(f_v))`` = the mean of the projected patches (the paper's
      pseudo-code, ``"none"``; equal because ``g_v`` is linear).
    - Global text embedding: ``g_t(masked_mean(f_t))`` = the masked mean of the projected tokens.
    - ``end_id``: when set, tokens with this id (the tokenizer's end-of-caption token) are attended to by the text
      tower but are not among the caption's tokens: neither the text pooler nor the token-level losses see them
      (recipe ``model.text_end_token: exclude``).
    - ``logit_scale``: exp of a learned log scale, initialised to ``1 / init_temperature`` and clamped to
      ``max_logit_scale``, shared by the global and fine-grained losses (Listing 1).

    ``forward`` returns the dict every loss takes its inputs from: ``image_embeds``, ``patch_embeds``,
    ``text_embeds``, ``token_embeds``, ``token_mask``, ``logit_scale``. Embeddings are not normalised there; the
    losses normalise what their equations normalise.
    """

    def __init__(
        self,
        vision: nn.Module,
        text: nn.Module,
        embed_dim: int,
        image_pooler: nn.Module,
        text_pooler: nn.Module,
        image_global_head: str = "linear_gelu",
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        end_id: int | None = None,
    ):
        super().__init__()
        self.vision = vision
        self.text = text
        self.embed_dim = embed_dim
        self.image_pooler = image_pooler
        self.text_pooler = text_pooler
        vw, tw = vision.output_dim, text.output_dim
        self.vision_adapter = nn.Linear(vw, embed_dim, bias=False)  # g_v
        self.text_adapter = nn.Linear(tw, embed_dim, bias=False)  # g_t
        if image_global_head in ("linear_gelu", "mlp"):
            self.image_global_head: nn.Module = nn.Sequential(nn.Linear(vw, vw), nn.GELU())  # h_v
        elif image_global_head == "none":
            self.image_global_head = nn.Identity()
        else:
            raise ValueError(f"image_global_head must be 'linear_gelu' or 'none', got {image_global_head!r}")
        self.image_global_head.apply(init_weights)
        self.vision_adapter.apply(init_weights)
        self.text_adapter.apply(init_weights)
        self.max_log_logit_scale = math.log(max_logit_scale)
        start = min(max(math.log(1.0 / init_temperature), 0.0), self.max_log_logit_scale)
        self.log_logit_scale = nn.Parameter(torch.tensor(start))
        self.end_id = end_id

    # ---------------------------------------------------------------------------------------------- towers
    def image_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.vision.forward_features(images)
        patch_tokens = feats["patch_tokens"]  # [B, P, Wv]
        pooled = self.image_pooler(patch_tokens, None, cls_token=feats.get("cls_token"))
        return {
            "patch_embeds": self.vision_adapter(patch_tokens),  # [B, P, E]
            "image_embeds": self.vision_adapter(self.image_global_head(pooled)),  # [B, E]
        }

    def text_features(self, token_ids: torch.Tensor, token_mask: torch.Tensor | None = None) -> dict[str, Any]:
        if token_mask is None:
            token_mask = token_ids != PAD_ID
        token_mask = token_mask.bool()
        tokens = self.text(token_ids, token_mask)  # [B, L, Wt]
        if self.end_id is not None:  # the tower attended to the end token; it is not one of the caption's tokens
            token_mask = token_mask & (token_ids != self.end_id)
        pooled = self.text_pooler(tokens, token_mask, cls_token=None)  # [B, Wt]; text towers have no class token
        return {
            "token_embeds": self.text_adapter(tokens),  # [B, L, E]
            "text_embeds": self.text_adapter(pooled),  # [B, E]
            "token_mask": token_mask,
        }

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Global image embeddings [B, E] (unit length unless ``normalize=False``)."""
        out = self.image_features(images)["image_embeds"]
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(
        self, token_ids: torch.Tensor, token_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """Global text embeddings [B, E]; ``token_mask`` defaults to ``token_ids != PAD_ID``.

        The columns that are padding in every caption are cut first when the text tower accepts a shorter
        sequence (the built-in one does; the embeddings are the same, the work on padding goes), except while
        tracing, where a data-dependent length would be recorded as a constant."""
        if token_mask is None:
            token_mask = token_ids != PAD_ID
        if accepts_shorter_context(self.text) and not (
            torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        ):
            token_ids, token_mask = cut_padding(token_ids, token_mask)
        out = self.text_features(token_ids, token_mask)["text_embeds"]
        return F.normalize(out, dim=-1) if normalize else out

    def encode_patches(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Projected patch embeddings [B, P, E], for dense (segmentation, heat-map) use."""
        out = self.image_features(images)["patch_embeds"]
        return F.normalize(out, dim=-1) if normalize else out

    def parameter_bounds(self) -> dict[str, tuple[float, float]]:
        """What the engine clamps after every update (open_clip's practice): the log temperature to
        [0, log max_logit_scale]. Clamping after the update, rather than only in ``forward``, keeps its gradient
        alive at the cap, so it can come back down."""
        return {"log_logit_scale": (0.0, self.max_log_logit_scale)}

    @property
    def logit_scale(self) -> torch.Tensor:
        # The engine clamps the parameter after every update (parameter_bounds); here the value is capped for
        # loops that do not, with the gradient passed straight through: torch.clamp's gradient is 0 at and beyond
        # the bounds, which would freeze a temperature that reached the cap.
        log_scale = self.log_logit_scale
        capped = log_scale + (log_scale.clamp(0.0, self.max_log_logit_scale) - log_scale).detach()
        # reshape: a 0-dim result also when an engine stores the parameter as [1] (DeepSpeed, see engines/)
        return capped.exp().reshape(())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def compile_blocks(self, **options: Any) -> int:
        """``torch.compile`` every transformer block of both towers in place (``nn.Module.compile``, so the state
        dict keeps its names); returns how many. One block's graph serves its identical siblings, so this
        compiles in a fraction of the whole model's time; poolers, adapters and losses stay eager."""
        count = 0
        for name, module in self.named_modules():
            if name.endswith("blocks") and isinstance(module, (nn.ModuleList, nn.Sequential)):
                for block in module:
                    block.compile(**options)
                    count += 1
        return count

    def forward(
        self, images: torch.Tensor, token_ids: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        out = self.image_features(images)
        out.update(self.text_features(token_ids, token_mask))
        out["logit_scale"] = self.logit_scale
        return out
