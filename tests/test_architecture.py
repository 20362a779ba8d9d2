"""The import direction of STYLE.md: a module imports only from layers below it (or from
a module listed before it in its own layer). Adding a module means placing it here."""

from __future__ import annotations

import ast
from pathlib import Path

import aevyra_forge

PACKAGE = Path(aevyra_forge.__file__).parent
MAX_MODULE_LINES = 450

LAYERS: list[list[str]] = [
    ["errors"],
    ["models", "modelinfo", "recipe", "workload", "slo", "settings"],
    ["hardware", "vllmargs", "registry", "knobs", "playbook"],
    ["bench", "runner", "simpass", "simulate", "tinymodel"],
    ["scoring", "quality", "judge"],
    ["agent.base", "agent.builtin", "agent.pricing", "agent.providers", "agent.reply",
     "agent.prompt", "agent.llm", "agent"],
    ["store"],
    ["orchestrator", "session"],
    ["report"],
    ["cli", "__main__"],
]
# Entry points that talk to a terminal: the CLI, and `python -m aevyra_forge.tinymodel`,
# which runs under the vLLM environment's Python (it needs torch) and prints the path.
COMMAND_LINES = ("cli", "__main__", "tinymodel")
RANK = {name: (i, j) for i, layer in enumerate(LAYERS) for j, name in enumerate(layer)}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if name:
            found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "aevyra_forge":
                names.update(a.name for a in node.names if a.name != "__version__")
            elif node.module.startswith("aevyra_forge."):
                names.add(node.module.removeprefix("aevyra_forge."))
        elif isinstance(node, ast.Import):
            names.update(a.name.removeprefix("aevyra_forge.") for a in node.names
                         if a.name.startswith("aevyra_forge."))
    return names


def test_every_module_has_a_place() -> None:
    missing = sorted(set(_modules()) - set(RANK))
    assert not missing, f"place these modules in LAYERS: {missing}"


def test_imports_point_down() -> None:
    violations = []
    for name, path in _modules().items():
        for target in _imports(path):
            if target not in RANK:
                continue
            if RANK[target] >= RANK[name]:
                violations.append(f"{name} imports {target}")
    assert not violations, violations


def test_modules_stay_small() -> None:
    big = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    assert all(v <= MAX_MODULE_LINES for v in big.values()), \
        {n: v for n, v in big.items() if v > MAX_MODULE_LINES}


def test_only_cli_prints() -> None:
    for name, path in _modules().items():
        if name in COMMAND_LINES:
            continue
        tree = ast.parse(path.read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Name) and n.func.id == "print"]
        assert not calls, f"{name} prints; only cli.py may"
