"""A filter recipe: its operators (one :class:`OpSpec` each) as YAML, validated into a :class:`Recipe`
and built into operator instances."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field

from mmgen.config import from_dict, read_yaml_mapping
from mmgen.data.media import set_max_image_pixels
from mmgen.data.ops.base import Op, build_op
from mmgen.errors import MMGenError
from mmgen.paths import recipe_path


@dataclass
class OpSpec:
    op: str
    level: str | None = None  # doc | node; None = the operator's default
    params: dict = field(default_factory=dict)
    name: str | None = None  # label in reports; needed when one operator appears twice


@dataclass
class Recipe:
    name: str = ""
    description: str = ""
    ops: list[OpSpec] = field(default_factory=list)
    # Modules that define operators beyond mmgen.data.ops' own (Data-Juicer's custom operator paths):
    # imported before the operators are built, in the parent and in every worker, so they register.
    operator_modules: list[str] = field(default_factory=list)
    # images (and video frames) of more pixels are quarantined as too_many_pixels before decoding;
    # None: mmgen.data.media.DEFAULT_MAX_IMAGE_PIXELS
    max_image_pixels: int | None = None


def load_recipe(recipe: str | os.PathLike | dict | Recipe) -> Recipe:
    """A recipe from a YAML path, the name of one in ``data_pipelines/``, a mapping or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        data = recipe
    else:
        path = recipe_path(recipe, "data_pipelines")
        data = read_yaml_mapping(path, "recipe")
        data.setdefault("name", path.stem)
    r = from_dict(Recipe, data)
    if not r.ops:
        raise MMGenError(f"recipe '{r.name}' has no ops (add a list under 'ops:', see data_pipelines/README.md)")
    return r


def import_operator_modules(recipe: Recipe) -> None:
    """Import the recipe's ``operator_modules``, so that the operators they define are registered."""
    for name in recipe.operator_modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise MMGenError(f"recipe '{recipe.name}': cannot import operator module '{name}' ({e})") from None


def build_ops(recipe: Recipe) -> list[Op]:
    import_operator_modules(recipe)
    set_max_image_pixels(recipe.max_image_pixels)  # the process's decodes, in workers and the parent alike
    ops: list[Op] = []
    for i, spec in enumerate(recipe.ops):
        where = f"recipe '{recipe.name}' ops[{i}] ({spec.op}): "
        ops.append(build_op(spec.op, spec.level, spec.params, spec.name, where=where))
    labels = [o.label for o in ops]
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup:
        raise MMGenError(f"recipe '{recipe.name}': operator '{dup}' appears twice; give each a distinct 'name:'")
    # Deduplication decides in the parent, after the workers' stateless pass, so it must come last.
    first_stateful = next((i for i, o in enumerate(ops) if o.stateful), len(ops))
    late = next((o for o in ops[first_stateful:] if not o.stateful), None)
    if late is not None:
        raise MMGenError(
            f"recipe '{recipe.name}': '{late.label}' comes after deduplication op "
            f"'{ops[first_stateful].label}'; move deduplication ops to the end of the recipe"
        )
    # A selector must see documents in their final state: a dedup op after it would index the hashes
    # of documents that the selection later drops, and reject their copies for nothing.
    first_sel = next((i for i, o in enumerate(ops) if getattr(o, "selector", False)), len(ops))
    late = next((o for o in ops[first_sel:] if not getattr(o, "selector", False)), None)
    if late is not None:
        raise MMGenError(
            f"recipe '{recipe.name}': '{late.label}' comes after selector '{ops[first_sel].label}'; "
            "selectors (top_k, top_fraction, source_quota) go at the very end of the recipe"
        )
    return ops


def two_pass_selectors(ops: list[Op]) -> list[Op]:
    return [o for o in ops if getattr(o, "selector", False) and getattr(o, "two_pass", False)]
