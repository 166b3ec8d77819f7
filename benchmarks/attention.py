"""Attention kernels per sequence length: forward + backward of each backend, interleaved, with ``auto``'s pick.

    python benchmarks/attention.py [--repeats 7] [--dtypes fp32,bf16] [--max-tokens 4096]
                                   [--out benchmarks/results/attention.json]

Shapes: the ViT-B/16 image tower (12 heads of 64 over 196 patches, 197 with a class token), open_clip's text
tower (8 heads of 64 over 77 causal tokens), then longer sequences (ViT-L/14 at 336 px: 577; 1,025; 2,048) to
find where the explicit form stops paying. Each round times one forward + backward of every kernel in turn on
fresh random inputs; the table gives the median over rounds and the ratio against ``sdpa`` (torch's fused kernel,
sparc-kit's earlier default). ``auto`` is sparc-kit's default (``model.attention``); its column says what it ran.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sparc_kit.models.attention import attention_mask, auto_kernel, get_attention_backend

SHAPES = [  # name, batch, heads, tokens, head dim, causal
    ("ViT-B/16 patches", 8, 12, 196, 64, False),
    ("ViT-B/16 + class token", 8, 12, 197, 64, False),
    ("text, 77 causal", 8, 8, 77, 64, True),
    ("ViT-B/32 patches", 8, 12, 49, 64, False),
    ("ViT-L/14 336 px", 4, 16, 577, 64, False),
    ("1,025 tokens", 2, 16, 1025, 64, False),
    ("2,048 tokens", 1, 16, 2048, 64, False),
]
KERNELS = ("sdpa", "matmul", "auto")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def time_kernel(name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> float:
    _, b, h, n, d, causal = shape
    q, k, v = (torch.randn(b, h, n, d, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    mask = attention_mask(None, n, causal, device)
    kernel = get_attention_backend(name)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    kernel(q, k, v, mask).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--max-tokens", type=int, default=4096, help="skip shapes longer than this")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    print(f"attention forward + backward on {device.type}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats} interleaved rounds (1 warm-up)")
    print(f"{'shape':<24} {'dtype':<5} " + " ".join(f"{k + ' ms':>10}" for k in KERNELS)
          + f" {'matmul x sdpa':>14} {'auto x sdpa':>12}  auto ran")
    for shape in SHAPES:
        if shape[3] > args.max_tokens:
            continue
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            times: dict[str, list[float]] = {k: [] for k in KERNELS}
            for r in range(args.repeats + 1):
                for name in KERNELS[r % len(KERNELS):] + KERNELS[: r % len(KERNELS)]:  # rotate the order
                    t = time_kernel(name, shape, dtype, device)
                    if r:
                        times[name].append(t)
            med = {k: statistics.median(v) for k, v in times.items()}
            probe = torch.zeros(shape[1], shape[2], shape[3], shape[4], dtype=dtype, device=device)
            ran = auto_kernel(probe, probe).__name__.replace("_attention", "")
            row = dict(shape=shape[0], batch=shape[1], heads=shape[2], tokens=shape[3], dtype=dname,
                       ms={k: v * 1e3 for k, v in med.items()}, matmul_x_sdpa=med["sdpa"] / med["matmul"],
                       auto_x_sdpa=med["sdpa"] / med["auto"], auto_ran=ran)
            rows.append(row)
            print(f"{shape[0]:<24} {dname:<5} " + " ".join(f"{med[k] * 1e3:>10.1f}" for k in KERNELS)
                  + f" {row['matmul_x_sdpa']:>13.2f}x {row['auto_x_sdpa']:>11.2f}x  {ran}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": device.type, "threads": torch.get_num_threads(),
                                        "torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
