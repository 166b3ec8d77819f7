"""MGCA (Wang et al., NeurIPS 2022), a baseline of SPARC (Bica et al. 2024, §3): instance-wise alignment (the
global term), cross-modal token alignment and cross-modal prototype alignment.

Shapes: B batch, P patches, L tokens, E embedding width, d attention width; ``token_mask`` [B, L] is True for
real tokens.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import NonNegativeFloat, PositiveFloat, PositiveInt
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

from sparc_kit.losses.distributed import gather_rows
from sparc_kit.losses.functional import masked_pairwise_contrastive_loss, scale_like, wide
from sparc_kit.losses.global_losses import FineWeight, GlobalLossName, GlobalPlusFineLoss, check_global_head_trained
from sparc_kit.registry import losses

__all__ = ["MgcaLoss", "CrossAttention", "Prototypes", "sinkhorn_knopp"]


class CrossAttention(LazyModuleMixin, nn.Module):
    """One attention head of width ``attn_dim``: each query vector attends to a context sequence.

    ``out = W_o softmax_k( (W_q x)(W_k y_k)^T / sqrt(d) ) W_v y_k``: ``nn.MultiheadAttention`` with one head whose
    inner width is ``attn_dim`` (SPARC App. D.4: 1 head, 128-d) rather than the embedding width, no biases.
    ``W_q``, ``W_k``, ``W_v`` are [d, E]; ``W_o`` is [E, d], so the output lives in the embedding space of the
    queries, where it is compared with them.

    ``embed_dim=None`` leaves the four matrices uninitialised until the first call (a lazy module: E is read
    off the input). An optimizer may be built before that call (it sees the same parameter objects), and a
    checkpoint loads into it, but anything that reads a parameter's size first (``numel``, DDP) needs a dry
    forward or an explicit ``embed_dim``.
    """

    def __init__(self, embed_dim: int | None, attn_dim: int = 128):
        super().__init__()
        self.attn_dim = attn_dim
        if embed_dim is None:
            new = lambda *shape: UninitializedParameter()  # noqa: E731
        else:
            new = lambda *shape: nn.Parameter(torch.empty(*shape))  # noqa: E731
        e = embed_dim or 0
        self.q_proj = new(attn_dim, e)
        self.k_proj = new(attn_dim, e)
        self.v_proj = new(attn_dim, e)
        self.out_proj = new(e, attn_dim)
        if embed_dim is not None:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(weight)  # nn.MultiheadAttention's initialisation of its projections

    def initialize_parameters(self, query: torch.Tensor, context: torch.Tensor, *args, **kwargs) -> None:
        if self.has_uninitialized_params():
            embed_dim = query.shape[-1]
            with torch.no_grad():
                for weight in (self.q_proj, self.k_proj, self.v_proj):
                    weight.materialize((self.attn_dim, embed_dim))
                self.out_proj.materialize((embed_dim, self.attn_dim))
                self.reset_parameters()

    def forward(
        self, query: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``query`` [B, Q, E] attends to ``context`` [B, K, E] (``context_mask`` [B, K], True = may be attended).

        Returns [B, Q, E]. A query whose context is entirely masked attends uniformly (finite, to be dropped by
        the caller).
        """
        if query.shape[-1] != self.q_proj.shape[1]:
            raise ValueError(
                f"the cross-attention was built for {self.q_proj.shape[1]}-d embeddings but got {query.shape[-1]}-d; "
                "set the loss's embed_dim to the model's embed_dim, or leave it unset to infer it"
            )
        q = query @ self.q_proj.t()  # [B, Q, d]
        k = context @ self.k_proj.t()  # [B, K, d]
        v = context @ self.v_proj.t()  # [B, K, d]
        scores = q @ k.transpose(1, 2) / math.sqrt(self.attn_dim)  # [B, Q, K]
        if context_mask is not None:
            scores = scores.masked_fill(~context_mask.bool()[:, None, :], torch.finfo(scores.dtype).min)
        return (scores.softmax(dim=-1) @ v) @ self.out_proj.t()  # [B, Q, E]


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Soft cluster assignments [B, K] of B samples to K prototypes from their similarities ``scores`` [B, K]
    (SwAV's equipartition, which MGCA's prototype alignment uses): ``Q = exp(scores / epsilon)``, then
    ``iterations`` rounds of scaling every prototype's total to 1/K and every sample's to 1/B; returned scaled so
    that each sample's row sums to 1. No gradient flows through the assignments (they are targets).

    Computed in float32 or wider, with the largest score subtracted first so that ``exp`` cannot overflow (the
    result is unchanged: the first normalisation divides the constant out).
    """
    q = wide(scores)
    q = torch.exp((q - q.max()) / epsilon)  # [B, K]
    q = q / q.sum()
    b, k = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=0, keepdim=True) / k  # every prototype holds 1/K of the mass
        q = q / q.sum(dim=1, keepdim=True) / b  # every sample holds 1/B
    return q * b


class Prototypes(LazyModuleMixin, nn.Module):
    """K learnable prototype vectors on the unit sphere: ``forward(z)`` gives the cosine of each row of ``z``
    [B, E] with each prototype, [B, K]. The prototypes are normalised in the forward pass (rather than in place
    after each update, as MGCA and SwAV do), which scores the same and keeps the parameter an ordinary one for
    any engine. ``embed_dim=None`` infers E at the first call, as :class:`CrossAttention` does."""

    def __init__(self, embed_dim: int | None, num_prototypes: int = 500):
        super().__init__()
        self.num_prototypes = num_prototypes
        if embed_dim is None:
            self.weight = UninitializedParameter()
        else:
            self.weight = nn.Parameter(torch.empty(num_prototypes, embed_dim))
            self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)  # directions uniform on the sphere once normalised

    def initialize_parameters(self, z: torch.Tensor) -> None:
        if self.has_uninitialized_params():
            with torch.no_grad():
                self.weight.materialize((self.num_prototypes, z.shape[-1]))
                self.reset_parameters()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=-1) @ F.normalize(wide(self.weight), dim=-1).t()


@losses.register("mgca", supplied=("embed_dim",), check=check_global_head_trained)
class MgcaLoss(GlobalPlusFineLoss):
    """MGCA: the global loss, cross-modal token alignment (CTA) as SPARC re-implemented it, prototype alignment.

    Within each pair only, on l2-normalised tokens ``t`` and patches ``v`` (MGCA normalises its
    local embeddings before the attention):

    - word side: each word attends to the image's patches with a :class:`CrossAttention` (softmax over
      patches), giving an attended visual vector ``u_l``; an L x L contrast ``logit_scale * cos(t_j, u_k)``, the
      diagonal the positives, in both directions (word->attended and attended->word), padded rows dropped and
      padded columns masked. This is SPARC's eq. 6 structure with softmax cross-attention in place of SPARC's
      sparse alignment weights.
    - patch side: each patch attends to the caption's real words (a second :class:`CrossAttention`, padding
      masked), a P x P contrast ``logit_scale * cos(v_p, u'_q)`` both ways; a caption with no real token drops
      its sample from this term.

    ``fine_loss = 0.5 * (word term + patch term)``, each term the mean of its two directions, averaged per
    caption then over captions (``average="caption"``, the default: MGCA's per-word weights are normalised to
    sum to one per caption before the batch mean) or over all real tokens (``"token"``).

    As SPARC did (App. D.3-D.4): 1 head of width ``attn_dim = 128``; no weighting of the token terms by the
    encoders' last-layer [CLS] attention (SPARC's encoders average-pool and have no [CLS]); the model's learned
    temperature in place of MGCA's fixed tau = 0.07 and local tau = 0.1.

    Cross-modal prototype alignment (CPA, MGCA §3.4, kept by SPARC with lambda = 1): ``num_prototypes`` learnable
    prototypes; the l2-normalised global image and text embeddings are scored against them (cosine), each side's
    scores give soft assignments by :func:`sinkhorn_knopp` (``sinkhorn_epsilon``, ``sinkhorn_iterations``; over
    the whole batch of every process), and each side predicts the *other* side's assignments with a softmax at
    temperature ``proto_temperature`` (swapped prediction): ``proto_loss = 0.5 * (CE(q_text, p_image) +
    CE(q_image, p_text))``, weighted by ``lambda_p`` (0: no prototypes and no term, the loss of sparc-kit before
    CPA, whose checkpoints load into it). MGCA's defaults: 500 prototypes,
    epsilon 0.05, 3 iterations, temperature 0.2. Not reproduced: MGCA keeps its prototypes frozen for the first
    epoch.

    So the loss is ``lambda_g * ITA + lambda_f * CTA + lambda_p * CPA``.

    The attention projections and the prototypes are parameters of this loss, to be optimised and checkpointed with it.
    ``embed_dim`` is the model's embedding width, filled in from ``model.embed_dim`` when a recipe builds the loss;
    ``None`` infers it at the first call (see :class:`CrossAttention`).

    Defaults: ``lambda_g = lambda_f = lambda_p = 1`` (SPARC: lambda_1 = lambda_2 = lambda_3 = 1). MGCA sums the two directions
    of its ITA term and adds the word and patch terms; here each is averaged instead, which halves both sides
    and keeps their ratio.

    Memory: per sample, O(B L P) for the word side (like SPARC) plus O(B P^2) for the patch side's P x P
    contrast; no all-gather beyond the global term.
    """

    def __init__(
        self,
        lambda_g: float = 1.0,
        lambda_f: FineWeight = 1.0,
        attn_dim: int = 128,
        embed_dim: int | None = None,
        average: Literal["token", "caption"] = "caption",
        global_loss: GlobalLossName = "clip",
        local_loss: bool = True,
        lambda_p: NonNegativeFloat = 1.0,
        num_prototypes: PositiveInt = 500,
        proto_temperature: PositiveFloat = 0.2,
        sinkhorn_epsilon: PositiveFloat = 0.05,
        sinkhorn_iterations: PositiveInt = 3,
    ):
        super().__init__(lambda_g=lambda_g, lambda_f=lambda_f, global_loss=global_loss, local_loss=local_loss)
        if num_prototypes < 1 or proto_temperature <= 0 or sinkhorn_epsilon <= 0 or sinkhorn_iterations < 1:
            raise ValueError("num_prototypes, sinkhorn_iterations >= 1 and proto_temperature, sinkhorn_epsilon > 0")
        self.average = average
        self.word_attention = CrossAttention(embed_dim, attn_dim)  # words attend to patches
        self.patch_attention = CrossAttention(embed_dim, attn_dim)  # patches attend to words
        self.lambda_p = lambda_p
        self.proto_temperature = proto_temperature
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        # no prototypes without their term: nothing would train them (DDP would also refuse the unused parameter)
        self.prototypes = Prototypes(embed_dim, num_prototypes) if lambda_p != 0 else None

    def prototype_loss(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """CPA's swapped prediction (see the class docstring). Assignments come from the whole global batch (all
        processes' rows, gathered without gradient), the predictions from this process's rows."""
        with torch.autocast(device_type=image_embeds.device.type, enabled=False):
            scores_i = self.prototypes(wide(image_embeds))  # [B, K]
            scores_t = self.prototypes(wide(text_embeds))
            with torch.no_grad():
                all_i, start = gather_rows(scores_i.detach())
                all_t, _ = gather_rows(scores_t.detach())
                rows = slice(start, start + scores_i.shape[0])
                q_i = sinkhorn_knopp(all_i, self.sinkhorn_epsilon, self.sinkhorn_iterations)[rows]
                q_t = sinkhorn_knopp(all_t, self.sinkhorn_epsilon, self.sinkhorn_iterations)[rows]
            log_p_i = F.log_softmax(scores_i / self.proto_temperature, dim=-1)
            log_p_t = F.log_softmax(scores_t / self.proto_temperature, dim=-1)
            return 0.5 * (-(q_t * log_p_i).sum(-1).mean() - (q_i * log_p_t).sum(-1).mean())

    def fine_loss(self, patch_embeds, token_embeds, token_mask, logit_scale) -> torch.Tensor:
        with torch.autocast(device_type=patch_embeds.device.type, enabled=False):
            tokens = F.normalize(wide(token_embeds), dim=-1)  # [B, L, E]
            patches = F.normalize(wide(patch_embeds), dim=-1)  # [B, P, E]
            mask = token_mask.bool()
            scale = scale_like(logit_scale, tokens)

            attended = F.normalize(self.word_attention(tokens, patches), dim=-1)  # [B, L, E]
            word_logits = scale * tokens @ attended.transpose(1, 2)  # [B, L, L]: word j vs attended k
            word_term = 0.5 * (
                masked_pairwise_contrastive_loss(word_logits, mask, self.average)
                + masked_pairwise_contrastive_loss(word_logits.transpose(1, 2), mask, self.average)
            )

            attended_p = F.normalize(self.patch_attention(patches, tokens, mask), dim=-1)  # [B, P, E]
            patch_logits = scale * patches @ attended_p.transpose(1, 2)  # [B, P, P]: patch p vs attended q
            patch_mask = mask.any(dim=1, keepdim=True).expand(-1, patches.shape[1])  # [B, P]
            patch_term = 0.5 * (
                masked_pairwise_contrastive_loss(patch_logits, patch_mask, self.average)
                + masked_pairwise_contrastive_loss(patch_logits.transpose(1, 2), patch_mask, self.average)
            )
            return 0.5 * (word_term + patch_term)

    def forward(
        self, image_embeds, text_embeds, patch_embeds, token_embeds, token_mask, logit_scale, **_
    ) -> dict[str, torch.Tensor]:
        fine = self.fine_loss(patch_embeds, token_embeds, token_mask, logit_scale)
        out = self.combine(fine, image_embeds, text_embeds, logit_scale)
        if self.prototypes is not None:
            proto = self.prototype_loss(image_embeds, text_embeds)
            out["loss"] = out["loss"] + self.lambda_p * proto
            out["proto_loss"] = proto.detach()
        return out
