"""open_clip and sparc-kit side by side at open_clip's ViT-B-16 shape: one process, steps interleaved.

    python benchmarks/vs_open_clip.py [--steps 6] [--precisions fp32,bf16]
                                      [--systems open_clip,sparc_clip,sparc_sparc] [--tiny] [--threads N]
                                      [--caption-tokens N] [--batch N] [--device cpu|cuda|auto]
                                      [--out FILE.json]

open_clip is optional (the ``bench`` extra): ``pip install 'sparc-kit[bench]'`` or ``pip install open_clip_torch``.
Without it the open_clip rows are skipped and the sparc-kit rows are still measured (their ratios then have no
baseline).

Three systems train the same shape (ViT-B/16 at 224 px, a 12-layer width-512 text tower with 8 heads over 77
tokens, embed dim 512; random init, synthetic random images and token ids, nothing downloaded; every caption fills
the 77 tokens, or with ``--caption-tokens N`` has N real tokens and padding, where sparc-kit's ``train.pad_to:
longest`` cuts the padding and open_clip runs the whole context):

- ``open_clip``: ``open_clip.create_model("ViT-B-16")``, ``open_clip.loss.ClipLoss``, ``torch.optim.AdamW``
  (open_clip's training script's groups: no decay on gains, biases and the logit scale), clipping at the recipe's
  norm with ``clip_grad_norm_``, the logit scale clamped to ln(100) after the step, as open_clip's loop does;
- ``sparc_clip``: ``load_recipe("clip_b16", ...)`` (sparc_b16 with the CLIP loss) with the text tower set to
  open_clip's (width 512, 8 heads, causal, 77 tokens, 49,408-token vocabulary), built by the library and trained
  by ``LocalEngine`` + ``train_step``: the real step (forward, the non-finite check, backward, the engine's AdamW,
  clipping, the temperature clamp);
- ``sparc_sparc``: the same with the recipe's SPARC loss (``sparc_b16``);
- asked for by name in ``--systems`` only: ``sparc_sparc_compile`` (``train.compile: true``; compiles for
  minutes on a CPU) and ``sparc_sparc_xformers`` (``model.attention: xformers``; CUDA with the extra only).

Every system uses the recipe's AdamW numbers (lr, betas, eps, weight decay) and the same gradient clipping (the
recipe's ``optim.grad_clip``, 1.0). For each precision (fp32, bf16 autocast) all systems are built, take one
warm-up step counted with ``torch.utils.flop_counter.FlopCounterMode`` and one more warm-up step, then ``--steps``
rounds in which each system takes one timed step (the order rotated every round). Reported: the median step time,
samples/s, the ratio to open_clip, the best (shortest) step and its ratio (the steadier number when other work
shares the machine), the FLOPs of one step, and the achieved FLOP/s over the rate of a 4096^3 bf16
matrix product measured in the same run (before and after the steps; the higher is used), and over the rate of
the step's own matrix shapes (each Linear and the patch convolution: the forward and both backward products in
bf16, weighted by use, at the lengths the step runs; what a step made of nothing but its matrix products would
reach). On CUDA (``--device cuda``) the timing is synchronised and a column adds MFU, the achieved FLOP/s over the
device's datasheet dense bf16 peak (``DATASHEET_BF16_PEAK``). The table is printed and written as JSON (default
``benchmarks/results/vs_open_clip.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

import sparc_kit
from sparc_kit.engines import BatchLayout, LocalEngine, OptimizerSpec
from sparc_kit.models import vit
from sparc_kit.models.text import cut_padding
from sparc_kit.models.vit import embed_patches
from sparc_kit.train import build_loss
from sparc_kit.train.module import TrainModule
from sparc_kit.train.step import train_step

INSTALL_HINT = "pip install 'sparc-kit[bench]'  (or: pip install open_clip_torch)"
SYSTEMS = ("open_clip", "sparc_clip", "sparc_sparc")
# asked for by name (--systems): with train.compile (compiles for minutes on a CPU), and SPARC with the xformers
# attention backend (CUDA with the xformers extra only)
OPTIONAL_SYSTEMS = ("sparc_sparc_compile", "sparc_sparc_xformers")
RECIPES = {"sparc_clip": "clip_b16", "sparc_sparc": "sparc_b16", "sparc_sparc_compile": "sparc_b16",
           "sparc_sparc_xformers": "sparc_b16"}
EXTRA_OVERRIDES = {
    "sparc_sparc_compile": ["train.compile=true"],
    "sparc_sparc_xformers": ["model.attention=xformers"],
}

#: dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s, without sparsity), for MFU on CUDA; matched
#: against torch.cuda.get_device_name() in this order
DATASHEET_BF16_PEAK = (
    ("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12), ("L40S", 362.1e12),
    ("L4", 121.0e12), ("A10", 125.0e12), ("RTX 4090", 165.2e12), ("V100", 125.0e12),
)


def datasheet_peak(device: torch.device) -> tuple[str, float | None]:
    """The device's name and its datasheet dense bf16 peak (None where this table does not know it: a CPU)."""
    if device.type != "cuda":
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in DATASHEET_BF16_PEAK if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shape(tiny: bool) -> dict[str, int]:
    """The open_clip ViT-B-16 shape, or a tiny one for the smoke test."""
    if tiny:
        return dict(image=32, patch=8, v_width=64, v_depth=2, v_heads=2, t_width=64, t_depth=2, t_heads=2,
                    context=16, vocab=512, embed=32, batch=4)
    return dict(image=224, patch=16, v_width=768, v_depth=12, v_heads=12, t_width=512, t_depth=12, t_heads=8,
                context=77, vocab=49408, embed=512, batch=8)


def sparc_overrides(s: dict[str, int], precision: str, device: str = "cpu") -> list[str]:
    return [
        f"model.embed_dim={s['embed']}",
        f"model.vision.image_size={s['image']}", f"model.vision.patch_size={s['patch']}",
        f"model.vision.width={s['v_width']}", f"model.vision.depth={s['v_depth']}",
        f"model.vision.heads={s['v_heads']}",
        f"model.text.width={s['t_width']}", f"model.text.depth={s['t_depth']}", f"model.text.heads={s['t_heads']}",
        "model.text.causal=true",  # open_clip's text tower is causal
        f"tokenizer.context_length={s['context']}", f"tokenizer.vocab_size={s['vocab']}",
        f"train.batch_size={s['batch']}", f"train.precision={precision}", f"train.device={device}",
    ]


def synthetic_batch(s: dict[str, int], caption_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """Random images and token ids. Every caption fills the context, or with ``caption_tokens`` each has that many
    real tokens (the last the end-of-text id, the vocabulary's highest, where open_clip pools) and then id-0
    padding, as a tokenizer pads a short caption."""
    g = torch.Generator().manual_seed(0)
    b, size, context = s["batch"], s["image"], s["context"]
    ids = torch.randint(1, s["vocab"] - 1, (b, context), generator=g)
    mask = torch.ones(b, context, dtype=torch.bool)
    if caption_tokens is not None:
        mask = torch.arange(context)[None, :].expand(b, -1) < caption_tokens
        ids = ids.masked_fill(~mask, 0)
        ids[:, caption_tokens - 1] = s["vocab"] - 1
    return {"images": torch.randn(b, 3, size, size, generator=g), "token_ids": ids, "token_mask": mask}


def recipe_optim(s: dict[str, int]):
    return sparc_kit.load_recipe("sparc_b16", sparc_overrides(s, "fp32")).optim


class System:
    """One trainable system: ``step()`` is one full optimizer step on the fixed batch."""

    def __init__(self, name: str, step: Callable[[], None], params: int, module: torch.nn.Module | None = None):
        self.name, self.step, self.params, self.module = name, step, params, module
        self.times: list[float] = []
        self.flops = 0


def build_sparc(name: str, s: dict[str, int], precision: str, batch: dict[str, torch.Tensor]) -> System:
    device = batch["images"].device
    overrides = [*sparc_overrides(s, precision, device.type), *EXTRA_OVERRIDES.get(name, [])]
    recipe = sparc_kit.load_recipe(RECIPES[name], overrides)
    torch.manual_seed(0)
    model, loss_fn = sparc_kit.build_model(recipe), build_loss(recipe)
    if recipe.train.compile:
        model.compile_blocks()  # as the training loop does; compiled during the warm-up steps
    module = TrainModule(model, loss_fn)
    o = recipe.optim
    engine = LocalEngine(device=device.type, precision=precision)
    spec = OptimizerSpec.from_recipe(o, module)  # as train/loop.py builds it
    engine.setup(module, spec, BatchLayout(s["batch"]), o.grad_clip)

    def step() -> None:
        train_step(engine, batch, grad_clip=o.grad_clip, pad_to=recipe.train.pad_to)

    return System(name, step, sum(p.numel() for p in module.parameters()), module)


def build_open_clip(s: dict[str, int], precision: str, batch: dict[str, torch.Tensor], optim) -> System:
    import open_clip
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    if s["image"] == 224:
        model = open_clip.create_model("ViT-B-16")  # random init: no pretrained tag
    else:  # --tiny
        model = open_clip.CLIP(
            s["embed"],
            open_clip.model.CLIPVisionCfg(layers=s["v_depth"], width=s["v_width"], patch_size=s["patch"],
                                          image_size=s["image"], head_width=s["v_width"] // s["v_heads"]),
            open_clip.model.CLIPTextCfg(context_length=s["context"], vocab_size=s["vocab"], width=s["t_width"],
                                        heads=s["t_heads"], layers=s["t_depth"]),
        )
    device = batch["images"].device
    model.to(device).train()
    loss_fn = ClipLoss()
    # open_clip's training script: gains, biases and the logit scale are not decayed
    excluded = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if excluded(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not excluded(n, p)], "weight_decay": optim.weight_decay}],
        lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
    )
    params = [p for _, p in named]
    images, tokens = batch["images"], batch["token_ids"]
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if autocast is not None:
            with autocast():
                loss = loss_fn(*model(images, tokens)[:3])
        else:
            loss = loss_fn(*model(images, tokens)[:3])  # (image features, text features, logit scale)
        loss.backward()
        if optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, optim.grad_clip, norm_type=2.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return System("open_clip", step, sum(p.numel() for p in params))


def best_mm_seconds(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    """The shortest of ``reps`` timed ``a @ b`` after one warm-up (synchronised on CUDA)."""
    torch.mm(a, b)
    synchronize(a.device)
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(a.device)
        best = min(best, time.perf_counter() - start)
    return best


def gemm_rate(n: int = 4096, reps: int = 5, device: torch.device = torch.device("cpu")) -> float:
    """FLOP/s of an n^3 bf16 matrix product: the best of ``reps`` after one warm-up."""
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    return 2 * n**3 / best_mm_seconds(a, b, reps)


def matrix_shapes(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[tuple[int, int, int], int]:
    """(M, K, N) of every Linear and Conv2d product in one forward of ``module`` (a TrainModule), with counts."""
    shapes: dict[tuple[int, int, int], int] = {}

    def record(layer, inputs, output):
        if isinstance(layer, torch.nn.Linear):
            key = (inputs[0].numel() // layer.in_features, layer.in_features, layer.out_features)
        else:  # a patch-embedding convolution: one product of (patches, C p p) by (C p p, width)
            key = (output.numel() // layer.out_channels, layer.weight[0].numel(), layer.out_channels)
        shapes[key] = shapes.get(key, 0) + 1

    def patches(images, conv):  # the native ViT's patch embedding: one product, not a Conv2d call
        out = embed_patches(images, conv)
        record(conv, (images,), out)
        return out

    hooks = [m.register_forward_hook(record) for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    try:
        with torch.no_grad(), mock.patch.object(vit, "embed_patches", patches):
            module(**batch)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def shapes_gemm_rate(shapes: dict[tuple[int, int, int], int], reps: int = 3,
                     device: torch.device = torch.device("cpu")) -> float:
    """FLOP/s of the step's own bf16 matrix products: for each (M, K, N), the forward (M,K)x(K,N) and the two
    backward products (M,N)x(N,K) and (N,M)x(M,K) in the layouts autograd runs them, best of ``reps``, weighted
    by how often each shape occurs. The ceiling of a step made of nothing but its matrix products."""
    flops = seconds = 0.0
    for (m, k, n), count in shapes.items():
        x, w, g = (torch.randn(*sz, dtype=torch.bfloat16, device=device) for sz in ((m, k), (n, k), (m, n)))
        products = ((x, w.t()), (g, w), (g.t(), x))
        for a, b in products:
            flops += count * 2 * m * k * n
            seconds += count * best_mm_seconds(a, b, reps)
    return flops / seconds


def commit() -> str:
    """This checkout's commit, and whether the sparc_kit measured is this checkout's (with uncommitted edits?)."""
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sparc_kit"], cwd=here, capture_output=True,
                               text=True)
    except OSError:
        return "unknown"
    if here not in Path(sparc_kit.__file__).resolve().parents:
        return sha.stdout.strip() + " (sparc_kit imported from outside this checkout)"
    return sha.stdout.strip() + (" (sparc_kit/ has uncommitted edits)" if dirty.stdout.strip() else "")


def measure(precision: str, names: list[str], s: dict[str, int], steps: int, optim,
            caption_tokens: int | None = None, device: torch.device = torch.device("cpu")) -> list[System]:
    batch = {k: v.to(device) for k, v in synthetic_batch(s, caption_tokens).items()}
    systems = [build_open_clip(s, precision, batch, optim) if n == "open_clip" else build_sparc(n, s, precision, batch)
               for n in names]
    for system in systems:  # warm-up 1, counted; warm-up 2, plain
        counter = FlopCounterMode(display=False)
        with counter:
            system.step()
        system.flops = counter.get_total_flops()
        system.step()
    for r in range(steps):  # interleaved; the order rotates so no system always runs right after another
        for system in systems[r % len(systems):] + systems[: r % len(systems)]:
            synchronize(device)
            start = time.perf_counter()
            system.step()
            synchronize(device)
            system.times.append(time.perf_counter() - start)
    return systems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per system and precision")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--tiny", action="store_true", help="a tiny shape (the smoke test); not a measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--batch", type=int, default=None,
                        help="the batch (default 8, the comparison's; 4 with --tiny; a GPU wants more for a "
                        "meaningful MFU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                        help="cpu (the default), cuda, or auto (cuda when there is one); on CUDA the table adds MFU "
                        "against the device's datasheet bf16 peak")
    parser.add_argument("--caption-tokens", type=int, default=None,
                        help="real tokens per caption, the rest padding (default: every caption fills the context). "
                        "sparc-kit cuts the padding (train.pad_to: longest), open_clip runs all 77 tokens")
    parser.add_argument("--out", default=None, help="the JSON file (default benchmarks/results/vs_open_clip.json)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    names = [n for n in args.systems.split(",") if n]
    unknown = [n for n in names if n not in SYSTEMS + OPTIONAL_SYSTEMS]
    if unknown:
        parser.error(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS + OPTIONAL_SYSTEMS)}")
    if "open_clip" in names:
        try:
            import open_clip  # noqa: F401
        except ImportError:
            print(f"open_clip is not installed: skipping its rows. To compare against it: {INSTALL_HINT}")
            names.remove("open_clip")
    precisions = [p for p in args.precisions.split(",") if p]
    s = shape(args.tiny)
    if args.batch is not None:
        if args.batch < 1:
            parser.error("--batch must be at least 1")
        s["batch"] = args.batch
    if args.caption_tokens is not None and not 1 <= args.caption_tokens <= s["context"]:
        parser.error(f"--caption-tokens must be between 1 and the context length {s['context']}")
    optim = recipe_optim(s)
    threads, measured = torch.get_num_threads(), commit()  # the commit at start (another may land meanwhile)
    print(f"\nopen_clip against sparc-kit, {'TINY shape' if args.tiny else 'ViT-B/16 224 px, text 12 x 512, 77 tokens'}"
          f"{'' if args.caption_tokens is None else f' ({args.caption_tokens} real)'}"
          f", batch {s['batch']}, {args.steps} interleaved steps after 2 warm-up, {device.type.upper()} "
          f"({threads} CPU threads), "
          f"torch {torch.__version__}, sparc-kit commit {measured}")
    print(f"AdamW lr {optim.lr}, betas {tuple(optim.betas)}, eps {optim.eps}, weight decay {optim.weight_decay}, "
          f"gradient clipping at {optim.grad_clip} for every system\n")

    if "sparc_sparc_xformers" in names and device.type != "cuda":
        print("sparc_sparc_xformers: xformers runs on CUDA only: skipping its rows")
        names.remove("sparc_sparc_xformers")
    device_name, peak = datasheet_peak(device)
    n = 1024 if args.tiny else 4096
    rate_before = gemm_rate(n, device=device)
    results: dict[str, list[System]] = {}
    for precision in precisions:
        print(f"measuring {precision}: {', '.join(names)} ...", flush=True)
        results[precision] = measure(precision, names, s, args.steps, optim, args.caption_tokens, device)
    rate_after = gemm_rate(n, device=device)
    rate = max(rate_before, rate_after)
    probe = next((x for p in results.values() for x in p if x.module is not None), None)
    own_rate = None
    if probe:
        probe_batch = {k: v.to(device) for k, v in synthetic_batch(s, args.caption_tokens).items()}
        # the lengths the step runs (train.pad_to: longest cuts the padding before the towers)
        probe_batch["token_ids"], probe_batch["token_mask"] = cut_padding(probe_batch["token_ids"],
                                                                          probe_batch["token_mask"])
        own_rate = shapes_gemm_rate(matrix_shapes(probe.module, probe_batch), device=device)

    rows: list[dict[str, Any]] = []
    for precision, systems in results.items():
        base = next((x for x in systems if x.name == "open_clip"), None)
        for x in systems:
            median = statistics.median(x.times)
            row = {
                "system": x.name, "precision": precision, "params": x.params, "median_step_s": median,
                "step_times_s": x.times, "samples_per_s": s["batch"] / median, "step_flops": x.flops,
                "achieved_flops_per_s": x.flops / median, "fraction_of_bf16_gemm_rate": x.flops / median / rate,
                "fraction_of_own_shapes_gemm_rate": x.flops / median / own_rate if own_rate else None,
                "time_x_open_clip": median / statistics.median(base.times) if base else None,
                "best_step_s": min(x.times),
                "best_time_x_open_clip": min(x.times) / min(base.times) if base else None,
                "flops_x_open_clip": x.flops / base.flops if base else None,
                "mfu": x.flops / median / peak if peak else None,
            }
            rows.append(row)

    label = {"open_clip": "open_clip (CLIP)", "sparc_clip": "sparc-kit CLIP", "sparc_sparc": "sparc-kit SPARC",
             "sparc_sparc_compile": "sparc-kit SPARC, train.compile",
             "sparc_sparc_xformers": "sparc-kit SPARC, attention: xformers"}
    print(f"device: {device_name}" + (f", datasheet dense bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else ""))
    print(f"bf16 GEMM 4096^3: {rate_before / 1e12:.2f} TFLOP/s before the steps, {rate_after / 1e12:.2f} after"
          if not args.tiny else f"bf16 GEMM 1024^3 (tiny): {rate / 1e9:.1f} GFLOP/s")
    if peak:
        print(f"the measured 4096^3 GEMM is {rate / peak:.2f} of the datasheet peak")
    if own_rate:
        print(f"bf16 GEMM at the step's own matrix shapes (forward and both backward products, weighted by use): "
              f"{own_rate / 1e12:.2f} TFLOP/s, {own_rate / rate:.2f} of the 4096^3 rate")
    print("\n| system | precision | params (M) | median step s | samples/s | step time x open_clip "
          "| best step s | best x open_clip "
          "| GFLOP per step | FLOPs x open_clip | achieved GFLOP/s | x bf16 GEMM rate | x own-shapes GEMM rate "
          "| MFU (datasheet) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
    for r in rows:
        print(f"| {label[r['system']]} | {r['precision']} | {r['params'] / 1e6:.1f} | {r['median_step_s']:.3f} "
              f"| {r['samples_per_s']:.2f} | {fmt(r['time_x_open_clip'])} | {r['best_step_s']:.3f} "
              f"| {fmt(r['best_time_x_open_clip'])} | {r['step_flops'] / 1e9:,.0f} "
              f"| {fmt(r['flops_x_open_clip'])} | {r['achieved_flops_per_s'] / 1e9:,.0f} "
              f"| {r['fraction_of_bf16_gemm_rate']:.3f} | {_fraction(r['fraction_of_own_shapes_gemm_rate'])} "
              f"| {_fraction(r['mfu'])} |")

    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / "vs_open_clip.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "commit": measured, "torch": torch.__version__, "threads": threads, "cpu": platform.processor() or None,
        "device": device.type, "device_name": device_name, "datasheet_bf16_peak_flops_per_s": peak,
        "cpus": os.cpu_count(), "tiny": args.tiny, "shape": s, "caption_tokens": args.caption_tokens,
        "steps": args.steps, "warmup_steps": 2,
        "optim": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
                  "grad_clip": optim.grad_clip},
        "open_clip": _version("open_clip"),
        "bf16_gemm_flops_per_s": {"before": rate_before, "after": rate_after, "used": rate, "n": n,
                                  "own_shapes": own_rate},
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwritten: {out}")
    return 0


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
