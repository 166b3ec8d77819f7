"""Measure three small-scale recipe choices that decide how well a small dual encoder learns.

    python benchmarks/learning_choices.py --data synthetic --loss clip --seeds 0 1 --steps 300
    python benchmarks/learning_choices.py --data cifar10 --loss clip --seeds 0 1 --steps 300 --set train.batch_size=64

The choices (all recipe fields, docs/recipes.md):

- ``optim.grad_clip``: global-norm gradient clipping (1.0, or null for none);
- ``model.text_end_token``: whether the end-of-caption token joins the caption's tokens in the pooled mean and
  the token-level losses (``include``) or is only attended to (``exclude``);
- ``model.text.embed_init_std``: the standard deviation of the text token embedding's initialisation (CLIP's
  0.02, or 1.0 as ``nn.Embedding`` does by default).

Each configuration is trained with the same seeds, starting from the dataset's built-in recipe
(``clip_tiny`` / ``sparc_tiny`` on the synthetic shapes, ``clip_cifar10`` / ``sparc_cifar10`` on the CIFAR-10
shards, by ``--loss``), and judged on data it did
not train on:

- synthetic: held-out retrieval R@1 over 1,000 shapes images of another seed, in galleries of 100 (a hit when the
  retrieved caption, or the retrieved image's caption, is the query's own text: the synthetic captions repeat);
- cifar10: zero-shot top-1 on the 10,000 test images (the recipe's evaluator, CLIP prompt ensemble).

Prints one table (mean and spread over seeds, with the difference to the first configuration) and writes the
per-step loss curves and results as JSON (``--json``) for docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

CONFIGS = {
    # name: overrides
    "clip conventions (clip 1.0, end token, std 0.02)": [
        "optim.grad_clip=1.0", "model.text_end_token=include", "model.text.embed_init_std=0.02"],
    "chosen (no clip, no end token, std 1.0)": [
        "optim.grad_clip=null", "model.text_end_token=exclude", "model.text.embed_init_std=1.0"],
    "chosen, but grad clip 1.0": [
        "optim.grad_clip=1.0", "model.text_end_token=exclude", "model.text.embed_init_std=1.0"],
    "chosen, but end token in the mean": [
        "optim.grad_clip=null", "model.text_end_token=include", "model.text.embed_init_std=1.0"],
    "chosen, but embedding std 0.02": [
        "optim.grad_clip=null", "model.text_end_token=exclude", "model.text.embed_init_std=0.02"],
}

RECIPES = {("synthetic", "sparc"): "sparc_tiny", ("cifar10", "sparc"): "sparc_cifar10",
           ("synthetic", "clip"): "clip_tiny", ("cifar10", "clip"): "clip_cifar10"}


@torch.no_grad()
def synthetic_retrieval(run: str, n: int = 1000, gallery: int = 100, seed: int = 12345) -> dict[str, float]:
    from sparc_kit.data.synthetic import SyntheticShapes
    from sparc_kit.pretrained import load_pretrained

    model, tokenizer, transform = load_pretrained(run)
    data = SyntheticShapes(num_samples=n, image_size=model.vision.image_size, seed=seed)
    hits_i2t = hits_t2i = 0
    for start in range(0, n, gallery):
        items = [data[i] for i in range(start, min(start + gallery, n))]
        captions = [it["caption"] for it in items]
        images = torch.stack([transform(it["image"]) for it in items])
        ids, mask = tokenizer(captions)
        sim = model.encode_image(images) @ model.encode_text(ids, mask).T
        for q, j in enumerate(sim.argmax(dim=1).tolist()):
            hits_i2t += captions[j] == captions[q]
        for q, j in enumerate(sim.argmax(dim=0).tolist()):
            hits_t2i += captions[j] == captions[q]
    return {"i2t_r1": 100.0 * hits_i2t / n, "t2i_r1": 100.0 * hits_t2i / n}


def run_one(data: str, loss: str, overrides: list[str], seed: int, steps: int, root: str, extra=()) -> dict:
    from sparc_kit.config import load_recipe
    from sparc_kit.train import train

    sets = [*overrides, *extra, f"train.seed={seed}", f"train.steps={steps}", f"train.checkpoint_every={steps}"]
    if data == "cifar10":
        sets += [f"optim.warmup_steps={max(steps // 10, 1)}"]
    recipe = load_recipe(RECIPES[data, loss], sets)
    # evaluate once, after the last step
    recipe = recipe.model_copy(update={"eval": [e.model_copy(update={"every": None}) for e in recipe.eval]})
    out = tempfile.mkdtemp(dir=root)
    t0 = time.perf_counter()
    result = train(recipe, out, progress=False)
    seconds = time.perf_counter() - t0
    rows = [r for r in result.metrics if "loss" in r]
    record = {
        "seed": seed,
        "seconds": seconds,
        "curve": [(r["step"], r["loss"], r.get("global_loss")) for r in rows],
        "final_global": rows[-1].get("global_loss", rows[-1]["loss"]),
    }
    if data == "synthetic":
        record.update(synthetic_retrieval(out))
    else:
        record["zeroshot_top1"] = 100.0 * result.metrics[-1]["eval/zeroshot/top1"]  # logged with the last step
    return record


def summarise(records: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in records]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["synthetic", "cifar10"], default="synthetic")
    parser.add_argument("--loss", choices=["clip", "sparc"], default="clip", help="which built-in recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--set", dest="extra", action="append", default=[], help="another recipe override")
    parser.add_argument("--only", type=int, nargs="*", help="indices of CONFIGS to run (default all)")
    parser.add_argument("--json", help="write every run's record here")
    parser.add_argument("--workdir", default=None, help="where run folders go (default a temporary folder)")
    parser.add_argument("--plot", help="draw the global-loss curves (mean over seeds) into this PNG")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    names = list(CONFIGS)
    chosen = [names[i] for i in args.only] if args.only else names
    root = args.workdir or tempfile.mkdtemp(prefix="learning-choices-")
    results: dict[str, list[dict]] = {}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            results = json.load(f)["runs"]
    for name in chosen:
        for seed in args.seeds:
            if any(r["seed"] == seed for r in results.get(name, [])):
                continue
            record = run_one(args.data, args.loss, CONFIGS[name], seed, args.steps, root, args.extra)
            results.setdefault(name, []).append(record)
            print(f"{name} seed {seed}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in record.items() if isinstance(v, float)), file=sys.stderr, flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"data": args.data, "loss": args.loss, "steps": args.steps, "set": args.extra,
                               "runs": results}, f)
    metrics = ["i2t_r1", "t2i_r1"] if args.data == "synthetic" else ["zeroshot_top1"]
    metrics.append("final_global")
    base = results.get(names[0])
    header = "| configuration | seeds | " + " | ".join(metrics) + " |"
    print(header)
    print("|---|---:|" + "---:|" * len(metrics))
    for name in names:
        if name not in results:
            continue
        cells = []
        for m in metrics:
            mean, sd = summarise(results[name], m)
            cell = f"{mean:.3f} ± {sd:.3f}" if m == "final_global" else f"{mean:.1f} ± {sd:.1f}"
            if base and name != names[0]:
                delta = mean - summarise(base, m)[0]
                cell += f" ({delta:+.3f})" if m == "final_global" else f" ({delta:+.1f})"
            cells.append(cell)
        print(f"| {name} | {len(results[name])} | " + " | ".join(cells) + " |")
    if args.plot:
        plot_curves(results, names, f"{args.data}, {args.loss} loss, {args.steps} steps", args.plot)


def plot_curves(results: dict[str, list[dict]], names: list[str], title: str, path: str) -> None:
    """The logged global loss against the step, the mean over seeds, one line per configuration."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name in names:
        if name not in results:
            continue
        curves = [{step: g if g is not None else loss for step, loss, g in r["curve"]} for r in results[name]]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        ax.plot(steps, [statistics.mean(c[s] for c in curves) for s in steps], label=name, linewidth=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("global (CLIP) loss, mean over seeds")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
