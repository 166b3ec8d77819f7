"""sparc-kit: fine-grained image-text pretraining with SPARC and its baselines.

    import sparc_kit
    recipe = sparc_kit.load_recipe("recipes/sparc_tiny.yaml", overrides=["train.steps=50"])
    model = sparc_kit.build_model(recipe)
"""

from sparc_kit import registry
from sparc_kit import data, engines, evaluate, losses, models  # noqa: F401  (import registers the built-in components)
from sparc_kit.config import RecipeError, builtin_recipes, dump_recipe, load_recipe, recipe_schema
from sparc_kit.models import build_model
from sparc_kit.pretrained import load_pretrained

__version__ = "0.1.0"

__all__ = [
    "registry",
    "losses",
    "models",
    "data",
    "engines",
    "load_recipe",
    "recipe_schema",
    "dump_recipe",
    "builtin_recipes",
    "RecipeError",
    "build_model",
    "load_pretrained",
    "__version__",
]
