"""DeepSpeed ZeRO stages 0-3 with optimizer and parameter offload, behind the same engine interface.

The DeepSpeed config is generated from the recipe (global batch, micro-batch, accumulation, clipping, bf16,
ZeRO stage, offload, optimizer; :mod:`sparc_kit.engines.deepspeed_config`); ``engine.config`` passes any other
raw DeepSpeed key through, and a raw key that contradicts what the recipe already sets is a recipe error. DeepSpeed is imported only
when a run uses this engine (the ``deepspeed`` extra: ``pip install 'sparc-kit[deepspeed]'``).

Checkpoints go through DeepSpeed's own ``save_checkpoint`` / ``load_checkpoint`` (each rank writes its
partition under ``step_N/deepspeed/``); rank 0 also writes the consolidated fp32 weights as ``model.safetensors``
at every checkpoint, so ``load_pretrained`` and ``sparc eval`` read a ZeRO-3 run like any other.
:func:`consolidate_zero_checkpoint` rebuilds that file from the partitions alone, without a process group.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import warnings
from typing import Any, Iterator, Literal

import torch
import torch.nn as nn

from sparc_kit.checkpoint import DEEPSPEED, weights_file, write_safetensors
from sparc_kit.engines.base import Engine, EngineSetupError, NonFiniteGradient, OptimizerSpec
from sparc_kit.engines.deepspeed_config import (  # deepspeed_config, check_recipe: re-exported, their earlier home
    HOUSEKEEPING,
    check_recipe,
    conflicts,
    deepspeed_config,
    generate_config,
    merge,
    settings_problems,
    uses_ds_optimizer,
)
from sparc_kit.io import load_torch_file
from sparc_kit.registry import engines

__all__ = ["DeepSpeedEngine", "deepspeed_config", "check_recipe", "consolidate_zero_checkpoint", "DS_TAG"]

DS_TAG = "state"  # the tag of DeepSpeed's checkpoint inside a step folder: step_N/deepspeed/state/
DS_FOLDER = DEEPSPEED


def _deepspeed_safe_globals() -> list[Any]:
    """The plain-data classes DeepSpeed 0.19 pickles into its checkpoints (a loss-scaler record, the ZeRO stage
    enum, a dataclass of fragment offsets): allowed beside tensors and containers, nothing that runs code."""
    found = []
    for module, name in (
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: a missing one is refused, with its name
            pass
    return found


@contextlib.contextmanager
def _weights_only_loads(ds: Any) -> Iterator[None]:
    """DeepSpeed reads its checkpoint files with torch.load and weights_only=False, which runs whatever a pickle
    names. For the duration of a load, its checkpoint engine reads them weights-only instead (with DeepSpeed's own
    plain-data classes allowed), so a planted file is refused in one line naming it, before any of it runs."""
    engine = getattr(ds, "checkpoint_engine", None)
    if engine is None:  # pragma: no cover  (every DeepSpeed engine has one)
        yield
        return

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return load_torch_file(path)

    engine.load = load  # an instance attribute shadows the class's method
    try:
        yield
    finally:
        del engine.load
SCALARS_FILE = "sparc_scalar_params.json"  # the 0-dim parameters the engine gave shape [1] (see _lift_scalars)


def _size_defaults(module: nn.Module, zero_stage: int) -> dict[str, Any]:
    """Defaults that depend on the model and that the recipe may override: ZeRO-3 allocates its gradient bucket
    whole (DeepSpeed's default, 5e8 elements, is 1.9 GB of fp32: ten times a ViT-B/16), and a bucket larger
    than the model buys nothing, so it is capped at the parameter count."""
    if zero_stage < 2:
        return {}
    numel = sum(p.numel() for p in module.parameters())
    return {"zero_optimization": {"reduce_bucket_size": int(min(5e8, max(numel, 1)))}}


def _set_zero3_fp32(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write ``value`` into this process's slice of a ZeRO-3 parameter's fp32 master partition.

    DeepSpeed's ``safe_set_full_fp32_param`` slices the unpadded value at ``rank * partition_size``, which runs
    past the end when the parameter has fewer elements than there are processes (a 1-element temperature on two
    processes); this writes what the process holds, nothing where it holds only padding."""
    optimizer = param._z3_optimizer
    partition, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
    rank = optimizer._get_param_partition_rank(param)
    flat = value.flatten().to(partition.dtype)
    start = partition.numel() * rank
    if start < flat.numel():
        chunk = flat[start : start + partition.numel()]
        partition.data[: chunk.numel()].copy_(chunk)


def _skip_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory collective op on every CPU ``initialize`` (about 35 s the first
    time); gloo does the same job, so unless ``engine.shm_comm`` asks for it the build is skipped."""
    import sys

    module = sys.modules.get("deepspeed.comm.torch")
    if module is not None and hasattr(module, "build_shm_op"):
        module.build_shm_op = lambda: None


def _lift_scalars(module: nn.Module) -> dict[str, torch.Size]:
    """Give every 0-dim parameter (the learned temperature, SigLIP's bias) the shape [1], in place.

    DeepSpeed 0.19 broadcasts and partitions parameters through ``p.data.view(torch.uint8)``, which fails for
    0-dim tensors; a 1-element view of the same storage goes through. The model reads these parameters with
    broadcasting arithmetic, so [1] computes the same; :meth:`DeepSpeedEngine.full_state_dict` and
    :func:`consolidate_zero_checkpoint` give them their own shape back. Returns ``{name: original shape}``.
    """
    lifted = {}
    for name, p in module.named_parameters():
        if p.dim() == 0:
            lifted[name] = p.shape
            p.data = p.data.reshape(1)
    return lifted


@engines.register("deepspeed", supplied=("device", "precision"), check=check_recipe)
class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO (stages 0-3), optimizer offload to CPU (stages 1-3) and parameter offload (stage 3).

    ``optimizer_impl``: ``torch`` hands DeepSpeed a torch AdamW built from the recipe's groups; ``deepspeed``
    lets DeepSpeed build its own AdamW from the same groups and numbers (fused on GPUs, its CPU Adam when the
    optimizer is offloaded; both are JIT-compiled on first use); ``auto`` is ``deepspeed`` with CUDA and
    ``torch`` without. ``config`` is a pass-through block of raw DeepSpeed keys, merged over the generated
    config; a key that contradicts the recipe is an error. ``shm_comm`` builds DeepSpeed's shared-memory
    collectives for CPU ranks (a one-time compile); off, gloo carries them. ``timeout_s`` bounds every collective.
    """

    name = "deepspeed"
    module_holds_full_weights = False

    def __init__(
        self,
        device: str = "auto",
        precision: str = "fp32",
        zero_stage: Literal[0, 1, 2, 3] = 2,
        offload_optimizer: bool = False,
        offload_params: bool = False,
        optimizer_impl: Literal["auto", "torch", "deepspeed"] = "auto",
        config: dict[str, Any] | None = None,
        shm_comm: bool = False,
        timeout_s: float = 1800.0,
    ):
        if importlib.util.find_spec("deepspeed") is None:
            raise EngineSetupError(
                "engine.name is 'deepspeed' but DeepSpeed is not installed: pip install 'sparc-kit[deepspeed]'"
            )
        problems = settings_problems(zero_stage, offload_optimizer, offload_params)
        if problems:
            raise EngineSetupError(problems[0])
        super().__init__(device, precision)
        self.zero_stage = zero_stage
        self.offload_optimizer = offload_optimizer
        self.offload_params = offload_params
        self.optimizer_impl = optimizer_impl
        self.raw_config = dict(config or {})
        self.shm_comm = shm_comm
        self.timeout_s = timeout_s
        self.ds: Any = None
        self.lifted: dict[str, torch.Size] = {}
        self._owns_group = False
        self._started = False

    def start(self) -> None:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise warn on every process
        self._join_group("auto", self.timeout_s)

    def prepare(self, module: nn.Module, optimizer: OptimizerSpec) -> None:
        layout = self._fit_layout(self.layout)

        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # DeepSpeed's own calls of torch collectives that torch has deprecated: not the user's business
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
        if not self.shm_comm:
            _skip_shm_build()

        use_ds_optimizer = uses_ds_optimizer(self.optimizer_impl)
        generated = generate_config(
            self, optimizer, global_batch=layout.global_batch, world_size=self.world_size,
            accum_steps=layout.accum_steps, grad_clip=self.grad_clip, precision=self.precision,
        )
        problems = conflicts(self.raw_config, generated)
        if problems:
            raise EngineSetupError(problems[0])
        cfg = merge(merge(merge(generated, HOUSEKEEPING), _size_defaults(module, self.zero_stage)), self.raw_config)
        if self.offload_optimizer and not use_ds_optimizer:
            cfg.setdefault("zero_force_ds_cpu_optimizer", False)  # a torch AdamW steps the CPU master weights
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        module = module.to(self.device)
        self.lifted = _lift_scalars(module)
        if use_ds_optimizer:
            self.ds, _, _, _ = deepspeed.initialize(
                model=module, model_parameters=optimizer.torch_groups(), config=cfg, dist_init_required=False
            )
        else:
            self.ds, _, _, _ = deepspeed.initialize(
                model=module, optimizer=optimizer.build(), config=cfg, dist_init_required=False
            )
        self.ds.set_gradient_accumulation_boundary(True)
        self.module = self.ds.module
        self.bounded = self._bounded_parameters(self.module)
        self.wrapped = self.ds

    def backward(self, loss: torch.Tensor) -> None:
        # the loop's losses are already those of the whole batch: no division by the accumulation count
        self.ds.backward(loss, scale_wrt_gas=False)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.ds.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.ds.set_gradient_accumulation_boundary(True)

    def step(self, grad_clip: float | None) -> float:
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if norm != norm or norm in (float("inf"), float("-inf")):
            # DeepSpeed computes the norm inside its step: fp32 and bf16 updates are not skipped
            raise NonFiniteGradient(None, applied=True)
        self._clamp_bounded()
        return norm

    def _clamp_bounded(self) -> None:
        """Clamp bounded parameters after the update, in DeepSpeed's fp32 master copy (where the next update
        starts) and in the module's copy (what the next forward reads)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        for p, low, high in self.bounded:
            full = safe_get_full_fp32_param(p)  # collective under ZeRO: every process gets the same value
            with torch.no_grad():
                if full is None:  # no separate master: the parameter itself is trained
                    p.data.clamp_(low, high)
                    continue
                clamped = full.clamp(low, high)
                if torch.equal(clamped, full):  # the same decision on every process
                    continue
                if hasattr(p, "ds_id"):
                    _set_zero3_fp32(p, clamped)
                else:
                    safe_set_full_fp32_param(p, clamped)
                if p.data.numel() == clamped.numel():
                    p.data.copy_(clamped.reshape(p.data.shape).to(p.data.dtype))

    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    # ----------------------------------------------------------------------------------- checkpoints
    def save(self, folder: str) -> dict[str, Any]:
        self.ds.save_checkpoint(os.path.join(folder, DS_FOLDER), tag=DS_TAG, save_latest=False)
        if self.is_main:  # what consolidate_zero_checkpoint needs to give lifted scalars their shape back
            with open(os.path.join(folder, DS_FOLDER, SCALARS_FILE), "w") as f:
                json.dump({name: list(shape) for name, shape in self.lifted.items()}, f)
        return {}

    def load(self, folder: str, trainer_state: dict[str, Any]) -> None:
        path = os.path.join(folder, DS_FOLDER)
        if not os.path.isdir(os.path.join(path, DS_TAG)):
            raise EngineSetupError(
                f"checkpoint {folder} holds no DeepSpeed state (was it written by another engine?); resume it with "
                "the engine it was trained with"
            )
        with _weights_only_loads(self.ds):
            loaded, _ = self.ds.load_checkpoint(
                path, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False, load_module_strict=True
            )
        if loaded is None:
            raise EngineSetupError(f"DeepSpeed could not load its checkpoint from {path}")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.unwrap()
        params = dict(module.named_parameters())
        out: dict[str, torch.Tensor] = {}
        for key, value in module.state_dict(keep_vars=True).items():
            if key in params:
                full = safe_get_full_fp32_param(params[key])  # collective under ZeRO
                tensor = (full if full is not None else params[key]).detach().float()
                if key in self.lifted:
                    tensor = tensor.reshape(self.lifted[key])
            else:
                tensor = value.detach()
            if self.is_main:
                out[key] = tensor.cpu().clone().contiguous()
        return out if self.is_main else None

    def close(self) -> None:
        if self.ds is not None and hasattr(self.ds, "destroy"):
            with contextlib.suppress(Exception):
                self.ds.destroy()
        self.ds = None
        if self._owns_group:  # through DeepSpeed, which drops the group references it caches for the next start
            import deepspeed.comm as ds_comm

            with contextlib.suppress(Exception):
                ds_comm.destroy_process_group()
        super().close()


def consolidate_zero_checkpoint(checkpoint: str, out_file: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The fp32 weights of a DeepSpeed checkpoint folder (``RUN/checkpoints/step_N``), from its ZeRO partitions
    alone, without a process group; split into ``{"model": ..., "loss": ...}``. With ``out_file`` the model's
    weights are also written there as safetensors (the loss's beside it as ``loss.safetensors`` when it has
    some)."""
    if importlib.util.find_spec("deepspeed") is None:
        raise EngineSetupError("consolidating a DeepSpeed checkpoint needs DeepSpeed: pip install 'sparc-kit[deepspeed]'")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = os.path.join(checkpoint, DS_FOLDER) if os.path.isdir(os.path.join(checkpoint, DS_FOLDER)) else checkpoint
    if not os.path.isdir(os.path.join(folder, DS_TAG)):
        raise EngineSetupError(f"{checkpoint}: no DeepSpeed checkpoint (expected {os.path.join(folder, DS_TAG)})")
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        state = get_fp32_state_dict_from_zero_checkpoint(folder, tag=DS_TAG)  # it prints progress bars
    scalars_file = os.path.join(folder, SCALARS_FILE)
    shapes = {}
    if os.path.exists(scalars_file):
        with open(scalars_file) as f:
            shapes = {k: tuple(v) for k, v in json.load(f).items()}
    parts: dict[str, dict[str, torch.Tensor]] = {"model": {}, "loss": {}}
    for key, value in state.items():
        if key in shapes:
            value = value.reshape(shapes[key])
        head, _, rest = key.partition(".")
        if head in parts:
            parts[head][rest] = value.detach().float().contiguous()
    if out_file is not None:
        write_safetensors(out_file, parts["model"])
        if parts["loss"]:
            write_safetensors(os.path.join(os.path.dirname(out_file) or ".", weights_file("loss")), parts["loss"])
    return parts
