"""A recipe as `vllm serve` receives it: an argv list and the extra environment, never a
shell string. Each place a knob lives renders its part of the recipe (registry.places),
in recipe.yaml's key order; `serve_argv` adds where to listen and the served name, for the
launcher and every deploy export alike."""

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


def served_name(recipe: Recipe) -> str:
    """The model name the server answers to: a deployment's fixed `served_model_name`,
    else the recipe's model (a quantized checkpoint is served under the name it
    replaces)."""
    fixed = recipe.config.get("served_model_name")
    return str(fixed) if fixed is not None else recipe.model


def serve_argv(recipe: Recipe, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """argv after `vllm serve` for a server on `host:port` answering to `served_name`, and
    the extra environment. The launcher and the deploy exports both call this, so a
    deployment runs exactly what was measured."""
    argv, env = render(recipe)
    named = [] if "served_model_name" in recipe.config else [
        "--served-model-name", recipe.model]  # rendered with the recipe's own arguments
    return [*argv, "--host", host, "--port", str(port), *named], env
