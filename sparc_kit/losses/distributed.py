"""What a loss needs to be the same on 1 or N processes: gathers with gradient, and global normalisers.

Every loss term here is a mean over items of the *global* batch (samples, tokens, captions). Each process
computes the sum over its own items and divides by its share of the global count, ``n_global / world_size``;
data-parallel training averages gradients over processes, which turns those per-process losses back into the
single-process mean exactly, also when processes hold different numbers of items (a batch that lost unreadable
samples). Without a process group every function here is the identity of the single-process case.

The pairwise losses (CLIP, SigLIP, FILIP, PACL, GLoRIA) contrast each local sample against the samples of every
process (open_clip's local loss with gather-with-grad): logits are [B_local, B_global], never B_global^2 on one
process. The per-sample fine-grained terms (SPARC, MGCA) exchange only one count.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["world", "local_only", "gather_rows", "global_sum", "batch_share", "pairwise_contrast", "share_gradient"]


_LOCAL_ONLY = [False]


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one or inside :func:`local_only`."""
    if not _LOCAL_ONLY[0] and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class local_only:
    """Inside this context the losses ignore other processes (no gather, no all-reduce): for a computation only
    some processes run, such as evaluation on rank 0, which would otherwise wait for the others forever."""

    def __enter__(self):
        self._before = _LOCAL_ONLY[0]
        _LOCAL_ONLY[0] = True
        return self

    def __exit__(self, *exc):
        _LOCAL_ONLY[0] = self._before
        return False


def _row_counts(n: int, device: torch.device) -> list[int]:
    _, size = world()
    local = torch.tensor([n], device=device, dtype=torch.long)
    counts = [torch.zeros_like(local) for _ in range(size)]
    dist.all_gather(counts, local)
    return [int(c) for c in counts]


def gather_rows(x: torch.Tensor, counts: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """All processes' rows of ``x`` [n, ...] concatenated in rank order, and where this process's rows start.

    The gradient flows back to each process's own rows (``torch.distributed.nn.all_gather``: its backward sums
    the gradients every process computed for those rows). Processes may hold different numbers of rows: they are
    padded to the largest for the exchange and cut back after. ``counts`` (every process's row count) saves the
    count exchange when the caller already has it.
    """
    rank, size = world()
    if size == 1:
        return x, 0
    counts = counts or _row_counts(x.shape[0], x.device)
    longest = max(counts)
    padded = x
    if x.shape[0] < longest:
        padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))], dim=0)
    gathered = _AllGatherRows.apply(padded)  # [size * longest, ...]
    if any(c != longest for c in counts):
        gathered = torch.cat([gathered[r * longest : r * longest + c] for r, c in enumerate(counts)], dim=0)
    return gathered, sum(counts[:rank])


class _AllGatherRows(torch.autograd.Function):
    """All-gather along rows whose backward sums every process's gradient of this process's rows (an
    all-reduce of the gradient, then this process's slice). Written here because
    ``torch.distributed.nn.functional.all_gather`` is deprecated and its replacement is private API."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def global_sum(value: torch.Tensor | float | int, device: torch.device | None = None) -> torch.Tensor:
    """The sum over processes of a count (no gradient), as a float32 tensor."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device).detach().clone()
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def batch_share(local_count: torch.Tensor | float | int, device: torch.device | None = None) -> torch.Tensor:
    """What this process divides its sum by: ``n_global / world_size`` (``local_count`` itself alone), so the
    mean over processes of the per-process losses is the global mean."""
    _, size = world()
    t = torch.as_tensor(local_count, dtype=torch.float32, device=device).detach()
    if size == 1:
        return t
    return global_sum(t, device) / size


Scores = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def pairwise_contrast(
    scores: Scores, image_side: Sequence[torch.Tensor], text_side: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over every (image, text) pair of the global batch, for pairwise similarity functions.

    ``scores(images, texts)`` returns ``(logits_i2t [n_img, n_txt], logits_t2i [n_txt, n_img])`` for the image-side
    tensors ``images`` and text-side tensors ``texts`` it is given (each batch-first). Alone, it is called once on
    the batch. With several processes each process scores its own images against every process's texts and its
    own texts against every process's images (both gathered with gradient): O(B_local * B_global) memory, twice
    the similarity work of the local-only version, and an all-gather of every image-side and text-side tensor.

    Returns ``(loss, logits_i2t, logits_t2i, targets)``: the loss (normalised as the module docstring says), the
    two [B_local, B_global] logit blocks with rows the local queries, and each local positive's column.
    """
    rank, size = world()
    n = image_side[0].shape[0]
    device = image_side[0].device
    if size == 1:
        logits_i2t, logits_t2i = scores(image_side, text_side)
        targets = torch.arange(n, device=device)
    else:
        counts = _row_counts(n, device)
        all_images = [gather_rows(t, counts)[0] for t in image_side]
        gathered = [gather_rows(t, counts) for t in text_side]
        all_texts = [g[0] for g in gathered]
        offset = sum(counts[:rank])
        logits_i2t = scores(image_side, all_texts)[0]  # [b, B]: my images against everyone's texts
        logits_t2i = scores(all_images, text_side)[1]  # [b, B]: my texts against everyone's images
        targets = torch.arange(n, device=device) + offset
    share = batch_share(n, device)
    loss = 0.5 * (
        F.cross_entropy(logits_i2t, targets, reduction="sum") + F.cross_entropy(logits_t2i, targets, reduction="sum")
    ) / share.clamp_min(1e-12)
    return loss, logits_i2t, logits_t2i, targets


def share_gradient(value: torch.Tensor, passes: int) -> torch.Tensor:
    """``value`` unchanged, with ``1 / passes`` of its gradient: for a quantity every pass of an accumulated step
    uses in the whole batch's loss, so that its gradients, added over the passes, are the whole batch's once."""
    if passes <= 1 or not torch.is_tensor(value) or not value.requires_grad:
        return value
    return value / passes + value.detach() * (1.0 - 1.0 / passes)
