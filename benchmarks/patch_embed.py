"""The ViT patch embedding two ways, forward + backward, interleaved: torch's strided convolution and the native
ViT's unfolded patches through one matrix product (``sparc_kit.models.vit.embed_patches``), the same weights.

    python benchmarks/patch_embed.py [--batch 8] [--image-size 224] [--patch 16] [--width 768] [--repeats 10]

Each round times one forward + backward (gradients for the weights, as in training: the images need none) of
each way, in fp32 and under bf16 autocast; the table gives the median over rounds and the ratio against the
convolution.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparc_kit.models.vit import embed_patches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, args.width, args.patch, args.patch).to(device)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    ways = {
        "convolution": lambda x: conv(x).flatten(2).transpose(1, 2),
        "matrix product": lambda x: embed_patches(x, conv),
    }
    print(f"patch embedding, batch {args.batch}, {args.image_size} px, patch {args.patch}, width {args.width}, "
          f"{device.type}, {torch.get_num_threads()} threads, forward + backward, median of {args.repeats} "
          "interleaved rounds")
    print(f"{'precision':<10} {'way':<16} {'ms':>8} {'vs convolution':>15}")
    for precision in ("fp32", "bf16"):
        def step(way) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = way(images)
            out.float().sum().backward()
            conv.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()

        for way in ways.values():
            step(way)
            step(way)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, way in ways.items():
                t0 = time.perf_counter()
                step(way)
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["convolution"])
        for name, ts in times.items():
            ms = statistics.median(ts)
            print(f"{precision:<10} {name:<16} {ms * 1000:>8.1f} {base / ms:>14.2f}x")


if __name__ == "__main__":
    main()
