"""AdamW's update on the CPU (or the GPU when there is one): torch's three implementations, interleaved.

    python benchmarks/optimizer_step.py [--params 150] [--repeats 7] [--clip]

The parameters are shaped like a ViT-B/16 + width-512 text tower (``--params`` million, mostly 768 x 768 and
768 x 3072 matrices plus vectors), with random gradients; each round times one ``step()`` of every
implementation in turn, and the table gives the median over rounds with the ratio against ``for_loop`` (torch's
default on the CPU). ``sparc_kit``'s ``optim.impl: auto`` picks by device from what this measures.

``--clip`` measures instead the fused update with gradient clipping active (a clip factor of 0.5), two ways,
interleaved: every gradient scaled in place and then the step (what the engine did before), and the factor
handed to the fused kernel as its ``grad_scale`` (what ``LocalEngine`` does now); the ratio is against the first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

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


def interleaved(ways: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each way per round: ``repeats`` rounds, each timing every way once, in turn (synchronised on
    CUDA)."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, way in ways.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            way()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return times


def print_table(title: str, column: str, times: dict[str, list[float]], base: str) -> None:
    """The median of each way in ms and its speed against ``base``'s."""
    print(title)
    print(f"{column:<18} {'ms':>8} {'vs ' + base:>14}")
    reference = statistics.median(times[base])
    for name, ts in times.items():
        print(f"{name:<18} {statistics.median(ts) * 1000:>8.1f} {reference / statistics.median(ts):>13.2f}x")


def clipped(millions: float, repeats: int, device: torch.device) -> None:
    params = parameters(millions, device)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6, fused=True)
    factor = torch.tensor(0.5, device=device)

    def scale_then_step() -> None:
        for p in params:
            p.grad.mul_(factor)
        opt.step()

    def grad_scale() -> None:
        opt.grad_scale = 1.0 / factor  # the fused kernel divides every gradient by it as it reads it
        opt.step()
        del opt.grad_scale

    ways = {"scale, then step": scale_then_step, "grad_scale": grad_scale}
    for way in ways.values():
        way()  # state allocated, kernels warm
    print_table(
        f"fused AdamW step with clipping, {sum(p.numel() for p in params) / 1e6:.0f}M parameters on {device.type}, "
        f"{torch.get_num_threads()} threads, median of {repeats} interleaved rounds",
        "clipping", interleaved(ways, repeats, device), "scale, then step",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=150.0, help="millions of parameters")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clip", action="store_true", help="the clipped fused step, two ways")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.clip:
        clipped(args.params, args.repeats, device)
        return
    opts = {}
    for name, kw in IMPLS.items():
        try:
            params = parameters(args.params, device)
            opts[name] = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6, **kw)
            opts[name].step()  # state allocated, kernels warm
        except (RuntimeError, ValueError) as exc:
            print(f"{name}: not available here ({str(exc).splitlines()[0]})")
    count = sum(p.numel() for p in next(iter(opts.values())).param_groups[0]["params"]) / 1e6
    print_table(
        f"AdamW step, {count:.0f}M parameters on {device.type}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} interleaved rounds",
        "implementation", interleaved({n: o.step for n, o in opts.items()}, args.repeats, device), "for_loop",
    )


if __name__ == "__main__":
    main()
