"""Recipe files in, a validated `Recipe` out; errors name the field and suggest the fix."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import UserError, excerpt, shorten
from .schema import Recipe

MAX_RECIPE_BYTES = 256 * 1024  # a recipe is a few hundred bytes; anything near this is not one
MAX_ALIASES = 16  # YAML aliases (*name) in one recipe: a few for shared lists, never an exponential "alias bomb"
MAX_DEPTH = 32  # nesting of mappings and lists
MAX_LISTED = 8  # problems listed in one message


class RecipeError(UserError, ValueError):
    pass


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader (no Python tags) that refuses more than MAX_ALIASES aliases and more than MAX_DEPTH levels of
    nesting while it composes the document, before any object is built: a "billion laughs" document of nested
    aliases, which costs nothing to parse but expands exponentially wherever it is walked, is refused at its 17th
    alias."""

    def __init__(self, stream, source: str):
        super().__init__(stream)
        self.source, self.aliases, self.depth = source, 0, 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise RecipeError(f"recipe {self.source} uses more than {MAX_ALIASES} YAML aliases (*name); a recipe "
                                  "needs a few at most: write the values out")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise RecipeError(f"recipe {self.source} nests mappings or lists more than {MAX_DEPTH} levels deep; "
                                  "a recipe is two levels deep (section: key: value)")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def parse_yaml(text: str, source: str):
    """The YAML document `text`, with the bounds of BoundedLoader and of MAX_RECIPE_BYTES."""
    if len(text.encode("utf-8", errors="replace")) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {source} is {len(text):,} characters long; a recipe is a few hundred (at most "
                          f"{MAX_RECIPE_BYTES:,} bytes): is it the right file?")
    loader = BoundedLoader(text, source)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {source} is not valid YAML: {shorten(str(err), 300)}") from None
    finally:
        loader.dispose()


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys of the section that `loc` (a pydantic error location) points into."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _explain(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    errors = err.errors()
    if len(errors) > MAX_LISTED:
        lines.append(f"  ({len(errors):,} problems; the first {MAX_LISTED}:)")
    for e in errors[:MAX_LISTED]:
        where = shorten(".".join(str(p) for p in e["loc"]), 120) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _fields_at(Recipe, e["loc"])
            near = difflib.get_close_matches(str(e["loc"][-1]), valid, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            lines.append(f"  {where}: unknown key{hint} (valid here: {', '.join(valid)})")
        else:
            lines.append(f"  {where}: {e['msg']} (got {excerpt(e.get('input'))})")
    return "\n".join(lines)


def recipe_from_dict(data: dict[str, Any], source: str = "<dict>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe {source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_explain(err, source)) from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {path} is {path.stat().st_size:,} bytes; a recipe is a few hundred (at most "
                          f"{MAX_RECIPE_BYTES:,}): is it the right file?")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not UTF-8 text: is it the right file?") from None
    return recipe_from_dict(parse_yaml(text, str(path)) or {}, str(path))


def apply_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """Overrides keyed by dotted path ("quantization.bits"); validated like the file itself."""
    data = recipe.model_dump(mode="json", exclude_unset=False)
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return recipe_from_dict(data, "(recipe with command-line overrides)")


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
