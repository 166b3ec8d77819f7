"""Any timm ViT-family model as SPARC's image tower.

SPARC aligns words with *patches*, so the tower must hand back one feature per patch. timm's ViT-family models
(``vit_*``, ``deit_*``, ``eva*``, ``beit*``, ...) return ``[B, prefix + P, W]`` from ``forward_features``, the
prefix being the class token and any register / distillation tokens (``model.num_prefix_tokens``). This wrapper
strips the prefix so ``patch_tokens`` are patches only, and hands the class token (timm puts it first) to the
poolers separately.

Weights are never downloaded at run time: ``pretrained: true`` is refused, and a local (or fsspec) file given as
``weights`` is loaded instead. timm models keep their own attention implementation (timm's global fused-attention
switch, ``TIMM_FUSED_ATTN``); the recipe's ``model.attention`` switch applies to the native towers only.
"""

from __future__ import annotations

import difflib
import importlib
import io
from typing import Any

import fsspec
import torch
import torch.nn as nn

from sparc_kit.io import load_torch_file
from sparc_kit.registry import vision_encoders

__all__ = ["TimmVisionEncoder", "load_state_dict_file"]

# Keys a timm checkpoint may carry for the classification / pooling head, which the wrapper builds without
# (num_classes=0, global_pool=''): dropped on load rather than reported as unexpected.
HEAD_PREFIXES = ("head.", "head_drop.", "fc_norm.", "attn_pool.", "head_dist.")


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch file (weights only: a pickle that would run code
    is refused with :class:`~sparc_kit.io.WeightsFileError`), through fsspec.

    A torch checkpoint that wraps the weights (``{"state_dict": ...}``, ``{"model": ...}``) is unwrapped, and a
    ``module.`` (DDP) or ``model.`` (this wrapper's own state dict) prefix shared by every key is removed.
    """
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import load_file


    safetensors = str(path).endswith(".safetensors")
    fs, local = fsspec.core.url_to_fs(str(path))
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        # a local file: let safetensors / torch map it instead of reading it all into memory first
        state = load_file(local) if safetensors else load_torch_file(local, name=str(path))
    else:
        with fsspec.open(path, "rb") as f:
            data = f.read()
        if safetensors:
            state = load_safetensors(data)
        else:
            state = load_torch_file(io.BytesIO(data), name=str(path))
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights {path!r}: expected a state dict of tensors")
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _is_vit_family(model: nn.Module) -> bool:
    """True when the model yields a token sequence: timm's ViT family has ``num_prefix_tokens`` and a patch embed."""
    return isinstance(getattr(model, "num_prefix_tokens", None), int) and hasattr(
        getattr(model, "patch_embed", None), "num_patches"
    )


def _not_vit_error(model_name: str, model: nn.Module | None = None) -> ValueError:
    kind = f" (a {type(model).__name__})" if model is not None else ""
    return ValueError(
        f"timm model {model_name!r}{kind} does not return patch tokens: the timm vision encoder needs a ViT-family "
        "model with patch tokens (e.g. vit_base_patch16_224, eva02_base_patch14_224, deit_base_patch16_224)"
    )


def _square(value: Any, what: str, model_name: str) -> int:
    a, b = (value, value) if isinstance(value, int) else tuple(value)
    if a != b:
        raise ValueError(f"timm model {model_name!r}: non-square {what} {tuple(value)} is not supported")
    return int(a)


@vision_encoders.register("timm", supplied=("grad_checkpointing",))
class TimmVisionEncoder(nn.Module):
    """Any timm ViT-family model by name; weights from a file (never downloaded), timm's own attention.

    ``forward_features`` gives ``{"patch_tokens": [B, P, W], "cls_token": [B, W] | None}`` with the class and
    register tokens removed from the patch tokens.

    - ``model_name``: any timm ViT-family model (``timm.list_models('vit_*')``).
    - ``image_size``: passed to timm as ``img_size`` (position embeddings sized for it); None = the model's own.
    - ``weights``: a local or fsspec path to a ``.safetensors`` or torch state dict, timm's key names (or this
      wrapper's). Position embeddings are resampled by timm's checkpoint filter when ``image_size`` differs.
    - ``pretrained``: must stay false; nothing is downloaded at run time (use ``weights``).
    - The recipe's ``attention`` switch is not applied: timm keeps its own attention kernels.
    """

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        pretrained: bool = False,
        weights: str | None = None,
        image_size: int | None = None,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        import timm  # here, not at module top: importing timm takes seconds and most recipes do not use it

        if pretrained:
            raise ValueError(
                f"timm vision encoder {model_name!r}: pretrained: true is not supported, no weights are downloaded "
                "at run time; download them beforehand and pass weights: PATH (.safetensors or a torch state dict)"
            )
        if not timm.is_model(model_name):
            close = difflib.get_close_matches(model_name, timm.list_models(), n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown timm model {model_name!r}.{hint} See timm.list_models('vit_*')")
        kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "global_pool": ""}
        if image_size is not None:
            kwargs["img_size"] = image_size
        try:
            model = timm.create_model(model_name, **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
            # the model does not take img_size: find out whether it is a ViT at all (cheaply, on meta)
            with torch.device("meta"):
                probe = timm.create_model(model_name, pretrained=False, num_classes=0)
            if not _is_vit_family(probe):
                raise _not_vit_error(model_name, probe) from None
            raise ValueError(f"timm model {model_name!r} does not accept image_size (img_size): {exc}") from None
        except AssertionError as exc:  # e.g. distilled DeiT heads insist on a pooling mode
            raise ValueError(
                f"timm model {model_name!r} cannot be built without its head (num_classes=0, global_pool=''): {exc}"
            ) from None
        if not _is_vit_family(model):
            raise _not_vit_error(model_name, model)

        self.model_name = model_name
        self.model = model
        self.num_prefix_tokens: int = model.num_prefix_tokens
        self.has_class_token: bool = getattr(model, "cls_token", None) is not None
        self.num_patches: int = int(model.patch_embed.num_patches)
        self.patch_size: int = _square(model.patch_embed.patch_size, "patch size", model_name)
        self.image_size: int = _square(model.patch_embed.img_size, "image size", model_name)
        if weights is not None:
            self.load_weights(weights)
        self.set_grad_checkpointing(grad_checkpointing)

    @property
    def output_dim(self) -> int:
        return int(self.model.num_features)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def load_weights(self, path: str) -> None:
        """Load a state dict file into the timm model; every model weight must be present.

        timm's own checkpoint filter for the model's family runs first (it resamples position embeddings to
        this ``image_size`` and converts e.g. OpenAI CLIP / DINOv2 layouts); classifier-head keys are dropped.
        """
        state = load_state_dict_file(path)
        module = importlib.import_module(type(self.model).__module__)
        filter_fn = getattr(module, "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, self.model)
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
        result = self.model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            problems = []
            if result.missing_keys:
                problems.append(f"missing {len(result.missing_keys)} keys, e.g. {result.missing_keys[:3]}")
            if result.unexpected_keys:
                problems.append(f"unexpected {len(result.unexpected_keys)} keys, e.g. {result.unexpected_keys[:3]}")
            raise ValueError(f"weights {path!r} do not fit timm model {self.model_name!r}: {'; '.join(problems)}")

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        x = self.model.forward_features(images)  # [B, prefix + P, W]
        if x.dim() != 3:
            raise ValueError(
                f"timm model {self.model_name!r} returned features of shape {tuple(x.shape)}, not [B, tokens, W]: "
                "the timm vision encoder needs a ViT-family model with patch tokens"
            )
        cls_token = x[:, 0] if self.has_class_token else None  # [B, W]; timm puts the class token first
        return {"patch_tokens": x[:, self.num_prefix_tokens :], "cls_token": cls_token}  # [B, P, W]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)["patch_tokens"]
