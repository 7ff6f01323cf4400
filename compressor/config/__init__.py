"""Recipe schema (pydantic, extra keys forbidden) and loader; CLI flags override recipe values."""

from .loader import RecipeError, apply_overrides, dump_recipe, load_recipe, recipe_from_dict
from .schema import Recipe

__all__ = ["Recipe", "RecipeError", "apply_overrides", "dump_recipe", "load_recipe", "recipe_from_dict"]
