"""Global (whole image vs whole caption) contrastive losses, registered under ``loss``.

- ``clip``: CLIP's softmax InfoNCE (SPARC eq. 1).
- ``siglip``: SigLIP's pairwise sigmoid loss (Zhai et al., ICCV 2023) with a learned bias.

Also the plumbing the fine-grained baselines share (:class:`GlobalPlusFineLoss`): one of the two global terms,
weighted by ``lambda_g``, plus the baseline's own term weighted by ``lambda_f`` (the structure of SPARC's eq. 7).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from sparc_kit.losses.distributed import _row_counts, batch_share, gather_rows, world
from sparc_kit.losses.functional import scale_like, wide
from sparc_kit.registry import losses

__all__ = [
    "ClipLoss",
    "SigLipLoss",
    "GlobalPlusFineLoss",
    "GlobalLossName",
    "FineWeight",
    "build_global_term",
    "gather_features",
    "global_logits",
    "logit_diagnostics",
]

GlobalLossName = Literal["clip", "siglip"]

#: ``lambda_f``, the weight of a combined loss's own fine-grained term, with the grid ``sparc ablate --vary lambda_f``
#: sweeps by default (the paper's 0.5, 1, 5, 10)
FineWeight = Annotated[float, Field(json_schema_extra={"ablate_grid": [0.5, 1.0, 5.0, 10.0]})]

#: SigLIP's initial bias (Zhai et al. 2023 initialise t' = log 10 and b = -10), so that at initialisation the
#: B^2 - B negative pairs, which vastly outnumber the B positives, start near their target instead of
#: dominating the first steps.
SIGLIP_INIT_BIAS = -10.0


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """All-gather ``features`` [B, D] from every process, keeping the gradient of the local slice (processes may
    hold different numbers of rows; see :func:`~sparc_kit.losses.distributed.gather_rows`).

    Only the global loss and the all-pairs baselines need other processes' samples; the fine-grained loss is per
    sample.
    """
    return gather_rows(features)[0]


def global_logits(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, local_loss: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine logits (image->text, text->image) and the index of each local positive.

    With several processes and ``local_loss`` the logits are [B_local, B_global] (open_clip's local loss with
    gather-with-grad): each process contrasts its own samples against everyone's, so memory stays linear in
    the global batch. Without ``local_loss`` every process computes the whole [B_global, B_global] matrix.
    """
    image = F.normalize(wide(image_embeds), dim=-1)
    text = F.normalize(wide(text_embeds), dim=-1)
    scale = scale_like(logit_scale, image)
    rank, world_size = world()
    if world_size > 1:
        counts = _row_counts(image.shape[0], image.device)
        (all_image, offset), (all_text, _) = gather_rows(image, counts), gather_rows(text, counts)
        if local_loss:
            logits_i2t = scale * image @ all_text.t()
            logits_t2i = scale * text @ all_image.t()
            targets = torch.arange(image.shape[0], device=image.device) + offset
            return logits_i2t, logits_t2i, targets
        image, text = all_image, all_text
    logits_i2t = scale * image @ text.t()
    targets = torch.arange(image.shape[0], device=image.device)
    return logits_i2t, logits_i2t.t(), targets


@losses.register("clip")
class ClipLoss(nn.Module):
    """CLIP's symmetric InfoNCE on global embeddings (eq. 1): the baseline with no fine-grained term.

    Memory: O(B^2) logits (O(B_local * B_global) with several processes and ``local_loss``). With several
    processes each one sums the cross-entropies of its own rows and divides by its share of the global batch
    (:mod:`sparc_kit.losses.distributed`), so averaging gradients over processes gives the single-process loss.
    """

    def __init__(self, local_loss: bool = True):
        super().__init__()
        self.local_loss = local_loss

    def global_loss(self, image_embeds, text_embeds, logit_scale) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast(device_type=image_embeds.device.type, enabled=False):
            logits_i2t, logits_t2i, targets = global_logits(image_embeds, text_embeds, logit_scale, self.local_loss)
            if self.local_loss or world()[1] == 1:  # rows are this process's samples
                share = batch_share(image_embeds.shape[0], targets.device)
            else:  # every process holds the whole global matrix and its whole mean
                share = torch.tensor(float(targets.shape[0]), device=targets.device)
            ce_sum = F.cross_entropy(logits_i2t, targets, reduction="sum") + F.cross_entropy(
                logits_t2i, targets, reduction="sum"
            )
            loss = 0.5 * ce_sum / share.clamp_min(1e-12)
        with torch.no_grad():
            diag = logit_diagnostics(logits_i2t, logits_t2i, targets, logit_scale)
        return loss, diag

    def forward(self, image_embeds, text_embeds, logit_scale, **_) -> dict[str, torch.Tensor]:
        loss, diag = self.global_loss(image_embeds, text_embeds, logit_scale)
        return {"loss": loss, "global_loss": loss.detach(), **diag}


def logit_diagnostics(logits_i2t, logits_t2i, targets, logit_scale) -> dict[str, torch.Tensor]:
    """big_vision-style extras: accuracy each way and the mean positive / negative logit."""
    n = logits_i2t.shape[0]
    rows = torch.arange(n, device=logits_i2t.device)
    positives = logits_i2t[rows, targets]
    neg_mask = torch.ones_like(logits_i2t, dtype=torch.bool)
    neg_mask[rows, targets] = False
    negatives = logits_i2t[neg_mask]
    i2t = (logits_i2t.argmax(dim=1) == targets).float().mean()
    t2i = (logits_t2i.argmax(dim=1) == targets).float().mean()
    return {
        "i2t_acc": i2t,
        "t2i_acc": t2i,
        "pos_logit": positives.mean(),
        "neg_logit": negatives.mean() if negatives.numel() else positives.new_zeros(()),
        "logit_scale": torch.as_tensor(logit_scale).detach().float(),
    }


@losses.register("siglip")
class SigLipLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss (Zhai et al., ICCV 2023; its Algorithm 1), with a learned bias.

    Every (image i, text j) pair of the batch is an independent binary problem, label ``z_ij = +1`` on the
    diagonal and ``-1`` elsewhere::

        logit_ij = t * cos(x_i, y_j) + b
        L = -1/B * sum_i sum_j log sigmoid(z_ij * logit_ij)

    i.e. summed over the B x B pairs and divided by B, as in the SigLIP paper (not a mean over B^2 pairs).
    ``t`` is the model's ``logit_scale`` (the shared learned temperature 1/tau); ``b`` is this module's learned
    bias, initialised to ``init_bias`` (SigLIP: -10). SigLIP also initialises the scale to 10 (``t' = log 10``);
    that is a *model* setting here: ``model.init_temperature: 0.1`` (the default 0.07 starts at 1/0.07 = 14.3).

    Several processes: each process scores its own images against the texts of every process, gathered with
    gradient by :func:`gather_features` ([B_local, B_global] logits, positives at the process's offset + i). The
    pairs (i, j) over all processes are then each scored exactly once, and dividing by the process's share of the
    global batch (``B_global / world_size``) makes the data-parallel average of the per-process losses equal the
    single-process loss on the global batch (the chunked form of SigLIP's Algorithm 1 computes the same sum by
    passing text chunks round instead of gathering them). Two-process training is tested against one process.

    Memory: O(B^2) logits (O(B_local * B_global) with several processes).
    """

    def __init__(self, init_bias: float = SIGLIP_INIT_BIAS):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def global_loss(self, image_embeds, text_embeds, logit_scale) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast(device_type=image_embeds.device.type, enabled=False):
            image = F.normalize(wide(image_embeds), dim=-1)  # [B, D]
            text = F.normalize(wide(text_embeds), dim=-1)  # [B, D]
            scale = scale_like(logit_scale, image)
            bias = self.bias.to(scale.dtype)
            _, world_size = world()
            all_text, offset = gather_rows(text)  # [B_global, D]
            logits = scale * image @ all_text.t() + bias  # [B_local, B_global]
            n_local = image.shape[0]
            targets = torch.arange(n_local, device=image.device) + offset  # [B_local]
            signs = -torch.ones_like(logits)
            signs[torch.arange(n_local, device=image.device), targets] = 1.0
            loss = -F.logsigmoid(signs * logits).sum() / batch_share(n_local, image.device).clamp_min(1e-12)
        with torch.no_grad():
            if world_size > 1:
                logits_t2i = scale * text @ gather_features(image).t() + bias
            else:
                logits_t2i = logits.t()
            diag = logit_diagnostics(logits, logits_t2i, targets, scale)
            diag["siglip_bias"] = self.bias.detach().float()
        return loss, diag

    def forward(self, image_embeds, text_embeds, logit_scale, **_) -> dict[str, torch.Tensor]:
        loss, diag = self.global_loss(image_embeds, text_embeds, logit_scale)
        return {"loss": loss, "global_loss": loss.detach(), **diag}


def build_global_term(name: GlobalLossName = "clip", local_loss: bool = True) -> ClipLoss | SigLipLoss:
    """The global loss module a combined loss delegates to: ``clip`` (eq. 1) or ``siglip`` (bias init -10)."""
    if name == "clip":
        return ClipLoss(local_loss=local_loss)
    if name == "siglip":
        return SigLipLoss()
    raise ValueError(f"global_loss must be 'clip' or 'siglip', got {name!r}")


def check_global_head_trained(recipe: Any, path: str) -> list[str]:
    """A loss of :class:`GlobalPlusFineLoss` shape trains ``h_v`` (``model.image_global_head: linear_gelu``) through its
    global term only: with ``lambda_g`` 0 that layer never learns, yet zero-shot and retrieval score through
    ``encode_image``, which uses it. Such a recipe is refused rather than evaluated at its initialisation."""
    if recipe.loss.lambda_g == 0 and recipe.model.image_global_head != "none":
        return [
            f"model.image_global_head: {recipe.model.image_global_head!r} (h_v) is trained only by the global term, and {path}.lambda_g is 0, "
            "so evaluation would score through an untrained layer; set model.image_global_head: none (the mean "
            f"of the projected patches, which {path}.name={recipe.loss.name!r} trains), or {path}.lambda_g > 0"
        ]
    return []


class GlobalPlusFineLoss(nn.Module):
    """``lambda_g * L_global + lambda_f * L_fine``: the structure of SPARC's eq. 7, shared by the baselines.

    Subclasses compute their own term and call :meth:`combine`. The global term is ``clip`` (eq. 1) or
    ``siglip`` (:class:`SigLipLoss`, whose learned bias then lives in ``self.global_term``).

    ``lambda_g == 0`` (a baseline trained on its own objective, as FILIP and PACL are in the paper) leaves the
    global term out of the optimised loss: it is still computed, without gradient, for the ``global_loss``
    diagnostic, and the accuracy / logit diagnostics then come from the baseline's own cross-batch logits when it
    has them. With ``global_loss: siglip`` and ``lambda_g: 0`` the SigLIP bias gets no gradient.
    """

    def __init__(
        self,
        lambda_g: float = 0.5,
        lambda_f: float = 1.0,
        global_loss: GlobalLossName = "clip",
        local_loss: bool = True,
    ):
        super().__init__()
        self.lambda_g = lambda_g
        self.lambda_f = lambda_f
        self.global_loss_name = global_loss
        self.global_term = build_global_term(global_loss, local_loss)

    def global_loss(self, image_embeds, text_embeds, logit_scale) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.global_term.global_loss(image_embeds, text_embeds, logit_scale)

    def fine_loss(self, patch_embeds, token_embeds, token_mask, logit_scale) -> tuple[torch.Tensor, Any]:
        """The loss's own term and its cross-batch logits for :meth:`combine` (or None): each baseline's part."""
        raise NotImplementedError

    def forward(
        self, image_embeds, text_embeds, patch_embeds, token_embeds, token_mask, logit_scale, **_
    ) -> dict[str, torch.Tensor]:
        """The loss of the batch: the own term (:meth:`fine_loss`) combined with the global one."""
        fine, logits = self.fine_loss(patch_embeds, token_embeds, token_mask, logit_scale)
        return self.combine(fine, image_embeds, text_embeds, logit_scale, logits)

    def combine(
        self,
        fine_loss: torch.Tensor,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        fine_logits: tuple[torch.Tensor, ...] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The output dict: ``loss`` plus detached diagnostics.

        ``fine_logits`` are the baseline's own (image->text, text->image) logits, rows the query side, for the
        ``fine_i2t_acc`` / ``fine_t2i_acc`` diagnostics (and for all of them when ``lambda_g == 0``): square with
        the positives on the diagonal, or ``(i2t, t2i, targets)`` with each row's positive column (the
        [B_local, B_global] blocks of several processes).
        """
        if self.lambda_g != 0:
            global_loss, diag = self.global_loss(image_embeds, text_embeds, logit_scale)
            loss = self.lambda_g * global_loss + self.lambda_f * fine_loss
        else:
            with torch.no_grad():
                global_loss, diag = self.global_loss(image_embeds, text_embeds, logit_scale)
            loss = self.lambda_f * fine_loss
        out = {"loss": loss, "global_loss": global_loss.detach(), "fine_loss": fine_loss.detach()}
        if fine_logits is not None:
            with torch.no_grad():
                logits_i2t, logits_t2i = (x.detach() for x in fine_logits[:2])
                targets = (
                    fine_logits[2]
                    if len(fine_logits) > 2
                    else torch.arange(logits_i2t.shape[0], device=logits_i2t.device)
                )
                fine_diag = logit_diagnostics(logits_i2t, logits_t2i, targets, logit_scale)
            out["fine_i2t_acc"] = fine_diag["i2t_acc"]
            out["fine_t2i_acc"] = fine_diag["t2i_acc"]
            if self.lambda_g == 0:
                diag = {**diag, **fine_diag}
        out.update(diag)
        return out
