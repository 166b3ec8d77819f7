"""FILIP's token-wise late-interaction loss (Yao et al., ICLR 2022), a baseline of SPARC (Bica et al. 2024, §3).

Shapes: B batch, P patches, L tokens, D embedding width; ``token_mask`` [B, L] is True for real tokens.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from sparc_kit.losses.distributed import pairwise_contrast
from sparc_kit.losses.functional import scale_like, wide
from sparc_kit.losses.global_losses import FineWeight, GlobalLossName, GlobalPlusFineLoss, check_global_head_trained
from sparc_kit.registry import losses

__all__ = ["FilipLoss", "filip_similarities", "drop_tokens"]


def drop_tokens(token_mask: torch.Tensor, rate: float) -> torch.Tensor:
    """A copy of ``token_mask`` [B, L] with ``floor(rate * n_i)`` of caption i's n_i real tokens switched off.

    Which tokens go is drawn with ``torch.rand`` on the mask's device, so it is reproducible under
    ``torch.manual_seed``. The count is exact per caption (not a Bernoulli draw per token) and capped at
    ``n_i - 1``: a caption with a real token always keeps at least one, so FILIP's max and mean over a caption's
    tokens stay defined. Short captions (``rate * n_i < 1``) lose nothing.
    """
    mask = token_mask.bool()
    if rate <= 0:
        return mask
    lengths = mask.sum(dim=1)  # [B]
    # the small epsilon keeps e.g. 0.29 * 100 = 28.999... at 29
    n_drop = torch.floor(lengths.double() * rate + 1e-9).long()
    n_drop = torch.minimum(n_drop, (lengths - 1).clamp_min(0))  # [B]
    scores = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, 2.0)  # [B, L], padding ranks last
    rank = scores.argsort(dim=1).argsort(dim=1)  # [B, L]: 0 = lowest score of the caption
    return mask & ~(rank < n_drop[:, None])


def filip_similarities(
    patch_embeds: torch.Tensor, token_embeds: torch.Tensor, token_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FILIP's late-interaction similarities of every (image i, caption j) pair.

    With l2-normalised patches ``x`` and tokens ``y``::

        s_I(i, j) = 1/P   sum_k       max_{r real} x_ik . y_jr     (each patch takes its best token)
        s_T(i, j) = 1/L_j sum_{r real} max_k       x_ik . y_jr     (each real token takes its best patch)

    Returns ``(s_I, s_T)``, both [B_image, B_text]. Padded tokens are excluded from the max and the mean. A caption
    with no real token has no best token: both similarities are then 0 for it (the cosine of a zero vector,
    the ``F.normalize`` convention), so its values and gradients stay finite.

    Memory: the [B, B, P, L] similarity tensor, O(B^2 L P).
    """
    x = F.normalize(wide(patch_embeds), dim=-1)  # [B, P, D]
    y = F.normalize(wide(token_embeds), dim=-1)  # [B, L, D]
    mask = token_mask.bool()
    sim = torch.einsum("ipd,jld->ijpl", x, y)  # [B_img, B_txt, P, L]
    real = mask[None, :, None, :]  # [1, B_txt, 1, L]
    # a finite fill, not -inf: an all-padding caption would otherwise give -inf maxima and NaN gradients
    best_token = sim.masked_fill(~real, torch.finfo(sim.dtype).min).amax(dim=-1)  # [B_img, B_txt, P]
    has_tokens = mask.any(dim=1)[None, :, None]  # [1, B_txt, 1]
    best_token = torch.where(has_tokens, best_token, torch.zeros_like(best_token))
    s_image = best_token.mean(dim=-1)  # [B_img, B_txt]
    best_patch = sim.amax(dim=2)  # [B_img, B_txt, L]
    best_patch = torch.where(mask[None], best_patch, torch.zeros_like(best_patch))
    s_text = best_patch.sum(dim=-1) / mask.sum(dim=1).clamp_min(1)[None, :]  # [B_img, B_txt]
    return s_image, s_text


@losses.register("filip", check=check_global_head_trained)
class FilipLoss(GlobalPlusFineLoss):
    """FILIP (Yao et al. 2022): contrastive loss on token-wise maximum similarities over all pairs of the batch.

    Image->text InfoNCE uses ``s_I`` (each patch's best token, averaged over patches), text->image uses ``s_T``
    (each real token's best patch, averaged over real tokens), see :func:`filip_similarities`; the two
    cross-entropies are averaged. Patches and tokens are l2-normalised; the learned temperature is the model's
    ``logit_scale``, as SPARC trained every baseline (App. D.3).

    ``token_drop`` (default 0.2, SPARC App. D.3-D.4: FILIP with 20% token dropping) switches off that fraction of
    each caption's real tokens before the late interaction, in training mode only (``.train()``); evaluation
    mode uses every token. See :func:`drop_tokens`: the draw follows torch's RNG, and a caption always keeps at
    least one token. Only the caption tokens of this term are dropped (image patches are all kept); the global
    text embedding, computed by the model from every token, is unaffected.

    Defaults: ``lambda_g = 0``, ``lambda_f = 1``: FILIP alone, the objective of the FILIP paper and of SPARC's
    FILIP rows (Tables 1-6). SPARC also trained a CLIP+FILIP control (Tables 9-10, weights not reported); set
    ``lambda_g`` > 0 (e.g. 0.5, SPARC's lambda_g) for it. With ``lambda_g = 0`` the global embeddings are trained
    only through the patches and tokens they pool, and the model's global image head (``h_v``), when it has one,
    gets no gradient at all (data-parallel wrappers must then allow unused parameters); FILIP's own zero-shot
    and retrieval use the late-interaction similarity, not the global embeddings.

    Memory: all pairs, O(B^2 L P) (the paper's cost table: about 3x CLIP's FLOPs and 1.8x its memory at
    B = 16,384). With several processes every process gathers the patches [B, P, D] and tokens [B, L, D] of all
    processes (with gradient) and scores its own images against every caption and its own captions against every
    image (:func:`~sparc_kit.losses.distributed.pairwise_contrast`): the negatives are the whole global batch, as in
    one process, for an all-gather of B (P + L) D values per step and O(B_local B_global L P) memory per process.
    """

    def __init__(
        self,
        lambda_g: float = 0.0,
        lambda_f: FineWeight = 1.0,
        token_drop: float = 0.2,
        global_loss: GlobalLossName = "clip",
        local_loss: bool = True,
    ):
        super().__init__(lambda_g=lambda_g, lambda_f=lambda_f, global_loss=global_loss, local_loss=local_loss)
        if not 0.0 <= token_drop < 1.0:
            raise ValueError(f"token_drop must be in [0, 1), got {token_drop}")
        self.token_drop = token_drop

    def fine_loss(
        self, patch_embeds, token_embeds, token_mask, logit_scale
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """FILIP's loss and its (image->text, text->image) logits with rows the query side ([B, B]; [B_local,
        B_global] with several processes) and each row's positive column."""
        with torch.autocast(device_type=patch_embeds.device.type, enabled=False):
            mask = token_mask.bool()
            if self.training and self.token_drop > 0:
                mask = drop_tokens(mask, self.token_drop)
            scale = scale_like(logit_scale, patch_embeds)

            def scores(images, texts):
                s_image, s_text = filip_similarities(images[0], texts[0], texts[1])  # [n_img, n_txt] each
                return scale * s_image, scale * s_text.t()  # i2t [n_img, n_txt], t2i [n_txt, n_img]

            loss, logits_i2t, logits_t2i, targets = pairwise_contrast(scores, (patch_embeds,), (token_embeds, mask))
        return loss, (logits_i2t, logits_t2i, targets)

