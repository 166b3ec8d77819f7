"""GLoRIA's local (word-region) loss (Huang et al., ICCV 2021), a baseline of SPARC (Bica et al. 2024, §3).

Shapes: B batch, P patches, L tokens, D embedding width; ``token_mask`` [B, L] is True for real tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sparc_kit.losses.distributed import pairwise_contrast
from sparc_kit.losses.functional import scale_like, wide
from sparc_kit.losses.global_losses import FineWeight, GlobalLossName, GlobalPlusFineLoss, check_global_head_trained
from sparc_kit.registry import losses

__all__ = ["GloriaLoss", "gloria_similarities"]


def gloria_similarities(
    patch_embeds: torch.Tensor,
    token_embeds: torch.Tensor,
    token_mask: torch.Tensor,
    tau2: float = 5.0,
    double_softmax: bool = False,
    tau1: float = 4.0,
) -> torch.Tensor:
    """GLoRIA's word-region matching score ``R(i, k)`` of caption i against image k, [B_text, B_image].

    For every caption i and image k, with raw (un-normalised) tokens ``w`` and patches ``r``::

        s[l, p]  = w_il . r_kp / sqrt(D)                      (SPARC App. D.3: the 1/sqrt(D) is "crucial")
        a[l, p]  = softmax_p( s[l, p] )                       attention of word l over image k's patches
        c_l      = sum_p a[l, p] r_kp                         the word's attended region vector
        R(i, k)  = log sum_{l real} exp( tau2 * cos(w_il, c_l) )

    ``double_softmax`` reproduces the original code's attention instead, ``softmax_p(tau1 * softmax_l(s))``
    (first over the caption's real words, then over patches, as in its AttnGAN-derived ``attention_fn``). The
    default is the single softmax over patches: it is GLoRIA's paper equation and SPARC's description ("attention
    weights by softmax on the patch-token similarity matrix"), and the 1/sqrt(D) scaling SPARC found crucial
    only acts on the attention's sharpness there; in the double form the inner softmax squashes the scores into
    [0, 1] before ``tau1`` sets the sharpness. A caption with no real token has an empty sum; its ``R`` is 0
    against every image (no information, finite gradients).

    Memory: the [B, B, L, P] attention and the [B, B, L, D] attended vectors, O(B^2 L (P + D)).
    """
    words = wide(token_embeds)  # [B, L, D]
    regions = wide(patch_embeds)  # [B, P, D]
    mask = token_mask.bool()
    scores = torch.einsum("ild,kpd->iklp", words, regions) / math.sqrt(words.shape[-1])  # [B_txt, B_img, L, P]
    fill = torch.finfo(scores.dtype).min
    if double_softmax:
        over_words = scores.masked_fill(~mask[:, None, :, None], fill).softmax(dim=2)  # [B_txt, B_img, L, P]
        attn = (tau1 * over_words).softmax(dim=-1)
    else:
        attn = scores.softmax(dim=-1)  # [B_txt, B_img, L, P]
    attended = torch.einsum("iklp,kpd->ikld", attn, regions)  # [B_txt, B_img, L, D]
    cos = (F.normalize(attended, dim=-1) * F.normalize(words, dim=-1)[:, None]).sum(dim=-1)  # [B_txt, B_img, L]
    per_word = (tau2 * cos).masked_fill(~mask[:, None, :], fill)
    match = torch.logsumexp(per_word, dim=-1)  # [B_txt, B_img]
    has_tokens = mask.any(dim=1)[:, None]  # [B_txt, 1]
    return torch.where(has_tokens, match, torch.zeros_like(match))


@losses.register("gloria", check=check_global_head_trained)
class GloriaLoss(GlobalPlusFineLoss):
    """GLoRIA: global contrast plus a contrast of word-region matching scores over all pairs of the batch.

    The local term is the symmetric cross-entropy on ``logit_scale * R`` (:func:`gloria_similarities`): for each
    image over the captions, and for each caption over the images, averaged. The original's fixed ``tau3 = 10``
    is replaced by the model's learned temperature, as SPARC did for every baseline (App. D.3); ``tau2 = 5`` (the
    original's default) sharpens the aggregation over words; sub-word tokens are used directly (SPARC D.3: no
    word-level aggregation). See :func:`gloria_similarities` for ``double_softmax`` and ``tau1``.

    Defaults: ``lambda_g = lambda_f = 1``: GLoRIA's objective is the sum of its global and local losses with equal
    weights. The original sums the two directions of each term; here both terms average them, so the ratio of
    the two terms is unchanged (the total is halved).

    Memory: all pairs, O(B^2 L (P + D)): the most memory-hungry baseline of the paper's cost table (at B = 4,096 it
    needs what the others need at 16,384; SPARC trained it at B = 4,096). With several processes every process
    gathers the patches [B, P, D] and tokens [B, L, D] of all processes (with gradient) and contrasts its own
    samples against the whole global batch (O(B_local B_global L (P + D)) memory per process).
    """

    def __init__(
        self,
        lambda_g: float = 1.0,
        lambda_f: FineWeight = 1.0,
        tau2: float = 5.0,
        double_softmax: bool = False,
        tau1: float = 4.0,
        global_loss: GlobalLossName = "clip",
        local_loss: bool = True,
    ):
        super().__init__(lambda_g=lambda_g, lambda_f=lambda_f, global_loss=global_loss, local_loss=local_loss)
        self.tau2 = tau2
        self.double_softmax = double_softmax
        self.tau1 = tau1

    def fine_loss(
        self, patch_embeds, token_embeds, token_mask, logit_scale
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """GLoRIA's local loss and its (image->text, text->image) logits with rows the query side ([B, B];
        [B_local, B_global] with several processes) and each row's positive column."""
        with torch.autocast(device_type=patch_embeds.device.type, enabled=False):
            scale = scale_like(logit_scale, patch_embeds)

            def scores(images, texts):
                match = gloria_similarities(
                    images[0], texts[0], texts[1], self.tau2, self.double_softmax, self.tau1
                )  # [n_txt, n_img]
                return scale * match.t(), scale * match

            loss, logits_i2t, logits_t2i, targets = pairwise_contrast(
                scores, (patch_embeds,), (token_embeds, token_mask.bool())
            )
        return loss, (logits_i2t, logits_t2i, targets)
