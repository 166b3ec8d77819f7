"""Attention backends and the transformer block shared by the native encoders.

One switch picks the kernel: ``auto`` (the default: the fastest of the others for the device, dtype and length,
see :func:`auto_kernel`), ``sdpa`` (torch's fused ``scaled_dot_product_attention``), ``matmul`` (the explicit
softmax(QK^T / sqrt(d)) V in the inputs' dtype), ``math`` (the same in float32, the reference the others are
tested against) and ``xformers`` (``memory_efficient_attention``, from the optional ``xformers`` extra, CUDA
only). Each backend takes q, k, v of shape [B, H, N, Dh] and a boolean mask broadcastable to [B, H, N, N]
(True = may attend).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sparc_kit.errors import SparcError
from sparc_kit.registry import attention_backends

__all__ = ["Attention", "Block", "Mlp", "QuickGELU", "ACTIVATIONS", "attention_mask", "get_attention_backend", "BackendUnavailableError"]


_KERNEL_ARGS = ("q", "k", "v", "mask")  # call arguments, not recipe settings


class BackendUnavailableError(SparcError, RuntimeError):
    """An attention backend that cannot run in this environment."""


@attention_backends.register("sdpa", supplied=_KERNEL_ARGS)
def sdpa_attention(q, k, v, mask):
    """torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient / math, chosen by torch)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@attention_backends.register("math", supplied=_KERNEL_ARGS)
def math_attention(q, k, v, mask):
    """Explicit softmax(QK^T / sqrt(d)) V in float32: slow, the reference the fused kernels are checked against."""
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return (scores.softmax(dim=-1) @ v).to(dtype)


@attention_backends.register("matmul", supplied=_KERNEL_ARGS)
def matmul_attention(q, k, v, mask):
    """Explicit softmax(QK^T / sqrt(d)) V in the inputs' dtype (two batched matrix products and a softmax).

    On the CPU in bfloat16 this is faster than torch's CPU flash kernel for the short sequences of image-text
    towers (196 patches, 77 tokens); it keeps the [B, H, N, N] scores for the backward pass.
    """
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1) @ v


#: On the CPU in a 16-bit dtype, ``matmul`` beats the fused kernel up to about this many keys; past it, and in
#: float32, ``sdpa`` is as fast or faster and keeps no N x N scores (``python benchmarks/attention.py``).
CPU_MATMUL_MAX_KEYS = 640
#: ... and while one call's [B, H, N, N] scores stay under this many elements (64M: 128 MiB in bf16, kept for
#: the backward pass in every layer), so a large per-process batch does not trade memory for the speed.
CPU_MATMUL_MAX_SCORES = 1 << 26


def auto_kernel(q: torch.Tensor, k: torch.Tensor):
    """The kernel ``auto`` runs for these inputs: ``matmul`` on the CPU for 16-bit inputs over at most
    :data:`CPU_MATMUL_MAX_KEYS` keys whose scores fit :data:`CPU_MATMUL_MAX_SCORES`, ``sdpa`` everywhere else
    (on CUDA torch picks flash or memory-efficient)."""
    scores = q.shape[:-1].numel() * k.shape[-2]
    if (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and k.shape[-2] <= CPU_MATMUL_MAX_KEYS
        and scores <= CPU_MATMUL_MAX_SCORES
    ):
        return matmul_attention
    return sdpa_attention


@attention_backends.register("auto", supplied=_KERNEL_ARGS)
def auto_attention(q, k, v, mask):
    """The measured-fastest kernel for the device, dtype and sequence length (:func:`auto_kernel`)."""
    return auto_kernel(q, k)(q, k, v, mask)


@attention_backends.register("xformers", supplied=_KERNEL_ARGS)
def xformers_attention(q, k, v, mask):
    """xformers.ops.memory_efficient_attention; needs the ``xformers`` extra and a CUDA device."""
    try:
        import xformers.ops as xops
    except ImportError as exc:
        raise BackendUnavailableError(
            "attention backend 'xformers' needs the xformers package: pip install 'sparc-kit[xformers]' "
            "(or use attention: sdpa)"
        ) from exc
    if q.device.type != "cuda":
        raise BackendUnavailableError(
            f"attention backend 'xformers' has no kernel for device {q.device.type!r}; it runs on CUDA only "
            "(use attention: sdpa on this device)"
        )
    bias = None
    if mask is not None:
        n_q, n_k = q.shape[-2], k.shape[-2]
        # xformers wants an additive bias whose last dimension is padded to a multiple of 8.
        padded = (n_k + 7) // 8 * 8
        full = torch.zeros(q.shape[0], q.shape[1], n_q, padded, dtype=q.dtype, device=q.device)
        full[..., :n_k].masked_fill_(~mask.expand(q.shape[0], q.shape[1], n_q, n_k), float("-inf"))
        bias = full[..., :n_k]
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
    )  # xformers layout is [B, N, H, Dh]
    return out.transpose(1, 2)


def get_attention_backend(name: str):
    return attention_backends.get(name).builder


def attention_mask(
    key_mask: torch.Tensor | None, num_queries: int, causal: bool, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask [B or 1, 1, Nq, Nk] combining key padding and causality; None when nothing is masked.

    A query row with no key to attend to (a caption made only of padding) attends to every key instead: its
    output is garbage but finite, and the loss drops it, where an all-masked row would give NaN.
    """
    mask = None
    if key_mask is not None:
        mask = key_mask.bool()[:, None, None, :]
    if causal:
        n = num_queries
        tri = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]
        mask = tri if mask is None else mask & tri
    if mask is not None:
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, backend: str = "auto"):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.backend = backend
        self._kernel = get_attention_backend(backend)

    def set_backend(self, backend: str) -> None:
        self._kernel = get_attention_backend(backend)
        self.backend = backend

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, w = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, N, Dh]
        out = self._kernel(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


#: the MLP activations a native tower may use (recipe ``act``): the exact (erf) GELU, or CLIP's QuickGELU
ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (``norm_eps``: the LayerNorms' epsilon; ``act``: the MLP's activation)."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        backend: str = "auto",
        act: str = "gelu",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, heads, backend)
        self.norm2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = Mlp(width, int(width * mlp_ratio), act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


def transformer_parameter_count(width: int, depth: int, mlp_ratio: float = 4.0) -> int:
    """The parameters of ``Transformer(width, depth, heads, mlp_ratio)``, counted from its layers."""
    hidden = int(width * mlp_ratio)
    attention = 3 * width * width + 3 * width + width * width + width  # qkv, proj
    mlp = width * hidden + hidden + hidden * width + width  # fc1, fc2
    norms = 4 * width  # two LayerNorms
    return depth * (attention + mlp + norms)


def divisibility_problems(path: str, width: int, heads: int) -> list[str]:
    if width % heads:
        return [
            f"{path}.heads: {heads} heads do not divide {path}.width={width}; use a width that is a multiple of "
            f"the heads (e.g. {width + heads - width % heads}) or heads that divide the width"
        ]
    return []


class Transformer(nn.Module):
    """A stack of pre-LN blocks with optional gradient checkpointing."""

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        backend: str = "auto",
        act: str = "gelu",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, backend, act, norm_eps) for _ in range(depth))
        self.grad_checkpointing = False

    def set_backend(self, backend: str) -> None:
        for block in self.blocks:
            block.attn.set_backend(backend)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x


def init_weights(module: nn.Module) -> None:
    """Truncated-normal linear weights (std 0.02), zero biases, unit LayerNorms: the ViT / CLIP convention."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


class TransformerTower(nn.Module):
    """What the native towers share: a ``width`` wide :class:`Transformer` as ``self.transformer``, whose output
    width, gradient checkpointing and attention backend the dual encoder and the model builder set."""

    width: int
    transformer: Transformer

    @property
    def output_dim(self) -> int:
        return self.width

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def set_attention_backend(self, backend: str) -> None:
        self.transformer.set_backend(backend)
