"""The recipe schema: the fixed sections (tokenizer, optimizer, training) and the model, loss, data, engine and
eval sections built from the component registries, so a component's parameters are checked against what it
declares. Built once per set of registered components (a plugin that registers one rebuilds it)."""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

# the component packages: importing them registers the built-in components the schema is built from
import sparc_kit.data  # noqa: F401
from sparc_kit.data.clip_tokenizer import CLIP_VOCAB_SIZE
import sparc_kit.engines  # noqa: F401
import sparc_kit.evaluate  # noqa: F401
import sparc_kit.loggers  # noqa: F401
import sparc_kit.losses  # noqa: F401
import sparc_kit.models  # noqa: F401
from sparc_kit import registry as reg
from sparc_kit.errors import RecipeError
from sparc_kit.evaluate.spec import entry_model
from sparc_kit.plugins import PluginError, ensure_plugins

__all__ = [
    "recipe_schema",
    "canonical_values",
    "RENAMED_VALUES",
    "COMPONENT_SECTIONS",
    "TokenizerConfig",
    "OptimConfig",
    "TrainConfig",
    "InitFromConfig",
]

COMPONENT_SECTIONS = {  # recipe path of each component section -> its registry kind
    "model.vision": "vision_encoder",
    "model.text": "text_encoder",
    "model.image_pooler": "pooler",
    "model.text_pooler": "pooler",
    "loss": "loss",
    "data": "dataset",
    "engine": "engine",
}


class Strict(BaseModel):
    # numbers are finite: an infinite temperature or learning rate validates as a float but cannot train
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_default=True, allow_inf_nan=False)


class TokenizerConfig(Strict):
    """SentencePiece tokenizer: loaded from ``path``, or trained on the training captions when ``path`` is null."""

    kind: Literal["sentencepiece", "open_clip"] = Field(
        "sentencepiece",
        description="sentencepiece (from path, or trained on the captions) or open_clip: CLIP's BPE, the ids of "
        "open_clip's CLIP weights (the open_clip_torch package's bundled vocabulary, nothing downloaded)",
    )
    path: str | None = None
    vocab_size: int = Field(32000, gt=3)
    context_length: int = Field(55, gt=1)
    model_type: Literal["unigram", "bpe", "word", "char"] = "unigram"
    lowercase: bool = True
    add_eos: bool = True
    train_captions: int = Field(100_000, gt=0, description="how many training captions to train it on")

    @model_validator(mode="after")
    def _clip_path(self) -> "TokenizerConfig":
        if self.kind != "open_clip":
            return self
        if self.path:
            raise PydanticCustomError(
                "clip_path", "tokenizer.path: not read with tokenizer.kind open_clip (its vocabulary is open_clip's)"
            )
        # known from the recipe alone, so a model built without starting a run (the api) cannot get it wrong
        if self.vocab_size < CLIP_VOCAB_SIZE:
            raise PydanticCustomError(
                "clip_vocab",
                f"tokenizer.vocab_size: {self.vocab_size} is smaller than CLIP's {CLIP_VOCAB_SIZE} pieces "
                f"(tokenizer.kind open_clip); set it to {CLIP_VOCAB_SIZE}",
            )
        return self


class OptimConfig(Strict):
    """AdamW with linear warm-up then cosine (or constant) decay, counted in steps."""

    name: Literal["adamw"] = "adamw"
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.2, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(2500, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)
    impl: Literal["auto", "fused", "foreach", "for_loop"] = Field(
        "auto",
        description="torch's AdamW implementation; auto: fused where the device supports it (3-5x faster updates "
        "measured on CPU, benchmarks/optimizer_step.py), else for_loop",
    )


class ProbeConfig(Strict):
    """The fixed image and caption whose alignment heat maps the image-taking loggers (tensorboard, wandb) show at
    the evaluation steps; unset, the first readable training sample and its caption (docs/monitoring.md)."""

    image: str | None = Field(None, description="a local image file; null: the first readable training sample's")
    text: str | None = Field(None, min_length=1, description="the caption; null: the training sample's")

    @model_validator(mode="after")
    def _text_with_image(self) -> "ProbeConfig":
        if self.image is not None and self.text is None:
            raise PydanticCustomError("probe_text", "train.probe.text is needed with train.probe.image: the caption to draw")
        return self


class TrainConfig(Strict):
    """Step-based training. ``batch_size`` is the global batch: the same number on 1 or N processes (each
    process takes ``batch_size / N``); ``accum_steps`` splits each process's part into that many micro-batches,
    contrastive-correct (the loss and gradients of the whole batch)."""

    steps: int = Field(1000, gt=0)
    batch_size: int = Field(64, gt=0, description="the global batch, all processes and micro-batches together")
    accum_steps: int = Field(1, gt=0, description="micro-batches per process and step (gradient accumulation)")
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"
    num_workers: int = Field(0, ge=0)
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(200, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    max_skip_fraction: float = Field(
        0.1, ge=0, le=1, description="stop when more than this fraction of the samples read so far were unreadable"
    )
    pad_to: Literal["longest", "context_length"] = Field(
        "longest",
        description="longest: each step's captions are cut to the longest one in the global batch (rounded up to "
        "a multiple of 8), so the text tower skips columns that are padding in every caption: the same loss and "
        "gradients, less work; context_length: every step keeps the tokenizer's full length (open_clip's way)",
    )
    compile: bool = Field(
        False,
        description="torch.compile each transformer block of both towers (regional compilation); pays off on long "
        "runs only: compiling takes tens of seconds on a CPU (docs/performance.md)",
    )
    loggers: list[str] = Field(
        default_factory=lambda: ["jsonl"],
        description="where the metrics go (`sparc components logger`): jsonl (RUN/metrics.jsonl, always on), "
        "tensorboard, wandb",
    )
    probe: Optional[ProbeConfig] = Field(None, description="the heat maps' image and caption; null: the first sample")

    @field_validator("loggers", mode="before")
    @classmethod
    def _one_name(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # train.loggers=tensorboard: a list of one

    @field_validator("loggers")
    @classmethod
    def _known_loggers(cls, names: list[str]) -> list[str]:
        for name in names:
            try:
                reg.loggers.get(name)
            except reg.UnknownComponentError as exc:  # the registry's own message, with its "did you mean"
                raise PydanticCustomError("unknown_logger", exc.message) from None
        return list(dict.fromkeys(["jsonl", *names]))  # jsonl first and always; each once


class InitFromConfig(Strict):
    """Weights to start training from (``model.init_from``), read once when a run starts (never on resume; the
    file is not opened while the recipe is validated): an open_clip CLIP checkpoint, a timm ViT state dict, or
    another sparc-kit run, checkpoint or exported ``.safetensors`` (docs/finetune.md)."""

    format: Literal["open_clip", "timm", "sparc"] = Field(..., description="whose names the file's tensors have")
    path: str = Field(..., min_length=1, description="a .safetensors or .pt/.pth/.bin file, or a sparc-kit run folder")
    strict: bool = Field(
        True,
        description="refuse a file with tensors that map to nothing in the model, or that leaves a weight of the "
        "towers it covers unset; false: load what maps and log the rest",
    )


#: values a field accepted under an earlier name, read as the current one (recipes and run folders of that time
#: keep working; the resolved recipe writes the current name)
RENAMED_VALUES: dict[str, dict[Any, Any]] = {"model.image_global_head": {"mlp": "linear_gelu"}}


def _canonical(field: str):
    renamed = RENAMED_VALUES[field]
    return lambda value: renamed.get(value, value) if isinstance(value, str) else value


def canonical_values(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw recipe dict (a run folder's recipe.yaml) with the values of :data:`RENAMED_VALUES` under their
    current names, for comparing it with a validated recipe."""
    out = copy.deepcopy(raw)
    for field, renamed in RENAMED_VALUES.items():
        *parents, leaf = field.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str):
            node[leaf] = renamed.get(node[leaf], node[leaf])
    return out


def _tagged(kind: str, name: str, config: type[BaseModel]) -> type[BaseModel]:
    return create_model(
        f"{kind}.{name}",
        __base__=config,
        name=(Literal[name], ...),  # type: ignore[valid-type]
    )


def _component_type(registry: reg.Registry) -> Any:
    members = [_tagged(registry.kind, e.name, e.config) for e in registry.entries()]
    if not members:
        raise RuntimeError(f"no {registry.kind} is registered")
    if len(members) == 1:
        return members[0]
    return Annotated[Union[tuple(members)], Field(discriminator="name")]  # type: ignore[valid-type]


def _evaluator_type() -> Any:
    """One ``eval:`` entry: the options of a registered evaluator, chosen by its ``task`` (as ``loss:`` by name)."""
    members = [entry_model(name) for name in reg.evaluators.names()]
    if len(members) == 1:
        return members[0]
    return Annotated[Union[tuple(members)], Field(discriminator="task")]  # type: ignore[valid-type]


def _registry_versions() -> tuple[int, ...]:
    _ensure_components()
    return tuple(reg.get_registry(k).version for k in reg.kinds())


def _ensure_components() -> None:
    """Load the plugins (the ``sparc_kit.plugins`` entry points and ``SPARC_PLUGINS``; :mod:`sparc_kit.plugins`);
    the built-in components registered themselves when this module imported their packages."""
    try:
        ensure_plugins()
    except PluginError as exc:
        raise RecipeError([str(exc)]) from None


@lru_cache(maxsize=4)
def _build_schema(versions: tuple[int, ...]) -> type[BaseModel]:
    vision_t = _component_type(reg.vision_encoders)
    text_t = _component_type(reg.text_encoders)
    pooler_t = _component_type(reg.poolers)
    attention_t = Literal[tuple(reg.attention_backends.names())]  # type: ignore[valid-type]

    model_config = create_model(
        "ModelConfig",
        __base__=Strict,
        __doc__="The dual encoder: two towers, linear adapters into a shared space, poolers, one temperature.",
        embed_dim=(int, Field(512, gt=0)),
        vision=(vision_t, ...),
        text=(text_t, ...),
        image_pooler=(pooler_t, Field(default_factory=lambda: {"name": "mean"})),
        text_pooler=(pooler_t, Field(default_factory=lambda: {"name": "mean"})),
        image_global_head=(
            Annotated[Literal["linear_gelu", "none"], BeforeValidator(_canonical("model.image_global_head"))],
            Field(
                "linear_gelu",
                description="h_v on the pooled patches for the global image embedding: 'linear_gelu' (one Linear + "
                "GELU, the paper's text; 'mlp' is its earlier name) or 'none' (the mean of the projected patches)",
            ),
        ),
        text_end_token=(
            Literal["include", "exclude"],
            Field(
                "include",
                description="whether the end-of-caption token is one of the caption's tokens for the text pooler "
                "and the token-level losses (the text tower attends to it either way)",
            ),
        ),
        attention=(attention_t, "auto"),
        init_temperature=(float, Field(0.07, gt=0)),
        max_logit_scale=(float, Field(100.0, gt=1)),
        grad_checkpointing=(bool, False),
        init_from=(Optional[InitFromConfig], None),
    )
    return create_model(
        "Recipe",
        __base__=Strict,
        __doc__="A whole training recipe: model, tokenizer, loss, data, optimizer, training and engine.",
        name=(Optional[str], None),
        description=(Optional[str], None),
        model=(model_config, ...),
        tokenizer=(TokenizerConfig, Field(default_factory=TokenizerConfig)),
        loss=(_component_type(reg.losses), ...),
        data=(_component_type(reg.datasets), ...),
        optim=(OptimConfig, Field(default_factory=OptimConfig)),
        train=(TrainConfig, Field(default_factory=TrainConfig)),
        engine=(_component_type(reg.engines), Field(default_factory=lambda: {"name": "local"})),
        eval=(list[_evaluator_type()], Field(default_factory=list)),  # type: ignore[misc]
    )


def recipe_schema() -> type[BaseModel]:
    """The Recipe pydantic model for the components registered now."""
    return _build_schema(_registry_versions())


# --------------------------------------------------------------------------------------------------------------
# reading

