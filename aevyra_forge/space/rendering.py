"""A recipe as `vllm serve` receives it: an argv list and the extra environment, never a
shell string. Each place a knob lives renders its part of the recipe (registry.places),
in recipe.yaml's key order."""

from __future__ import annotations

from aevyra_forge.core.recipe import Recipe
from aevyra_forge.space.registry import KNOBS, places


def render(recipe: Recipe) -> tuple[list[str], dict[str, str]]:
    """argv after `vllm serve` (the model first) and the extra environment."""
    argv: list[str] = [recipe.serve_model]
    env: dict[str, str] = {}
    for group in places(KNOBS.values()):
        part_argv, part_env = group[0].placement.render(recipe)
        argv.extend(part_argv)
        env.update(part_env)
    return argv, env
