"""Memory and time per process against the number of processes: the global loss, and the ZeRO stages.

    python benchmarks/distributed.py [--part logits,zero] [--batches 1024,4096] [--zero-batch 4]

Part ``logits``: the CLIP loss on embeddings alone (forward + backward, towers excluded; D = 512), one process
against two (torchrun, gloo), with ``local_loss`` on (each process builds [B/W, B] logits, open_clip's local loss
with gather-with-grad) and off (each process builds the whole [B, B]). Per process: peak resident memory above
the inputs, and the step time. The baseline of each batch size is one process.

Part ``zero``: the real ``sparc_b16`` model (ViT-B/16 at 224 px, 12x768 text tower, 55 tokens) trained for two
steps at a small global batch on two processes with every engine configuration: ``ddp`` (every process holds
the weights, gradients and both AdamW moments) against DeepSpeed ZeRO-1 (optimizer state partitioned), ZeRO-2
(and gradients), ZeRO-3 (and weights), ZeRO-2 with the optimizer offloaded and ZeRO-3 with weights offloaded.
Per process: peak resident memory and the median step time. The baseline is ``ddp``. On a CPU the "offload"
moves tensors to the same memory, so it can only cost here; its use is on GPUs.

Each point runs in fresh processes, so a peak is its own. Every process runs one thread (``OMP_NUM_THREADS=1``):
two processes then use the two cores a single process would use with two threads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ZERO_CONFIGS = {
    "ddp": ["engine.name=ddp"],
    "ZeRO-1": ["engine.name=deepspeed", "engine.zero_stage=1"],
    "ZeRO-2": ["engine.name=deepspeed", "engine.zero_stage=2"],
    "ZeRO-3": ["engine.name=deepspeed", "engine.zero_stage=3"],
    "ZeRO-2 + offload optimizer": ["engine.name=deepspeed", "engine.zero_stage=2", "engine.offload_optimizer=true"],
    "ZeRO-3 with 2e7-element buckets": [
        "engine.name=deepspeed", "engine.zero_stage=3",
        "engine.config={zero_optimization: {reduce_bucket_size: 20000000, stage3_prefetch_bucket_size: 20000000, "
        "stage3_max_live_parameters: 20000000}}",
    ],
    "ZeRO-3 + offload params": [
        "engine.name=deepspeed", "engine.zero_stage=3", "engine.offload_params=true", "engine.offload_optimizer=true",
    ],
}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _live_tensor_mib() -> float:
    """The bytes of every tensor storage this process still holds (each storage once), in MiB: weights,
    gradients, optimizer state, buffers, whatever an engine keeps between steps."""
    import gc

    import torch

    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                continue
            storage = obj.untyped_storage()
        except Exception:
            continue
        key = storage.data_ptr()
        if key and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total / 2**20


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _group():
    import torch.distributed as dist

    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist


def child_logits(batch: int, local_loss: bool, dim: int, reps: int, out: str) -> None:
    import torch

    from sparc_kit.losses import ClipLoss

    dist = _group()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(rank)
    b = batch // world
    image = torch.randn(b, dim, requires_grad=True)
    text = torch.randn(b, dim, requires_grad=True)
    scale = torch.tensor(14.3, requires_grad=True)
    loss_fn = ClipLoss(local_loss=local_loss)
    base = _peak_mib()
    times = []
    for _ in range(reps):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        loss_fn(image, text, scale)["loss"].backward()
        times.append(time.perf_counter() - start)
        image.grad = text.grad = scale.grad = None
    record = {"peak_mib": _peak_mib() - base, "seconds": statistics.median(times[1:] or times)}
    _write(record, out, dist)


def child_zero(overrides: list[str], steps: int, out: str) -> None:
    import torch

    import sparc_kit
    from sparc_kit.engines import BatchLayout, OptimizerSpec, param_groups
    from sparc_kit.train.loop import build_engine, build_loss
    from sparc_kit.train.module import TrainModule
    from sparc_kit.train.step import train_step

    recipe = sparc_kit.load_recipe("sparc_b16", ["train.precision=fp32", *overrides])
    engine = build_engine(recipe)
    engine.start()
    torch.manual_seed(0)
    module = TrainModule(sparc_kit.build_model(recipe), build_loss(recipe))
    params = sum(p.numel() for p in module.parameters())
    layout = BatchLayout(recipe.train.batch_size, engine.world_size, 1)
    engine.setup(module, OptimizerSpec(param_groups(module, 0.2), lr=1e-4), layout, 1.0)
    g = torch.Generator().manual_seed(engine.rank)
    n, size, length = layout.per_rank, recipe.model.vision.image_size, recipe.tokenizer.context_length
    batch = {
        "images": torch.randn(n, 3, size, size, generator=g),
        "token_ids": torch.randint(4, recipe.tokenizer.vocab_size, (n, length), generator=g),
        "token_mask": torch.ones(n, length, dtype=torch.bool),
    }
    times = []
    for _ in range(steps):
        engine.barrier()
        start = time.perf_counter()
        train_step(engine, batch, grad_clip=1.0)
        times.append(time.perf_counter() - start)
    record = {
        "peak_mib": _peak_mib(),
        "resident_mib": _resident_mib(),
        "tensor_mib": _live_tensor_mib(),
        "seconds": statistics.median(times[1:] or times),
        "params": params,
    }
    import torch.distributed as dist

    _write(record, out, dist)
    engine.close()


def _write(record: dict, out: str, dist) -> None:
    records = [record]
    if dist.is_initialized():
        records = [None] * dist.get_world_size()
        dist.all_gather_object(records, record)
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(records, f)


def _launch(world: int, child_args: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        script = [os.path.abspath(__file__), *child_args, "--out", out]
        if world == 1:
            cmd = [sys.executable, *script]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *script]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"child failed: {' '.join(child_args)}\n{done.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def logits_table(batches: list[int], dim: int, reps: int) -> None:
    print(f"\n### The global loss per process (CLIP, D = {dim}, forward + backward of the loss alone)\n")
    print("| global B | processes | local loss | logits per process | peak MiB per process | x 1 process | "
          "ms per step | x 1 process |")
    print("|---:|---:|---|---|---:|---:|---:|---:|")
    for batch in batches:
        base = _launch(1, ["--child", "logits", str(batch), "1", "--dim", str(dim), "--reps", str(reps)])[0]
        rows = [(1, True, base)]
        for local in (True, False):
            recs = _launch(2, ["--child", "logits", str(batch), str(int(local)), "--dim", str(dim), "--reps", str(reps)])
            rows.append((2, local, {k: max(r[k] for r in recs) for k in ("peak_mib", "seconds")}))
        for world, local, r in rows:
            shape = f"{batch // world} x {batch}" if local else f"{batch} x {batch}"
            print(f"| {batch:,} | {world} | {'on' if local else 'off'} | {shape} | {r['peak_mib']:.0f} | "
                  f"{r['peak_mib'] / base['peak_mib']:.2f}x | {1000 * r['seconds']:.1f} | "
                  f"{r['seconds'] / base['seconds']:.2f}x |")


def zero_table(batch: int, steps: int, engines: list[str]) -> None:
    print(f"\n### Engines on sparc_b16 (ViT-B/16, 224 px), global batch {batch}, 2 processes, fp32, AdamW\n")
    print("| engine | resident after the steps, MiB | x ddp | peak resident, MiB | tensors held (Python-visible), "
          "MiB | s per step | x ddp |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    results = {}
    for name, overrides in ZERO_CONFIGS.items():
        if name != "ddp" and name not in engines:
            continue
        args = ["--child", "zero", json.dumps([f"train.batch_size={batch}", *overrides]), "--steps", str(steps)]
        recs = _launch(2, args)
        results[name] = {k: max(r[k] for r in recs) for k in ("peak_mib", "resident_mib", "tensor_mib", "seconds")}
        results[name]["params"] = recs[0]["params"]
    base = results["ddp"]
    for name, r in results.items():
        print(f"| {name} | {r['resident_mib']:,.0f} | {r['resident_mib'] / base['resident_mib']:.2f}x | "
              f"{r['peak_mib']:,.0f} | {r['tensor_mib']:,.0f} | {r['seconds']:.2f} | "
              f"{r['seconds'] / base['seconds']:.2f}x |")
    params = base["params"]
    print(f"\n{params / 1e6:.1f}M parameters: fp32 weights {params * 4 / 2**20:,.0f} MiB, and as much again for the "
          f"gradients and for each AdamW moment.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", default="logits,zero")
    parser.add_argument("--batches", default="1024,4096,8192")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--zero-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--engines", default=",".join(ZERO_CONFIGS), help="rows of the zero part (ddp always)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "logits":
            child_logits(int(rest[0]), bool(int(rest[1])), args.dim, args.reps, args.out)
        else:
            child_zero(json.loads(rest[0]), args.steps, args.out)
        return
    parts = args.part.split(",")
    if "logits" in parts:
        logits_table([int(b) for b in args.batches.split(",")], args.dim, args.reps)
    if "zero" in parts:
        zero_table(args.zero_batch, args.steps, args.engines.split(","))


if __name__ == "__main__":
    main()
