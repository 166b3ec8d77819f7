"""Cost of each loss over CLIP's: forward+backward time and peak memory against the batch size.

    python benchmarks/loss_cost.py [--batches 32,64,128,256] [--losses clip,sparc,...] [--chunk 32]
                                   [--patches 196] [--tokens 32] [--dim 256] [--diagnostics]

The paper's Table 11 reports SPARC at +0.5% FLOPs and memory over CLIP at B = 16,384, and FILIP at about 3x the
FLOPs and 1.8x the memory. This measures the losses alone (the towers excluded, since they cost the same for
every loss) on embeddings of the paper's shapes. Each (loss, batch) point runs in a fresh process so its peak
resident memory is its own; the baseline is CLIP at the same batch size, measured the same way. Because the towers
are left out, the ratios to CLIP are far larger than the paper's whole-step ratios; what carries over is how each
loss grows with B (the last two columns): linearly for the per-sample losses (SPARC, MGCA), quadratically for the
all-pairs ones (FILIP, GLoRIA, PACL). ``--chunk N`` adds a row for SPARC with ``loss.chunk_size: N`` (its
fine-grained term computed N pairs at a time and recomputed in the backward pass).
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


def measure(name: str, batch: int, patches: int, tokens: int, dim: int, reps: int, diagnose: bool = False) -> dict:
    """Run in a child process: time forward+backward, report peak RSS above the inputs' own. Diagnostics off, as
    on the training loop's unlogged steps, unless ``diagnose``."""
    import torch

    from sparc_kit.losses.diagnostics import diagnostics
    from sparc_kit.registry import losses

    torch.manual_seed(0)
    loss_name, _, chunk = name.partition("@chunk")
    entry = losses.get(loss_name)
    loss_fn = entry.build({"chunk_size": int(chunk)} if chunk else {}, offer={"embed_dim": dim})
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
    def once() -> float:
        start = time.perf_counter()
        with diagnostics(diagnose):
            loss = loss_fn(**inputs)["loss"]
        loss.backward()
        for t in inputs.values():
            t.grad = None
        return time.perf_counter() - start

    import torch._dynamo  # noqa: F401  (activation checkpointing imports it on first use: not the loss's memory)

    base = _reset_peak_rss()
    once()  # the first call's peak: later calls reuse memory the allocator kept, so their peaks say less
    peak = _peak_rss() - base  # KiB
    times = [once() for _ in range(reps)]
    return {"seconds": statistics.median(times), "peak_mib": peak / 1024}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss() -> int:
    """Reset the process's peak resident memory to its current size (Linux ``clear_refs``); return that size,
    KiB. Without /proc, the peak since the start (a larger, more conservative number)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss() -> int:
    try:
        return _status_kib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="32,64,128,256")
    parser.add_argument("--losses", default=",".join(LOSSES), help="which losses (clip is always measured)")
    parser.add_argument("--chunk", type=int, default=None, help="also SPARC with loss.chunk_size=N")
    parser.add_argument("--patches", type=int, default=196, help="P (ViT-B/16 at 224 px: 196)")
    parser.add_argument("--tokens", type=int, default=32, help="L")
    parser.add_argument("--dim", type=int, default=256, help="embedding width D (the paper: 512)")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--diagnostics", action="store_true",
                        help="include the losses' diagnostics (the loop computes them on logged steps only)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        out = measure(args.child[0], int(args.child[1]), args.patches, args.tokens, args.dim, args.reps,
                      args.diagnostics)
        print(json.dumps(out))
        return

    results: dict[tuple[str, int], dict] = {}
    batches = [int(b) for b in args.batches.split(",")]
    names = ["clip"] + [n for n in args.losses.split(",") if n != "clip"]
    if args.chunk:
        names.insert(names.index("sparc") + 1 if "sparc" in names else 1, f"sparc@chunk{args.chunk}")
    for batch in batches:
        for name in names:
            cmd = [sys.executable, __file__, "--child", name, str(batch), "--patches", str(args.patches),
                   "--tokens", str(args.tokens), "--dim", str(args.dim), "--reps", str(args.reps)]
            cmd += ["--diagnostics"] if args.diagnostics else []
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[(name, batch)] = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"\nP={args.patches} patches, L={args.tokens} tokens, D={args.dim}; forward+backward of the loss alone, "
          f"median of {args.reps} timed repetitions after the first; peak = resident memory of the first call above the inputs; "
          f"diagnostics {'on' if args.diagnostics else 'off (as on unlogged steps)'}\n")
    first = batches[0]
    print(f"| loss | B | ms | x CLIP time | peak MiB | x CLIP peak | time x own at B={first} | "
          f"peak x own at B={first} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for batch in batches:
        clip = results[("clip", batch)]
        for name in names:
            r, own = results[(name, batch)], results[(name, first)]
            peak_ratio = _ratio(r["peak_mib"], clip["peak_mib"])
            own_peak = _ratio(r["peak_mib"], own["peak_mib"])
            print(f"| {name} | {batch} | {1000 * r['seconds']:.1f} | {r['seconds'] / clip['seconds']:.2f}x | "
                  f"{r['peak_mib']:.1f} | {peak_ratio} | {r['seconds'] / own['seconds']:.2f}x | {own_peak} |")


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base >= 0.5 else "n/a"  # below half a MiB the page granularity rules


if __name__ == "__main__":
    main()
