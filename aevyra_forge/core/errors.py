"""The ForgeError tree. Every message says what is wrong and how to fix it; only cli.py
turns one into an exit code."""

from __future__ import annotations


class ForgeError(Exception):
    """An error the user can fix. The message is one line that names the fix."""

    exit_code = 1


class UsageError(ForgeError):
    """A command-line option or combination of options is wrong."""


class WorkloadError(ForgeError):
    """The workload file is missing or has a bad line (`file:line: reason`)."""


class RecipeError(ForgeError):
    """A recipe file or a recipe mutation is malformed."""


class KnobError(ForgeError):
    """A proposed knob value is unknown, of the wrong type, out of range or not allowed here."""


class PlaybookError(ForgeError):
    """A playbook is missing, unreadable or structurally wrong."""


class HardwareError(ForgeError):
    """The requested device cannot be found or queried."""


class StoreError(ForgeError):
    """The run store cannot be read or written."""


class RunLockedError(StoreError):
    """Another tuner holds the run's lock."""


class AgentError(ForgeError):
    """The proposer cannot be reached or configured."""


class MissingExtraError(ForgeError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the '{package}' package: "
            f"pip install 'aevyra-forge[{extra}]'"
        )
        self.package = package
        self.extra = extra
