"""Global (whole image vs whole caption) contrastive losses, registered under ``loss``."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from sparc_kit.registry import losses

__all__ = ["ClipLoss", "gather_features", "global_logits"]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """All-gather ``features`` [B, D] from every process, keeping the gradient of the local slice.

    Only the global loss needs other processes' samples; the fine-grained loss is per sample.
    """
    rank, world = _world()
    if world == 1:
        return features
    import torch.distributed.nn.functional as dist_nn

    return torch.cat(dist_nn.all_gather(features), dim=0)


def global_logits(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, local_loss: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine logits (image->text, text->image) and the index of each local positive.

    With several processes and ``local_loss`` the logits are [B_local, B_global] (open_clip's local loss with
    gather-with-grad): each process contrasts its own samples against everyone's, so memory stays linear in
    the global batch.
    """
    image = F.normalize(image_embeds.float(), dim=-1)
    text = F.normalize(text_embeds.float(), dim=-1)
    scale = logit_scale.float()
    rank, world = _world()
    if world > 1:
        all_image, all_text = gather_features(image), gather_features(text)
        if local_loss:
            logits_i2t = scale * image @ all_text.t()
            logits_t2i = scale * text @ all_image.t()
            targets = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
            return logits_i2t, logits_t2i, targets
        image, text = all_image, all_text
    logits_i2t = scale * image @ text.t()
    targets = torch.arange(image.shape[0], device=image.device)
    return logits_i2t, logits_i2t.t(), targets


@losses.register("clip")
class ClipLoss(nn.Module):
    """CLIP's symmetric InfoNCE on global embeddings (eq. 1): the baseline with no fine-grained term.

    Memory: O(B^2) logits (O(B_local * B_global) with several processes and ``local_loss``).
    """

    def __init__(self, local_loss: bool = True):
        super().__init__()
        self.local_loss = local_loss

    def global_loss(self, image_embeds, text_embeds, logit_scale) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast(device_type=image_embeds.device.type, enabled=False):
            logits_i2t, logits_t2i, targets = global_logits(image_embeds, text_embeds, logit_scale, self.local_loss)
            loss = 0.5 * (F.cross_entropy(logits_i2t, targets) + F.cross_entropy(logits_t2i, targets))
        with torch.no_grad():
            diag = _logit_diagnostics(logits_i2t, logits_t2i, targets, logit_scale)
        return loss, diag

    def forward(self, image_embeds, text_embeds, logit_scale, **_) -> dict[str, torch.Tensor]:
        loss, diag = self.global_loss(image_embeds, text_embeds, logit_scale)
        return {"loss": loss, "global_loss": loss.detach(), **diag}


def _logit_diagnostics(logits_i2t, logits_t2i, targets, logit_scale) -> dict[str, torch.Tensor]:
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
        "logit_scale": logit_scale.detach().float(),
    }

