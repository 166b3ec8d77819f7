"""The seam between the training loop and how a step runs: one :class:`Engine` interface, one file per engine.

The loop builds one module that holds the model *and* the loss (:class:`~sparc_kit.train.module.TrainModule`;
the loss may own parameters) and an :class:`OptimizerSpec` (param groups and AdamW hyper-parameters), and hands
both to ``engine.setup``. From then on it talks only to the engine:

- ``engine(**batch)`` runs the wrapped module (DDP's or DeepSpeed's forward); ``engine.unwrap()`` is the plain
  module, for passes without gradient;
- ``backward(loss)``, ``no_sync()`` around all but the last micro-batch of an accumulated step, ``step(grad_clip)``
  returning the global gradient norm, ``set_lr(lr)``;
- ``all_reduce_mean`` for logged metrics, ``barrier``, ``broadcast_object``, ``gather_objects``;
- ``save(folder)`` / ``load(folder, trainer_state)`` (collective where the engine needs it) and
  ``full_state_dict()``: the consolidated weights of the whole module on rank 0, for the checkpoint's
  ``model.safetensors``, export and evaluation.

``train.batch_size`` is the global batch: each of ``world_size`` processes takes ``batch_size / world_size`` samples,
split into ``accum_steps`` micro-batches (:class:`BatchLayout`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from sparc_kit.engines import distributed
from sparc_kit.errors import EngineSetupError  # re-exported: its earlier home

__all__ = [
    "Engine",
    "OptimizerSpec",
    "BatchLayout",
    "EngineSetupError",
    "NonFiniteGradient",
    "param_groups",
    "parameter_bounds",
    "resolve_device",
]


class NonFiniteGradient(RuntimeError):
    """``step`` found a gradient that is NaN or infinite; ``applied`` tells whether the update went through
    anyway (an engine that can only see the norm after its own step)."""

    def __init__(self, parameter: str | None, applied: bool = False):
        self.parameter, self.applied = parameter, applied
        super().__init__(f"non-finite gradient in {parameter or 'a parameter'}")

    def __reduce__(self):
        return (NonFiniteGradient, (self.parameter, self.applied))


def resolve_device(device: str | torch.device, local_rank: int = 0, field: str = "train.device") -> torch.device:
    """``auto``: this process's GPU (``cuda:LOCAL_RANK``) when CUDA is available, else the CPU. ``field`` names
    the setting in the error for a device that is not there."""
    if str(device) == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EngineSetupError(f"{field}: {device!r} is not a device (cpu, cuda, cuda:1, ... or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineSetupError(f"{field} is {str(device)!r} but CUDA is not available here (use 'auto' or 'cpu')")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise EngineSetupError(
            f"{field} is {str(device)!r} but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


@dataclass(frozen=True)
class BatchLayout:
    """How the global batch is cut: ``global_batch = world_size * accum_steps * micro_batch``."""

    global_batch: int
    world_size: int = 1
    accum_steps: int = 1

    def __post_init__(self):
        if self.accum_steps < 1 or self.world_size < 1:
            raise EngineSetupError("accum_steps and world_size must be at least 1")
        parts = self.world_size * self.accum_steps
        if self.global_batch % parts:
            what = f"{self.world_size} processes" + (
                f" x {self.accum_steps} accumulation steps" if self.accum_steps > 1 else ""
            )
            raise EngineSetupError(
                f"train.batch_size={self.global_batch} (the global batch) does not divide into {what} = {parts}; "
                f"use a multiple of {parts}"
            )

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.world_size

    @property
    def micro_batch(self) -> int:
        return self.per_rank // self.accum_steps


def parameter_bounds(module: nn.Module) -> dict[str, tuple[float, float]]:
    """``{parameter name: (low, high)}`` from every submodule with a ``parameter_bounds()`` method (names relative
    to that submodule), as full names in ``module``: what an engine clamps after every update."""
    bounds: dict[str, tuple[float, float]] = {}
    for prefix, sub in module.named_modules():
        declared = getattr(sub, "parameter_bounds", None)
        if not callable(declared):
            continue
        for name, (low, high) in (declared() or {}).items():
            bounds[f"{prefix}.{name}" if prefix else name] = (float(low), float(high))
    return bounds


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases, norms and the temperature are not decayed (CLIP / open_clip practice).

    Parameter names are kept beside the tensors (``names``) so engines that rebuild the groups (DeepSpeed)
    and tests can tell what is where.
    """
    decay, no_decay = ([], []), ([], [])
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        target = no_decay if p.ndim < 2 or "logit_scale" in name else decay
        target[0].append(p)
        target[1].append(name)
    return [
        {"params": decay[0], "names": decay[1], "weight_decay": weight_decay},
        {"params": no_decay[0], "names": no_decay[1], "weight_decay": 0.0},
    ]


@dataclass
class OptimizerSpec:
    """AdamW over ``groups``: what the loop asks for; each engine builds it its own way (``build`` for a torch
    optimizer; DeepSpeed may build its fused or CPU Adam from the same numbers)."""

    groups: list[dict[str, Any]]
    lr: float
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.0  # the default of groups that do not set their own
    #: torch's AdamW implementation: ``fused`` (one kernel over all parameters), ``foreach`` (batched ops),
    #: ``for_loop`` (one parameter at a time, torch's CPU default) or ``auto``: fused where every parameter is a
    #: floating-point tensor on a device it supports (CPU, CUDA), else for_loop. Measured by
    #: benchmarks/optimizer_step.py: on the reference CPU fused does a 150M-parameter update 3.3-4.9x faster.
    impl: str = "auto"

    @classmethod
    def from_recipe(cls, optim: Any, module: nn.Module) -> "OptimizerSpec":
        """The AdamW a recipe's ``optim`` section asks for over ``module``'s parameters (matrices decayed): what the
        training loop builds, and what a benchmark of its step should build too."""
        return cls(
            param_groups(module, optim.weight_decay),
            lr=optim.lr,
            betas=tuple(optim.betas),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            impl=optim.impl,
        )

    def torch_groups(self) -> list[dict[str, Any]]:
        """The groups without the bookkeeping keys torch's optimizers do not know."""
        return [{k: v for k, v in g.items() if k != "names"} for g in self.groups if g["params"]]

    def implementation(self) -> str:
        """The implementation ``build`` uses: ``impl``, with ``auto`` resolved for these parameters."""
        if self.impl != "auto":
            return self.impl
        params = [p for g in self.groups for p in g["params"]]
        fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return "fused" if params and fusable else "for_loop"

    def build(self) -> torch.optim.Optimizer:
        kind = self.implementation()
        options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[kind]
        return torch.optim.AdamW(
            self.torch_groups(),
            lr=self.lr,
            betas=tuple(self.betas),
            eps=self.eps,
            weight_decay=self.weight_decay,
            **options,
        )


class Engine:
    """Base class of every engine: the single-process behaviour of the collectives, the shared helpers.

    Subclasses implement ``setup``, ``backward``, ``step``, ``set_lr``, ``save``, ``load`` and
    ``full_state_dict``, and set ``rank`` / ``world_size`` / ``local_rank`` in ``setup``.
    """

    name = "engine"
    #: True when the module's own tensors are the trained fp32 weights on every rank (local, DDP); False when
    #: they are partitioned or low-precision copies (DeepSpeed), so evaluation needs ``full_state_dict``.
    module_holds_full_weights = True

    def __init__(self, device: str = "auto", precision: str = "fp32"):
        self.device_spec = device
        self.precision = precision
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.device = resolve_device(device)  # distributed engines re-resolve it with their local rank
        self.module: nn.Module | None = None  # the plain module (model + loss)
        self.wrapped: Any = None  # what forward goes through (the module itself, DDP, DeepSpeed's engine)
        self.layout: BatchLayout | None = None  # given to setup()
        self.grad_clip: float | None = None
        self.bounded: list[tuple[nn.Parameter, float, float]] = []  # clamped after every update

    # ------------------------------------------------------------------------------------------- identity
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------ the step
    def start(self) -> None:
        """Join the process group (distributed engines) and learn ``rank``, ``world_size``, ``device``.
        Idempotent; ``setup`` calls it when the loop has not."""

    def setup(
        self,
        module: nn.Module,
        optimizer: OptimizerSpec,
        layout: BatchLayout | None = None,
        grad_clip: float | None = None,
    ) -> None:
        """Start (join the group), then take ``module`` and build its optimizer (:meth:`prepare`). ``layout`` (how
        the global batch is cut) and ``grad_clip`` are kept as attributes for engines that configure their backend
        with them (DeepSpeed)."""
        self.start()
        self.layout, self.grad_clip = layout, grad_clip
        self.prepare(module, optimizer)

    def prepare(self, module: nn.Module, optimizer: OptimizerSpec) -> None:
        """Move or wrap ``module`` and build the optimizer: each engine's own part of :meth:`setup`."""
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        assert self.wrapped is not None, "call setup() first"
        return self.wrapped(*args, **kwargs)

    def unwrap(self) -> nn.Module:
        assert self.module is not None, "call setup() first"
        return self.module

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, grad_clip: float | None) -> float:
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Around the backward passes of all micro-batches but the last: no gradient exchange yet."""
        yield

    # ------------------------------------------------------------------------------------- collectives
    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over processes of ``tensor`` (a copy; the input itself without other processes)."""
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        out = tensor.detach().to(self.device, copy=True)  # nccl reduces device tensors only
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return (out / self.world_size).to(tensor.device)

    def all_reduce_max(self, value: int) -> int:
        """The largest ``value`` over processes (``value`` itself without other processes)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        out = torch.tensor([value], device=self.device)  # nccl reduces device tensors only
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return int(out.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return distributed.broadcast_object(obj, src) if self.world_size > 1 else obj

    def gather_objects(self, obj: Any) -> list[Any]:
        return distributed.gather_objects(obj) if self.world_size > 1 else [obj]

    # -------------------------------------------------------------------------------------- checkpoints
    def save(self, folder: str) -> dict[str, Any]:
        """Write the engine's own files into ``folder`` (collective where needed); return what goes into the
        checkpoint's ``trainer.pt`` (read on rank 0)."""
        raise NotImplementedError

    def load(self, folder: str, trainer_state: dict[str, Any]) -> None:
        """Restore weights and optimizer state from checkpoint ``folder`` (collective where needed)."""
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole module's fp32 weights, on CPU, on rank 0 (None elsewhere). Collective."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what ``setup`` acquired (a process group this engine started)."""
        if getattr(self, "_owns_group", False):
            distributed.destroy_process_group()
        self._owns_group = False
        self._started = False

    # ------------------------------------------------------------------------- shared by distributed engines
    def _join_group(self, backend: str, timeout_s: float) -> None:
        """Join the launcher's process group (or start one of one); learn rank, world size and device."""
        if getattr(self, "_started", False):
            return
        try:
            env, self._owns_group = distributed.init_process_group(backend, timeout_s)
        except ValueError as exc:
            raise EngineSetupError(f"engine {self.name}: {exc}") from None
        self.rank, self.world_size, self.local_rank = env.rank, env.world_size, env.local_rank
        self.device = resolve_device(self.device_spec, self.local_rank)
        self._started = True

    def _bounded_parameters(self, module: nn.Module) -> list[tuple[nn.Parameter, float, float]]:
        params = dict(module.named_parameters())
        return [(params[name], low, high) for name, (low, high) in parameter_bounds(module).items() if name in params]

    def _fit_layout(self, layout: BatchLayout | None) -> BatchLayout:
        """``layout`` for the processes actually running (the loop may have planned before joining)."""
        layout = layout or BatchLayout(self.world_size, self.world_size, 1)
        if layout.world_size != self.world_size:
            layout = BatchLayout(layout.global_batch, self.world_size, layout.accum_steps)
        return layout
