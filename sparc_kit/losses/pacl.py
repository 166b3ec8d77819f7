"""PACL's patch-aligned contrastive loss (Mukhoti et al., CVPR 2023), a baseline of SPARC (Bica et al. 2024, §3).

Shapes: B batch, P patches, D embedding width.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from sparc_kit.losses.distributed import pairwise_contrast
from sparc_kit.losses.functional import scale_like, wide
from sparc_kit.losses.global_losses import FineWeight, GlobalLossName, GlobalPlusFineLoss, check_global_head_trained
from sparc_kit.registry import losses

__all__ = ["PaclLoss", "pacl_similarities"]


def pacl_similarities(
    patch_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    attn_scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """PACL's compatibility ``phi(i, j)`` of every (image i, text j) pair, [B_image, B_text].

    For each pair (PACL's compatibility function)::

        a_ij[p] = softmax_p( attn_scale * cos(v_ip, t_j) )       text-conditioned weights over image i's patches
        z_ij    = sum_p a_ij[p] v_ip                             weighted image embedding, one per text
        phi(i, j) = cos(z_ij, t_j)

    ``v`` are the projected (un-normalised) patch embeddings, ``t`` the global text embeddings. The pooled image
    embedding depends on the text it is compared with, so every pair needs its own weights.

    Memory: the [B, B, P] weights and the [B, B, D] pooled embeddings, O(B^2 (P + D)).
    """
    patches = wide(patch_embeds)  # [B, P, D]
    text = F.normalize(wide(text_embeds), dim=-1)  # [B, D]
    cos = torch.einsum("ipd,jd->ijp", F.normalize(patches, dim=-1), text)  # [B_img, B_txt, P]
    weights = (attn_scale * cos).softmax(dim=-1)  # [B_img, B_txt, P]
    pooled = torch.einsum("ijp,ipd->ijd", weights, patches)  # [B_img, B_txt, D]
    return (F.normalize(pooled, dim=-1) * text[None]).sum(dim=-1)  # [B_img, B_txt]


@losses.register("pacl", check=check_global_head_trained)
class PaclLoss(GlobalPlusFineLoss):
    """PACL: InfoNCE between a text-conditioned softmax pooling of the patches and the global text embedding.

    See :func:`pacl_similarities` for the compatibility ``phi(i, j)``; the loss is the symmetric cross-entropy on
    ``logit_scale * phi`` (image->text over rows, text->image over columns), with the model's learned temperature
    (SPARC App. D.4: PACL as in its paper plus a learnable temperature). PACL's frozen backbones and residual MLP
    adapters do not apply to SPARC's from-scratch setting; the model's linear adapters stand in for them.

    ``attn_scale`` multiplies the patch-text cosines inside the patch softmax. The default 1.0 is PACL's formula
    as written (a plain softmax of cosines). It keeps the weights soft: cosines lie in [-1, 1], so no patch can
    weigh more than e^2 (about 7.4) times another, and early in training the pooling is close to a mean. A
    larger fixed value (an annotated third-party re-implementation uses 10) sharpens it; ``None`` uses the model's
    learned ``logit_scale``, the same temperature as the contrast (then the scale also gets gradient through the
    weights).

    Defaults: ``lambda_g = 0``, ``lambda_f = 1``: PACL's objective replaces CLIP's (its "modified compatibility
    function for CLIP's contrastive loss"); set ``lambda_g`` > 0 to add a global term. With ``lambda_g = 0`` the
    global image embedding is not used, so the model's global image head (``h_v``), when it has one, gets no
    gradient (see :class:`~sparc_kit.losses.filip.FilipLoss`).

    Memory: all pairs, O(B^2 (P + D)) (the paper's cost table: about 1.7x CLIP's memory at B = 16,384). With several
    processes every process gathers the patches [B, P, D] and text embeddings of all processes (with gradient)
    and contrasts its own samples against the whole global batch (O(B_local B_global (P + D)) memory per process).
    """

    def __init__(
        self,
        lambda_g: float = 0.0,
        lambda_f: FineWeight = 1.0,
        attn_scale: float | None = 1.0,
        global_loss: GlobalLossName = "clip",
        local_loss: bool = True,
    ):
        super().__init__(lambda_g=lambda_g, lambda_f=lambda_f, global_loss=global_loss, local_loss=local_loss)
        self.attn_scale = attn_scale

    def fine_loss(
        self, patch_embeds, text_embeds, logit_scale
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """PACL's loss and its (image->text, text->image) logits with rows the query side ([B, B]; [B_local,
        B_global] with several processes) and each row's positive column."""
        with torch.autocast(device_type=patch_embeds.device.type, enabled=False):
            scale = scale_like(logit_scale, patch_embeds)
            attn_scale = scale if self.attn_scale is None else self.attn_scale

            def scores(images, texts):
                logits = scale * pacl_similarities(images[0], texts[0], attn_scale)  # [n_img, n_txt]
                return logits, logits.t()

            loss, logits_i2t, logits_t2i, targets = pairwise_contrast(scores, (patch_embeds,), (text_embeds,))
        return loss, (logits_i2t, logits_t2i, targets)

    def forward(self, image_embeds, text_embeds, patch_embeds, logit_scale, **_) -> dict[str, torch.Tensor]:
        fine, logits = self.fine_loss(patch_embeds, text_embeds, logit_scale)
        return self.combine(fine, image_embeds, text_embeds, logit_scale, logits)
