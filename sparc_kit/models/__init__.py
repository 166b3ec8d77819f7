"""Models: encoders, poolers, attention backends and the dual encoder, plus ``build_model``."""

from __future__ import annotations

from typing import Any

from sparc_kit.models import attention, poolers, text, vit  # noqa: F401  (registration)
from sparc_kit.models.dual_encoder import DualEncoder
from sparc_kit.models.poolers import MeanPooler, masked_mean
from sparc_kit.models.text import TextTransformer
from sparc_kit.models.vit import VisionTransformer
from sparc_kit.registry import poolers as pooler_registry
from sparc_kit.registry import text_encoders, vision_encoders

__all__ = ["DualEncoder", "VisionTransformer", "TextTransformer", "MeanPooler", "masked_mean", "build_model"]


def build_model(recipe: Any) -> DualEncoder:
    """Build the dual encoder a recipe describes (a recipe object, or anything ``load_recipe`` accepts).

    The text tower's vocabulary size and context length default to the tokenizer section's, and the recipe's
    ``model.attention`` switch is passed to every native encoder that has an ``attention`` parameter.
    """
    from sparc_kit.config import load_recipe

    if not hasattr(recipe, "model"):
        recipe = load_recipe(recipe)
    m = recipe.model
    available = {
        "attention": m.attention,
        "vocab_size": recipe.tokenizer.vocab_size,
        "context_length": recipe.tokenizer.context_length,
    }

    def build(registry, spec, **more):
        entry = registry.get(spec.name)
        offered = {**available, **more}
        return entry.build(spec, **{k: v for k, v in offered.items() if k in entry.internal})

    vision = build(vision_encoders, m.vision)
    text_tower = build(text_encoders, m.text)
    model = DualEncoder(
        vision=vision,
        text=text_tower,
        embed_dim=m.embed_dim,
        image_pooler=build(pooler_registry, m.image_pooler, width=vision.output_dim),
        text_pooler=build(pooler_registry, m.text_pooler, width=text_tower.output_dim),
        image_global_head=m.image_global_head,
        init_temperature=m.init_temperature,
        max_logit_scale=m.max_logit_scale,
    )
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model
