"""Helpers worth shipping to plug-in authors and test suites: the tiny Llama generator the
engine tests serve with real vLLM."""

from __future__ import annotations

from aevyra_forge.testing.tinymodel import write_tiny_llama

__all__ = [
    "write_tiny_llama",
]
