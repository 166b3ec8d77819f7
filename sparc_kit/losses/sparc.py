"""The SPARC objective as a registered loss module (eq. 7)."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from sparc_kit.losses.diagnostics import diagnostics_enabled
from sparc_kit.losses.functional import average_denominator, sparc_alignment_weights, sparc_fine_grained_loss, wide
from sparc_kit.losses.distributed import share_gradient
from sparc_kit.losses.global_losses import FineWeight, GlobalLossName, GlobalPlusFineLoss, check_global_head_trained
from sparc_kit.registry import losses

__all__ = ["SparcLoss"]


@losses.register("sparc", check=check_global_head_trained)
class SparcLoss(GlobalPlusFineLoss):
    """``lambda_g * L_global + lambda_f * L_fine`` (eq. 7): CLIP's global loss plus SPARC's fine-grained loss.

    ``sparsity_threshold`` is sigma of eq. 3 (None: 1/P, the paper's choice); ``average`` is "token" (the
    paper's pseudo-code) or "caption" (eq. 6); ``weighting`` is "sparse" (the method), "dense" (no threshold) or
    "softmax" (the paper's ablation rows). The fine-grained term is per sample: memory O(B L P), no all-gather.

    ``global_loss`` picks the global term, as for every combined loss (:class:`GlobalPlusFineLoss`): "clip"
    (eq. 1, the paper) or "siglip" (:class:`SigLipLoss`, the sigmoid loss with a learned bias initialised to -10;
    the bias is then this module's parameter ``global_term.bias``, optimised and checkpointed with it). The
    fine-grained term keeps its softmax contrast either way. ``lambda_g: 0`` leaves the global term out of the
    optimised loss (it is still computed, without gradient, for its diagnostics).

    Diagnostics (computed when :func:`~sparc_kit.losses.diagnostics.diagnostics_enabled`: the training loop
    asks for them on logged steps only): the fraction of each token's patches the threshold itself removed, the
    mean number of patches a real token groups, and the *shortcut gap*: the fine-grained loss recomputed (no
    gradient) with each caption paired with the next image's patches, minus the real one. A gap near zero means
    the fine-grained loss is being solved from the text alone.

    ``chunk_size``: compute the fine-grained term over groups of this many pairs, recomputed in the backward pass,
    so its saved intermediates are one group's (null: the whole batch at once, the fastest while memory allows).
    """

    def __init__(
        self,
        lambda_g: float = 0.5,
        lambda_f: FineWeight = 1.0,
        sparsity_threshold: Annotated[
            float | None,
            Field(json_schema_extra={"ablate_grid": [0.0, 0.5, 1.0, 2.0, 4.0], "ablate_grid_unit": "1/num_patches"}),
        ] = None,
        average: Literal["token", "caption"] = "token",
        weighting: Literal["sparse", "dense", "softmax"] = "sparse",
        global_loss: GlobalLossName = "clip",
        local_loss: bool = True,
        diagnostics: bool = True,
        chunk_size: Annotated[int | None, Field(gt=0)] = None,
    ):
        super().__init__(lambda_g=lambda_g, lambda_f=lambda_f, global_loss=global_loss, local_loss=local_loss)
        self.sparsity_threshold = sparsity_threshold
        self.average = average
        self.weighting = weighting
        self.diagnostics = diagnostics
        self.chunk_size = chunk_size
        self._register_load_state_dict_pre_hook(_earlier_bias_name)

    def fine_loss(self, patch_embeds, token_embeds, token_mask, logit_scale, return_weights=False, denominator=None):
        return sparc_fine_grained_loss(
            patch_embeds,
            token_embeds,
            token_mask,
            logit_scale,
            threshold=self.sparsity_threshold,
            average=self.average,
            weighting=self.weighting,
            return_weights=return_weights,
            denominator=denominator,
            chunk_size=self.chunk_size,
        )

    def forward(
        self,
        image_embeds,
        text_embeds,
        patch_embeds,
        token_embeds,
        token_mask,
        logit_scale,
        live_rows: slice | None = None,
        live_passes: int = 1,
        **_,
    ) -> dict[str, torch.Tensor]:
        """The loss of the batch. ``live_rows`` (one of ``live_passes`` micro-batches of an accumulated step): only
        those rows carry gradient, the rest are cached features; the per-sample fine-grained term is then
        computed on those rows alone, divided by the count of the whole batch, so the micro-batches' terms add up
        to the whole batch's, and the global term (the whole batch's in every pass) gives the logit scale
        ``1 / live_passes`` of its gradient (diagnostics are left to the caller's pass over the whole batch)."""
        if live_rows is not None:
            denominator = average_denominator(token_mask, self.average)
            rows = (patch_embeds[live_rows], token_embeds[live_rows], token_mask[live_rows])
            fine_loss = self.fine_loss(*rows, logit_scale, denominator=denominator)
            out = self.combine(fine_loss, image_embeds, text_embeds, share_gradient(logit_scale, live_passes))
            return {key: out[key] for key in ("loss", "global_loss", "fine_loss")}
        diagnose = self.diagnostics and diagnostics_enabled()
        fine_loss = self.fine_loss(patch_embeds, token_embeds, token_mask, logit_scale, return_weights=diagnose)
        if diagnose:
            fine_loss, weights = fine_loss
        out = self.combine(fine_loss, image_embeds, text_embeds, logit_scale)
        if diagnose:
            with torch.no_grad():
                out.update(self._sparsity_stats(weights, patch_embeds, token_embeds, token_mask))
                rolled = self.fine_loss(patch_embeds.roll(1, dims=0), token_embeds, token_mask, logit_scale)
                # one pair: rolling pairs it with itself, so the gap is 0 (no other image to tell apart)
                out["shortcut_gap"] = rolled - fine_loss.detach()
        return out

    def _sparsity_stats(self, weights, patch_embeds, token_embeds, token_mask) -> dict[str, torch.Tensor]:
        """``patches_per_token``: patches a real token groups (non-zero weights). ``zeroed_fraction``: the
        share of a real token's P patches that the threshold itself removed, i.e. that have a non-zero weight
        without it (``dense``) and zero with it: 0 for ``dense`` and ``softmax``. (Min-max normalisation maps
        each row's least similar patch to exactly 0 whatever the threshold; that patch is not counted.)"""
        mask = token_mask.bool()
        real = mask.sum().clamp_min(1)
        kept = (weights > 0).sum(dim=-1).to(torch.float32)  # [B, L]
        if self.weighting == "sparse":
            similarity = torch.einsum("bld,bpd->blp", wide(token_embeds), wide(patch_embeds))
            without = (sparc_alignment_weights(similarity, weighting="dense") > 0).sum(dim=-1).to(torch.float32)
        else:
            without = kept
        removed = ((without - kept) * mask).sum() / real
        return {
            "patches_per_token": (kept * mask).sum() / real,
            "zeroed_fraction": removed / weights.shape[-1],
        }


def _earlier_bias_name(state_dict, prefix, *_):
    """Checkpoints written before SPARC shared the combined losses' global term named its SigLIP bias
    ``siglip.bias``; they load as ``global_term.bias``."""
    old = prefix + "siglip.bias"
    if old in state_dict:
        state_dict[prefix + "global_term.bias"] = state_dict.pop(old)
