"""Tests for aevyra_forge.space.child_env: what a vLLM process may inherit (the launcher's
test boots one with a provider key in the environment and reads what it got)."""

from __future__ import annotations

from aevyra_forge.agent.providers import PROVIDERS
from aevyra_forge.space.child_env import CHILD_ENV, child_env, child_env_allowed


def test_no_provider_key_is_ever_inherited() -> None:
    keys = {p.key_env for p in PROVIDERS.values() if p.key_env}
    assert keys and not any(child_env_allowed(k) for k in keys)
    assert child_env({"PATH": "/bin", "LC_ALL": "C", "TORCHINDUCTOR_CACHE_DIR": "/t",
                      "LD_PRELOAD": "/evil.so", "AWS_SECRET_ACCESS_KEY": "x"}) == {
        "PATH": "/bin", "LC_ALL": "C", "TORCHINDUCTOR_CACHE_DIR": "/t"}


def test_every_entry_says_why() -> None:
    assert all(name and why for name, why in CHILD_ENV)
    assert len({name for name, _ in CHILD_ENV}) == len(CHILD_ENV)
