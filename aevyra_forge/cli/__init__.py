"""The command line (SPEC §2): typer + rich. The only package that prints, and the only
place a ForgeError becomes an exit code (1), an interrupt becomes 130."""

from __future__ import annotations

from aevyra_forge.cli.app import app, main

__all__ = ["app", "main"]
