"""Export a trained model: ``export(run_or_checkpoint, "safetensors" | "onnx" | "torchscript", out)``.

- ``safetensors``: a folder with ``model.safetensors``, ``recipe.yaml`` (the resolved recipe), ``config.json``
  (the same recipe as JSON, with the step and the format) and ``tokenizer.model``; :func:`sparc_kit.load_pretrained`
  rebuilds model, tokenizer and image transform from it, unpickling nothing.
- ``onnx``: ``image_encoder.onnx`` (``images`` [B, 3, H, W] -> ``image_embeds`` [B, E], ``patch_embeds``
  [B, P, E]) and ``text_encoder.onnx`` (``token_ids`` [B, L] int64, ``token_mask`` [B, L] bool -> ``text_embeds``
  [B, E], ``token_embeds`` [B, L, E], ``token_mask_out`` [B, L]), a dynamic batch axis, plus the safetensors folder's
  files. Checked against PyTorch with ONNX Runtime at two batch sizes before anything is placed.
- ``torchscript``: ``image_encoder.pt`` and ``text_encoder.pt`` (``torch.jit.trace`` of the same two towers, same
  outputs), plus the safetensors folder's files; checked against PyTorch the same way.

The embeddings are the model's own (``DualEncoder.image_features`` / ``text_features``), not normalised.

Nothing is written until every check has passed: the export is built in a temporary folder and renamed into place.
A source whose weights are a pickle (a ``.pt``/``.bin`` file, or a "``model.safetensors``" that is a torch file) is
refused in one line, unread; a DeepSpeed checkpoint without its consolidated ``model.safetensors`` is consolidated
from its partitions after every partition file has been read weights-only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from sparc_kit.checkpoint import (
    CHECKPOINTS,
    DEEPSPEED,
    MODEL_WEIGHTS,
    RECIPE,
    STATE,
    TOKENIZER,
    latest_checkpoint,
    step_of_folder,
    write_safetensors,
)
from sparc_kit.config import dump_recipe
from sparc_kit.engines.deepspeed import _deepspeed_safe_globals, consolidate_zero_checkpoint
from sparc_kit.errors import RunError, SparcError
from sparc_kit.io import TMP_PREFIX, WeightsFileError, atomic_write, load_torch_file
from sparc_kit.pretrained import Pretrained, load_pretrained

__all__ = [
    "FORMATS",
    "TOLERANCE",
    "CONFIG",
    "ExportError",
    "ExportMismatchError",
    "ExportResult",
    "ImageTower",
    "TextTower",
    "export",
]

FORMATS = ("safetensors", "onnx", "torchscript")
#: the largest absolute difference from PyTorch an exported tower may show, per format
TOLERANCE = {"onnx": 1e-4, "torchscript": 1e-5}
CONFIG = "config.json"
IMAGE_FILE = {"onnx": "image_encoder.onnx", "torchscript": "image_encoder.pt"}
TEXT_FILE = {"onnx": "text_encoder.onnx", "torchscript": "text_encoder.pt"}
IMAGE_OUTPUTS = ("image_embeds", "patch_embeds")
TEXT_OUTPUTS = ("text_embeds", "token_embeds", "token_mask")
#: an ONNX graph's output cannot share its input's name: the caption mask comes back as ``token_mask_out``
ONNX_TEXT_OUTPUTS = ("text_embeds", "token_embeds", "token_mask_out")
CHECK_BATCH_SIZES = (2, 3)  # the export traces at the first; the second shows the batch axis is dynamic
CHECK_CAPTIONS = ["a red circle in the centre", "a small blue square at the top left", "two green triangles"]
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


class ExportError(SparcError, ValueError):
    """A source, format or destination that cannot be exported (one line; the CLI's exit 2)."""


class ExportMismatchError(RunError):
    """An exported tower whose outputs differ from PyTorch's by more than :data:`TOLERANCE` (the CLI's exit 1)."""


@dataclass
class ExportResult:
    out: str
    format: str
    files: list[str]
    step: int | None
    #: per output (``image_embeds``, ...): the worst absolute difference from PyTorch over the checked batch sizes
    max_abs_diff: dict[str, float] = field(default_factory=dict)


class ImageTower(nn.Module):
    """``images -> (image_embeds, patch_embeds)``: the image half of a :class:`~sparc_kit.models.DualEncoder`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.image_features(images)
        return out["image_embeds"], out["patch_embeds"]


class TextTower(nn.Module):
    """``(token_ids, token_mask) -> (text_embeds, token_embeds, token_mask)``: the text half of the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, token_ids: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.text_features(token_ids, token_mask)
        return out["text_embeds"], out["token_embeds"], out["token_mask"]


# ------------------------------------------------------------------------------------------------ the source
def _is_safetensors(path: str) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then that many bytes of a JSON object (read as
    text only; a pickle or a torch zip file fails at the first bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if not 0 < length <= min(size - 8, 100_000_000):
                return False
            header = json.loads(f.read(length).decode("utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False
    return isinstance(header, dict)


def _refuse_pickle(path: str, target: str) -> None:
    if not _is_safetensors(path):
        raise ExportError(
            f"{target}: {os.path.basename(path)} is not a safetensors file (a pickle or torch file?); refused "
            "without loading it: only safetensors weights are exported"
        )


def _check_source(target: str) -> None:
    """Refuse, before anything is loaded, a pickle given as the weights or planted in an export folder."""
    path = os.path.abspath(os.path.expanduser(target))
    if not os.path.exists(path):
        raise ExportError(f"{target}: no such run folder, checkpoint folder, export folder or .safetensors file")
    if os.path.isfile(path):
        if path.endswith(_PICKLE_SUFFIXES):
            raise ExportError(
                f"{target}: a pickle file is never loaded; export a run folder, checkpoint folder or .safetensors file"
            )
        if path.endswith(".safetensors"):
            _refuse_pickle(path, target)
        return
    if os.path.basename(path) == CHECKPOINTS:
        path = os.path.dirname(path)
    if os.path.exists(os.path.join(path, RECIPE)) and os.path.isdir(os.path.join(path, CHECKPOINTS)):
        newest = latest_checkpoint(os.path.join(path, CHECKPOINTS))  # the one load_pretrained would read
        if newest is not None:
            _refuse_pickle(os.path.join(newest, MODEL_WEIGHTS), target)
    weights = os.path.join(path, MODEL_WEIGHTS)
    if os.path.exists(weights):
        _refuse_pickle(weights, target)
        if not os.path.exists(os.path.join(path, STATE)):  # an export folder: safetensors, recipe, tokenizer only
            ours = set(TEXT_FILE.values()) | set(IMAGE_FILE.values())  # a torchscript export's towers, never read here
            planted = sorted(n for n in os.listdir(path) if n.endswith(_PICKLE_SUFFIXES) and n not in ours)
            if planted:
                raise ExportError(
                    f"{target}: export folder holds a pickle ({planted[0]}); refused without loading it "
                    "(an export holds safetensors weights only)"
                )


def _unconsolidated(target: str) -> str | None:
    """A DeepSpeed step folder (``deepspeed/`` and ``state.json``) without its consolidated ``model.safetensors``:
    the folder itself, or a run folder's newest such step folder when it has no complete checkpoint."""
    path = os.path.abspath(os.path.expanduser(target))

    def fits(folder: str) -> bool:
        return (
            os.path.isdir(os.path.join(folder, DEEPSPEED))
            and os.path.exists(os.path.join(folder, STATE))
            and not os.path.exists(os.path.join(folder, MODEL_WEIGHTS))
        )

    if os.path.isdir(path) and fits(path):
        return path
    root = os.path.join(path, CHECKPOINTS)
    if os.path.exists(os.path.join(path, RECIPE)) and os.path.isdir(root):
        if latest_checkpoint(root) is None:
            steps = sorted((step_of_folder(d), d) for d in os.listdir(root) if step_of_folder(d) is not None)
            for _, name in reversed(steps):
                if fits(os.path.join(root, name)):
                    return os.path.join(root, name)
    return None


def _consolidated_folder(step_folder: str, work: str) -> str:
    """A checkpoint folder in ``work`` with the fp32 weights consolidated from ``step_folder``'s ZeRO partitions,
    and its recipe and tokenizer (from the run folder two levels up); every partition file is read weights-only
    first, so a planted pickle is refused before DeepSpeed's own reader sees it."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        for root, _, names in os.walk(os.path.join(step_folder, DEEPSPEED)):
            for name in names:
                if name.endswith(_PICKLE_SUFFIXES):
                    try:
                        load_torch_file(os.path.join(root, name))
                    except WeightsFileError as exc:
                        raise ExportError(str(exc)) from None
    folder = os.path.join(work, "consolidated")
    os.makedirs(folder)
    parts = consolidate_zero_checkpoint(step_folder)
    run = os.path.dirname(os.path.dirname(step_folder))
    for name in (RECIPE, TOKENIZER):
        for home in (step_folder, run):
            if os.path.exists(os.path.join(home, name)):
                shutil.copyfile(os.path.join(home, name), os.path.join(folder, name))
                break
    with open(os.path.join(step_folder, STATE)) as f:
        step = json.load(f).get("step")
    write_safetensors(os.path.join(folder, MODEL_WEIGHTS), parts["model"], step=step)
    return folder


# ----------------------------------------------------------------------------------------------- the towers
def _check_inputs(pretrained: Pretrained, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    size = pretrained.transform.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    captions = (CHECK_CAPTIONS * batch)[:batch]
    ids, mask = pretrained.tokenizer(captions)
    return images, ids, mask


def _reference(model: nn.Module, images, ids, mask) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        image = ImageTower(model)(images)
        text = TextTower(model)(ids, mask)
    return dict(zip(IMAGE_OUTPUTS + TEXT_OUTPUTS, (*image, *text)))


def _worst(worst: dict[str, float], name: str, got: Any, want: torch.Tensor) -> None:
    got = torch.as_tensor(got)
    if got.shape != want.shape:
        diff = float("inf")
    else:
        diff = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    worst[name] = max(worst.get(name, 0.0), diff)


def _encoder_name(model: nn.Module) -> str:
    return f"vision encoder {type(model.vision).__name__}, text encoder {type(model.text).__name__}"


def _onnx_export(model: nn.Module, pretrained: Pretrained, folder: str) -> Callable[..., dict[str, Any]]:
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
    except ImportError:
        raise ExportError("--format onnx needs onnx and onnxruntime: pip install 'sparc-kit[onnx]'") from None
    images, ids, mask = _check_inputs(pretrained, CHECK_BATCH_SIZES[0])
    image_file, text_file = os.path.join(folder, IMAGE_FILE["onnx"]), os.path.join(folder, TEXT_FILE["onnx"])
    towers = (
        (ImageTower(model), (images,), image_file, ["images"], list(IMAGE_OUTPUTS)),
        (TextTower(model), (ids, mask), text_file, ["token_ids", "token_mask"], list(ONNX_TEXT_OUTPUTS)),
    )
    for tower, args, file, inputs, outputs in towers:
        try:
            with torch.no_grad(), _quiet():
                torch.onnx.export(
                    tower,
                    args,
                    file,
                    input_names=inputs,
                    output_names=outputs,
                    dynamic_axes={n: {0: "batch"} for n in inputs + outputs},
                    opset_version=17,
                    dynamo=False,
                )
        except Exception as exc:
            raise ExportError(
                f"cannot export the {type(tower).__name__} to ONNX ({_encoder_name(model)}): "
                f"{type(exc).__name__}: {_first(exc)}"
            ) from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    image_session = ort.InferenceSession(image_file, options, providers=["CPUExecutionProvider"])
    text_session = ort.InferenceSession(text_file, options, providers=["CPUExecutionProvider"])

    def run(images, ids, mask) -> dict[str, Any]:
        image = image_session.run(None, {"images": images.numpy()})
        text = text_session.run(None, {"token_ids": ids.numpy(), "token_mask": mask.numpy()})
        return dict(zip(IMAGE_OUTPUTS + TEXT_OUTPUTS, (*image, *text)))

    return run


def _torchscript_export(model: nn.Module, pretrained: Pretrained, folder: str) -> Callable[..., dict[str, Any]]:
    attention = getattr(pretrained.recipe.model, "attention", None)
    if attention == "xformers":
        raise ExportError("--format torchscript: attention backend 'xformers' cannot be traced (use attention: sdpa)")
    images, ids, mask = _check_inputs(pretrained, CHECK_BATCH_SIZES[0])
    traced = []
    for tower, args, name in (
        (ImageTower(model), (images,), IMAGE_FILE["torchscript"]),
        (TextTower(model), (ids, mask), TEXT_FILE["torchscript"]),
    ):
        try:
            with torch.no_grad(), _quiet():
                module = torch.jit.trace(tower, args, check_trace=False)
            module.save(os.path.join(folder, name))
        except Exception as exc:
            raise ExportError(
                f"cannot trace the {type(tower).__name__} to TorchScript ({_encoder_name(model)}): "
                f"{type(exc).__name__}: {_first(exc)}"
            ) from None
        with _quiet():
            traced.append(torch.jit.load(os.path.join(folder, name)))

    def run(images, ids, mask) -> dict[str, Any]:
        with torch.no_grad():
            return dict(zip(IMAGE_OUTPUTS + TEXT_OUTPUTS, (*traced[0](images), *traced[1](ids, mask))))

    return run


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


# ------------------------------------------------------------------------------------------------ the export
def _default_out(pretrained: Pretrained, fmt: str) -> str:
    return os.path.join(pretrained.run_dir, "export", fmt)


def _check_out(out: str, force: bool) -> None:
    if os.path.isfile(out) or os.path.islink(out):
        raise ExportError(f"--out {out}: exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ExportError(f"--out {out}: folder exists and is not empty (pass --force to replace it)")


def _place(built: str, out: str) -> None:
    """Copy ``built`` beside ``out`` under a temporary name, then rename it onto ``out`` (an old ``out`` is renamed
    away first and removed after)."""
    parent = os.path.dirname(out) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f"{TMP_PREFIX}{os.path.basename(out)}-")
    old = None
    try:
        shutil.copytree(built, staging, dirs_exist_ok=True)
        os.chmod(staging, 0o755)
        if os.path.isdir(out) and os.listdir(out):
            old = tempfile.mkdtemp(dir=parent, prefix=f"{TMP_PREFIX}{os.path.basename(out)}-old-")
            os.replace(out, old)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not os.path.exists(out):
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(
    run_or_checkpoint: str | os.PathLike,
    fmt: str = "safetensors",
    out: str | os.PathLike | None = None,
    *,
    force: bool = False,
) -> ExportResult:
    """Export a run folder's newest complete checkpoint (or a checkpoint folder, export folder or .safetensors
    file) as ``fmt`` into the folder ``out`` (default ``RUN/export/FORMAT``). See the module docstring for what
    each format holds. Refusals (:class:`ExportError`) write nothing; an exported tower that differs from PyTorch
    by more than :data:`TOLERANCE` raises :class:`ExportMismatchError` and writes nothing."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: unknown; choose one of {', '.join(FORMATS)}")
    target = str(run_or_checkpoint)
    if out is not None:
        _check_out(os.path.abspath(os.path.expanduser(str(out))), force)
    _check_source(target)
    with tempfile.TemporaryDirectory(prefix="sparc-export-") as work:
        source = _unconsolidated(target)
        pretrained = load_pretrained(_consolidated_folder(source, work) if source else target)
        out = os.path.abspath(os.path.expanduser(str(out))) if out is not None else _default_out(pretrained, fmt)
        _check_out(out, force)
        model = pretrained.model.eval()
        built = os.path.join(work, "export")
        os.makedirs(built)
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        write_safetensors(os.path.join(built, MODEL_WEIGHTS), weights, step=pretrained.step)
        atomic_write(os.path.join(built, RECIPE), dump_recipe(pretrained.recipe))
        config = {"format": fmt, "step": pretrained.step, "recipe": pretrained.recipe.model_dump(mode="json")}
        atomic_write(os.path.join(built, CONFIG), json.dumps(config, indent=2) + "\n")
        shutil.copyfile(_tokenizer_file(pretrained), os.path.join(built, TOKENIZER))
        worst: dict[str, float] = {}
        if fmt != "safetensors":
            run = (_onnx_export if fmt == "onnx" else _torchscript_export)(model, pretrained, built)
            for batch in CHECK_BATCH_SIZES:
                images, ids, mask = _check_inputs(pretrained, batch)
                want = _reference(model, images, ids, mask)
                got = run(images, ids, mask)
                for name in want:
                    _worst(worst, name, got[name], want[name])
            bad = {k: v for k, v in worst.items() if not v <= TOLERANCE[fmt]}
            if bad:
                shown = ", ".join(f"{k} {v:.3g}" for k, v in bad.items())
                raise ExportMismatchError(
                    f"{fmt} export differs from PyTorch by more than {TOLERANCE[fmt]:g}: {shown}; nothing written"
                )
        files = sorted(os.listdir(built))
        _place(built, out)
    return ExportResult(out=out, format=fmt, files=files, step=pretrained.step, max_abs_diff=worst)


def _tokenizer_file(pretrained: Pretrained) -> str:
    for candidate in (
        os.path.join(os.path.dirname(pretrained.checkpoint), TOKENIZER),
        os.path.join(pretrained.run_dir, TOKENIZER),
        pretrained.recipe.tokenizer.path or "",
    ):
        if candidate and os.path.exists(candidate):
            return candidate
    raise ExportError(f"{pretrained.run_dir}: no tokenizer.model to export beside the weights or in the run folder")
