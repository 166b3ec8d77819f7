"""Training-step throughput in float32 and under bf16 autocast, on the CPU (or the GPU when there is one).

    python benchmarks/train_step.py [--steps 8] [--sizes tiny,small] [--optimizer | --compile]

The cores this project is developed on have AMX, on which a large bf16 matrix product runs about 2.3x faster
than float32; whether a whole SPARC step gains depends on how much of it is large matrix products. Each row
times the same model, loss and batch (synthetic shapes, the real collate) for a few optimizer steps after one
warm-up step; the baseline of each size is its float32 row.
"""

from __future__ import annotations

import argparse
import time

import torch

import sparc_kit
from sparc_kit.data import Collate, SyntheticShapes, Tokenizer
from sparc_kit.engines import BatchLayout, LocalEngine, OptimizerSpec, param_groups
from sparc_kit.train import build_loss
from sparc_kit.train.module import TrainModule
from sparc_kit.train.step import train_step

SIZES = {
    "tiny": ["model.vision.width=128", "model.vision.depth=4", "model.text.width=128", "model.text.depth=4"],
    "small": [
        "model.embed_dim=256", "model.vision.width=384", "model.vision.depth=6", "model.vision.heads=6",
        "model.text.width=384", "model.text.depth=6", "model.text.heads=6",
    ],
}


def run(size: str, precision: str, steps: int, batch_size: int, *extra: str) -> tuple[float, float]:
    """``(samples/s over the timed steps, seconds of the first step)`` of ``sparc_tiny`` at ``size`` with the
    recipe overrides ``extra`` (``optim.impl=...``, ``train.compile=true``)."""
    recipe = sparc_kit.load_recipe("sparc_tiny", [*SIZES[size], f"train.precision={precision}", *extra])
    torch.manual_seed(0)
    model, loss_fn = sparc_kit.build_model(recipe), build_loss(recipe)
    if recipe.train.compile:
        model.compile_blocks()  # as the training loop does
    data = SyntheticShapes(num_samples=batch_size, image_size=64)
    tokenizer = Tokenizer.train(list(data.captions()), vocab_size=256, model_type="bpe", context_length=16)
    batch = Collate(tokenizer, 64)([data[i] for i in range(batch_size)])
    batch = {k: v for k, v in batch.items() if k in ("images", "token_ids", "token_mask")}
    engine = LocalEngine(device="auto", precision=precision)
    module = TrainModule(model, loss_fn)
    spec = OptimizerSpec(param_groups(module, 0.0), lr=1e-4, impl=recipe.optim.impl)
    engine.setup(module, spec, BatchLayout(batch_size), 1.0)
    batch = {k: v.to(engine.device) for k, v in batch.items()}

    def synchronize():
        if engine.device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        train_step(engine, batch, grad_clip=1.0, pad_to=recipe.train.pad_to)

    start = time.perf_counter()
    step()  # warm-up (and, compiled, the compilation)
    synchronize()
    first_step_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return steps * batch_size / (time.perf_counter() - start), first_step_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sizes", default="tiny,small")
    instead = parser.add_mutually_exclusive_group()
    instead.add_argument(
        "--optimizer", action="store_true", help="compare AdamW's implementations (optim.impl) in fp32 instead"
    )
    instead.add_argument(
        "--compile", action="store_true", help="compare train.compile (each block torch.compiled) with eager instead"
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\nSPARC training step (towers + loss + AdamW), batch {args.batch_size}, 64 px, {args.steps} timed steps "
          f"after one warm-up, on {device}\n")
    if args.optimizer:
        print("| size | optim.impl | samples/s | vs for_loop |")
        print("|---|---|---:|---:|")
        for size in args.sizes.split(","):
            base, _ = run(size, "fp32", args.steps, args.batch_size, "optim.impl=for_loop")
            fused, _ = run(size, "fp32", args.steps, args.batch_size, "optim.impl=auto")
            print(f"| {size} | for_loop (torch's CPU default) | {base:,.1f} | 1.00x |")
            print(f"| {size} | auto (fused) | {fused:,.1f} | {fused / base:.2f}x |")
        return
    if args.compile:
        print("| size | precision | train.compile | first step s | samples/s after it | vs eager |")
        print("|---|---|---|---:|---:|---:|")
        for size in args.sizes.split(","):
            for precision in ("fp32", "bf16"):
                eager, eager_first = run(size, precision, args.steps, args.batch_size)
                compiled, compiled_first = run(size, precision, args.steps, args.batch_size, "train.compile=true")
                print(f"| {size} | {precision} | false | {eager_first:.1f} | {eager:,.1f} | 1.00x |")
                print(f"| {size} | {precision} | true | {compiled_first:.1f} | {compiled:,.1f} | "
                      f"{compiled / eager:.2f}x |")
        return
    print("| size | precision | samples/s | vs fp32 |")
    print("|---|---|---:|---:|")
    for size in args.sizes.split(","):
        base, _ = run(size, "fp32", args.steps, args.batch_size)
        bf16, _ = run(size, "bf16", args.steps, args.batch_size)
        print(f"| {size} | fp32 | {base:,.1f} | 1.00x |")
        print(f"| {size} | bf16 autocast | {bf16:,.1f} | {bf16 / base:.2f}x |")


if __name__ == "__main__":
    main()
