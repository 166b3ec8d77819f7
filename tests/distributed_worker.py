"""What each process of the multi-process tests runs (started by torch.distributed.run, gloo on CPU).

``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py SPEC.json``

SPEC holds ``runs`` (``{recipe, overrides, out}``: :func:`sparc_kit.train.train` called by every process, the
engine chosen by the overrides), ``grads`` (``{recipe, overrides, accum_steps, out}``: the gradients of one
fixed global batch through the ddp engine with gradient accumulation, saved by rank 0) and ``bounds``
(``{engine, out}``: a bounded scalar pushed against its cap and back through that engine). The process group is
started here, once, so every run of the spec shares it, as the runs of a long job would.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def fixed_batch(recipe, batch_size: int, seed: int = 123, longest: int | None = None) -> dict[str, torch.Tensor]:
    """A global batch that is a pure function of its arguments: random images, token ids and masks with
    captions of different lengths (so the token counts differ between processes). With ``longest`` the first
    caption has ``longest`` tokens and the others at most half as many, so the first half of the batch (rank 0's
    part) holds a longer caption than the second."""
    g = torch.Generator().manual_seed(seed)
    size = recipe.model.vision.image_size
    length = recipe.tokenizer.context_length
    images = torch.randn(batch_size, 3, size, size, generator=g)
    token_ids = torch.randint(4, recipe.tokenizer.vocab_size, (batch_size, length), generator=g)
    lengths = torch.randint(2, (longest // 2 if longest else length) + 1, (batch_size,), generator=g)
    if longest:
        lengths[0] = longest
    token_mask = torch.arange(length)[None, :] < lengths[:, None]
    token_ids = token_ids.masked_fill(~token_mask, 0)
    return {"images": images, "token_ids": token_ids, "token_mask": token_mask}


def build_module(recipe):
    from sparc_kit.models import build_model
    from sparc_kit.train.loop import build_loss
    from sparc_kit.train.module import TrainModule

    torch.manual_seed(recipe.train.seed)
    return TrainModule(build_model(recipe), build_loss(recipe))


def gradients_of(engine) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in engine.unwrap().named_parameters() if p.grad is not None}


def run_grads(case: dict) -> None:
    import sparc_kit
    from safetensors.torch import save_file

    from sparc_kit.engines import BatchLayout, DDPEngine, OptimizerSpec, param_groups
    from sparc_kit.train.step import compute_gradients

    recipe = sparc_kit.load_recipe(case["recipe"], case["overrides"])
    module = build_module(recipe)
    engine = DDPEngine(device="cpu")
    layout = BatchLayout(recipe.train.batch_size, dist.get_world_size(), case["accum_steps"])
    engine.setup(module, OptimizerSpec(param_groups(module, 0.0), lr=1e-3), layout)
    batch = fixed_batch(recipe, recipe.train.batch_size, longest=case.get("longest"))
    rows = slice(engine.rank * layout.per_rank, (engine.rank + 1) * layout.per_rank)
    seen: list[int] = []  # the token lengths the text tower was given (train.pad_to: longest cuts them)
    module.model.text.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    values, _ = compute_gradients(engine, {k: v[rows] for k, v in batch.items()}, case["accum_steps"])
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, seen)
    if engine.is_main:
        save_file(gradients_of(engine), case["out"])
        with open(case["out"] + ".json", "w") as f:
            json.dump({"values": values, "seen": every}, f)
    engine.close()


class Bounded(torch.nn.Module):
    """A scalar with bounds [0, 2] (as the temperature has), starting just below the cap."""

    def __init__(self):
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.tensor(1.95))

    def parameter_bounds(self):
        return {"log_scale": (0.0, 2.0)}

    def forward(self, direction):
        return {"loss": -direction * self.log_scale}


def run_bounds(case: dict) -> None:
    from sparc_kit.engines import BatchLayout, OptimizerSpec, param_groups
    from sparc_kit.registry import engines

    name = "ddp" if case["engine"] == "ddp" else "deepspeed"
    params = {} if name == "ddp" else {"zero_stage": int(case["engine"][-1])}
    engine = engines.build(name, params, device="cpu", precision="fp32")
    module = Bounded()
    engine.setup(module, OptimizerSpec(param_groups(module, 0.0), lr=0.1), BatchLayout(dist.get_world_size()))
    values = {}
    for direction, steps, key in ((1.0, 3, "at_cap"), (-1.0, 8, "after_down")):
        for _ in range(steps):
            engine.backward(engine(torch.tensor(direction))["loss"])
            engine.step(None)
        full = engine.full_state_dict()
        values[key] = float(full["log_scale"]) if engine.is_main else None
    if engine.is_main:
        with open(case["out"], "w") as f:
            json.dump(values, f)
    engine.close()


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    dist.init_process_group("gloo")
    import sparc_kit
    from sparc_kit.train import train

    for case in spec.get("runs", []):
        recipe = sparc_kit.load_recipe(case["recipe"], case["overrides"])
        train(recipe, case["out"], progress=False)
    for case in spec.get("grads", []):
        run_grads(case)
    for case in spec.get("bounds", []):
        run_bounds(case)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(os.path.dirname(spec_path), "done"), "w") as f:
            f.write("ok\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Every result is written and the group destroyed. Once, under heavy load, a worker aborted after this point
    # in interpreter teardown (a C++ thread of a library destroyed while joinable: "terminate called without an
    # active exception"), failing a run whose every number was right. What the worker checks ends here, so it
    # leaves without the teardown; the console script's own exits are tested in test_faults.py and test_cli.py.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
