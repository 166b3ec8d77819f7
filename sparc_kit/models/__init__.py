"""Models: encoders, poolers, attention backends and the dual encoder, plus ``build_model``."""

from __future__ import annotations

from typing import Any

from sparc_kit.models import attention, poolers, text, timm_encoder, vit  # noqa: F401  (registration)
from sparc_kit.data.clip_tokenizer import CLIP_EOT_ID
from sparc_kit.data.tokenizer import EOS_ID
from sparc_kit.errors import RecipeError, require_recipe
from sparc_kit.models.dual_encoder import DualEncoder
from sparc_kit.models.poolers import (
    AttentionPooler,
    ClsPooler,
    LastTokenPooler,
    MaxPooler,
    MeanPooler,
    masked_max,
    masked_mean,
)
from sparc_kit.models.text import TextTransformer
from sparc_kit.models.timm_encoder import TimmVisionEncoder
from sparc_kit.models.vit import VisionTransformer
from sparc_kit.registry import poolers as pooler_registry
from sparc_kit.registry import import_submodules, text_encoders, vision_encoders

__all__ = [
    "DualEncoder",
    "VisionTransformer",
    "TimmVisionEncoder",
    "TextTransformer",
    *poolers.__all__,
    "build_model",
]


def has_class_token(encoder: Any) -> bool:
    """Whether an encoder's ``forward_features`` returns a class token (timm wrapper flag, or a native vit's)."""
    flag = getattr(encoder, "has_class_token", None)
    if isinstance(flag, bool):
        return flag
    return getattr(encoder, "cls_token", None) is not None


def _end_id(tokenizer: Any) -> int:
    """The id of the end-of-caption token of the recipe's tokenizer kind."""
    return CLIP_EOT_ID if getattr(tokenizer, "kind", "sentencepiece") == "open_clip" else EOS_ID


def build_model(recipe: Any) -> DualEncoder:
    """Build the dual encoder a validated recipe describes (:func:`sparc_kit.load_recipe`).

    The text tower's vocabulary size and context length default to the tokenizer section's, and the recipe's
    ``model.attention`` switch is passed to every native encoder that has an ``attention`` parameter (timm
    encoders keep their own attention). A ``cls`` pooler on a tower without a class token is refused here,
    before any training, rather than at the first forward.
    """
    require_recipe(recipe, "build_model")
    m = recipe.model
    available = {
        "attention": m.attention,
        "vocab_size": recipe.tokenizer.vocab_size,
        "context_length": recipe.tokenizer.context_length,
    }

    def build(registry, section, **more):
        return registry.get(section.name).build(section, offer={**available, **more})

    vision = build(vision_encoders, m.vision)
    text_tower = build(text_encoders, m.text)
    if m.image_pooler.name == "cls" and not has_class_token(vision):
        raise RecipeError([
            f"model.image_pooler: 'cls' needs a class token and vision encoder {m.vision.name!r} has none "
            "(vit: set model.vision.class_token=true; timm: a model with a class token; or use mean)"
        ])
    if m.text_pooler.name == "cls":
        raise RecipeError(["model.text_pooler: 'cls' needs a class token and text towers have none (use mean or last)"])
    model = DualEncoder(
        vision=vision,
        text=text_tower,
        embed_dim=m.embed_dim,
        image_pooler=build(pooler_registry, m.image_pooler, width=vision.output_dim),
        text_pooler=build(pooler_registry, m.text_pooler, width=text_tower.output_dim),
        image_global_head=m.image_global_head,
        init_temperature=m.init_temperature,
        max_logit_scale=m.max_logit_scale,
        end_id=None if m.text_end_token == "include" else _end_id(recipe.tokenizer),
    )
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


import_submodules(__name__, __path__)  # every module registers its components: a new one is one new file
