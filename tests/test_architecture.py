"""The house of STYLE.md: each sub-package is a layer, and a module imports only from its
own package or from packages below it. Adding a package means placing it here."""

from __future__ import annotations

import ast
from pathlib import Path

import aevyra_forge

PACKAGE = Path(aevyra_forge.__file__).parent
MAX_MODULE_LINES = 400

# Bottom to top. `testing` ships helpers (the tiny model) and depends on nothing of ours.
LAYERS: list[str] = ["core", "testing", "space", "measure", "engine", "decide", "agent",
                     "store", "loop", "report", "cli"]
TOP_LEVEL_MODULES = {"__init__", "__main__"}
# Entry points that talk to a terminal: the CLI package, and `python -m
# aevyra_forge.testing.tinymodel`, which runs under the vLLM environment's Python; the
# quantization scripts run by file path in vLLM's and llm-compressor's environments.
COMMAND_LINES = ("cli", "__main__", "testing.tinymodel", "testing.trained",
                 "testing.smollm2", "engine.rtn_script", "engine.cal_script")


def _prints_allowed(module: str) -> bool:
    return module in COMMAND_LINES or module.startswith("cli.")
RANK = {name: i for i, name in enumerate(LAYERS)}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _package(module: str) -> str:
    return "cli" if module in ("__main__", "__init__") else module.split(".")[0]


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


def test_every_module_lives_in_a_known_package() -> None:
    stray = sorted(m for m in _modules()
                   if "." not in m and m not in TOP_LEVEL_MODULES and m not in RANK)
    assert not stray, f"put these modules in a package of LAYERS: {stray}"
    unknown = sorted({_package(m) for m in _modules()} - set(RANK))
    assert not unknown, f"place these packages in LAYERS: {unknown}"


def test_every_package_states_its_job() -> None:
    for name in LAYERS:
        init = PACKAGE / name / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init} opens with no docstring saying what the package is for"


def test_imports_point_down() -> None:
    violations = []
    for name, path in _modules().items():
        mine = RANK[_package(name)]
        for target in _imports(path):
            if RANK.get(_package(target), -1) > mine:
                violations.append(f"{name} imports {target}")
    assert not violations, violations


def test_modules_stay_small() -> None:
    big = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    assert all(v <= MAX_MODULE_LINES for v in big.values()), \
        {n: v for n, v in big.items() if v > MAX_MODULE_LINES}


def test_only_cli_prints() -> None:
    for name, path in _modules().items():
        if _prints_allowed(name):
            continue
        tree = ast.parse(path.read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Name) and n.func.id == "print"]
        assert not calls, f"{name} prints; only cli.py may"
