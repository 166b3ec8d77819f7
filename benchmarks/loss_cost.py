"""Cost of each loss over CLIP's: forward+backward time and peak memory against the batch size.

    python benchmarks/loss_cost.py [--batches 32,64,128] [--patches 196] [--tokens 32] [--dim 256]

The paper's Table 11 reports SPARC at +0.5% FLOPs and memory over CLIP at B = 16,384, and FILIP at about 3x the
FLOPs and 1.8x the memory. This measures the losses alone (the towers excluded, since they cost the same for
every loss) on embeddings of the paper's shapes. Each (loss, batch) point runs in a fresh process so its peak
resident memory is its own; the baseline is CLIP at the same batch size, measured the same way. Because the towers
are left out, the ratios to CLIP are far larger than the paper's whole-step ratios; what carries over is how each
loss grows with B (the last two columns): linearly for the per-sample losses (SPARC, MGCA), quadratically for the
all-pairs ones (FILIP, GLoRIA, PACL).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

LOSSES = ["clip", "sparc", "mgca", "pacl", "gloria", "filip"]


def measure(name: str, batch: int, patches: int, tokens: int, dim: int, reps: int) -> dict:
    """Run in a child process: time forward+backward, report peak RSS above the inputs' own."""
    import torch

    from sparc_kit.registry import losses

    torch.manual_seed(0)
    entry = losses.get(name)
    loss_fn = entry.build({}, offer={"embed_dim": dim})
    loss_fn.eval()  # FILIP's token dropping off: the same work every repetition
    lengths = torch.randint(tokens // 2, tokens + 1, (batch,))
    inputs = {
        "image_embeds": torch.randn(batch, dim, requires_grad=True),
        "text_embeds": torch.randn(batch, dim, requires_grad=True),
        "patch_embeds": torch.randn(batch, patches, dim, requires_grad=True),
        "token_embeds": torch.randn(batch, tokens, dim, requires_grad=True),
        "token_mask": torch.arange(tokens)[None, :] < lengths[:, None],
        "logit_scale": torch.tensor(14.3, requires_grad=True),
    }
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        loss_fn(**inputs)["loss"].backward()
        times.append(time.perf_counter() - start)
        for t in inputs.values():
            t.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss  # KiB on Linux
    return {"seconds": statistics.median(times[1:] or times), "peak_mib": peak / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="32,64,128")
    parser.add_argument("--patches", type=int, default=196, help="P (ViT-B/16 at 224 px: 196)")
    parser.add_argument("--tokens", type=int, default=32, help="L")
    parser.add_argument("--dim", type=int, default=256, help="embedding width D (the paper: 512)")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        out = measure(args.child[0], int(args.child[1]), args.patches, args.tokens, args.dim, args.reps)
        print(json.dumps(out))
        return

    results: dict[tuple[str, int], dict] = {}
    batches = [int(b) for b in args.batches.split(",")]
    for batch in batches:
        for name in LOSSES:
            cmd = [sys.executable, __file__, "--child", name, str(batch), "--patches", str(args.patches),
                   "--tokens", str(args.tokens), "--dim", str(args.dim), "--reps", str(args.reps)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[(name, batch)] = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"\nP={args.patches} patches, L={args.tokens} tokens, D={args.dim}; forward+backward of the loss alone, "
          f"median of {args.reps - 1} timed repetitions; peak = resident memory above the inputs\n")
    first = batches[0]
    print(f"| loss | B | ms | x CLIP time | peak MiB | x CLIP peak | time x own at B={first} | "
          f"peak x own at B={first} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for batch in batches:
        clip = results[("clip", batch)]
        for name in LOSSES:
            r, own = results[(name, batch)], results[(name, first)]
            peak_ratio = r["peak_mib"] / clip["peak_mib"] if clip["peak_mib"] > 0 else float("nan")
            own_peak = r["peak_mib"] / own["peak_mib"] if own["peak_mib"] > 0 else float("nan")
            print(f"| {name} | {batch} | {1000 * r['seconds']:.1f} | {r['seconds'] / clip['seconds']:.2f}x | "
                  f"{r['peak_mib']:.1f} | {peak_ratio:.2f}x | {r['seconds'] / own['seconds']:.2f}x | {own_peak:.2f}x |")


if __name__ == "__main__":
    main()
