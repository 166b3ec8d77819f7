"""AdamW's update on the CPU (or the GPU when there is one): torch's three implementations, interleaved.

    python benchmarks/optimizer_step.py [--params 150] [--repeats 7]

The parameters are shaped like a ViT-B/16 + width-512 text tower (``--params`` million, mostly 768 x 768 and
768 x 3072 matrices plus vectors), with random gradients; each round times one ``step()`` of every
implementation in turn, and the table gives the median over rounds with the ratio against ``for_loop`` (torch's
default on the CPU). ``sparc_kit``'s ``optim.impl: auto`` picks by device from what this measures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

IMPLS = {"for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def parameters(millions: float, device: torch.device) -> list[torch.nn.Parameter]:
    shapes, total = [], 0
    while total < millions * 1e6:
        for shape in ((768, 768), (768, 768), (768, 768), (768, 768), (3072, 768), (768, 3072), (768,), (768,)):
            shapes.append(shape)
            total += torch.Size(shape).numel()
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=150.0, help="millions of parameters")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    opts = {}
    for name, kw in IMPLS.items():
        try:
            params = parameters(args.params, device)
            opts[name] = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6, **kw)
            opts[name].step()  # state allocated, kernels warm
        except (RuntimeError, ValueError) as exc:
            print(f"{name}: not available here ({str(exc).splitlines()[0]})")
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(args.repeats):
        for name, opt in opts.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["for_loop"])
    count = sum(p.numel() for p in next(iter(opts.values())).param_groups[0]["params"]) / 1e6
    print(f"AdamW step, {count:.0f}M parameters on {device.type}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved rounds")
    print(f"{'implementation':<16} {'ms':>8} {'vs for_loop':>12}")
    for name, ts in times.items():
        ms = statistics.median(ts) * 1000
        print(f"{name:<16} {ms:>8.1f} {base / statistics.median(ts):>11.2f}x")


if __name__ == "__main__":
    main()
