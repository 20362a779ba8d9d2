"""The terminal consoles the CLI writes to, and what happens when their reader goes
away (a closed pipe, a dropped SSH session)."""


from __future__ import annotations

import contextlib
import errno
import os
import signal
from typing import Any

from rich.console import Console


class TerminalConsole(Console):
    """A console whose reader may go away (a closed pipe, a terminal hung up by a dropped
    SSH session). Then it writes nothing more, its descriptor points at /dev/null (so no
    later write, nor the flush at exit, fails), and the run stops like Ctrl-C (exit 130,
    resumable), unless it was detached (SIGHUP ignored, as under nohup): then it goes on
    quietly, its results landing in the run folder as always."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        try:
            super().print(*objects, **kwargs)
        except OSError as exc:  # a hung-up terminal answers EIO; rich handles EPIPE
            if exc.errno != errno.EIO:
                raise
            self.on_broken_pipe()

    def on_broken_pipe(self) -> None:
        self.quiet = True
        with contextlib.suppress(OSError, ValueError):  # no descriptor (a test's capture)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.file.fileno())
            os.close(devnull)
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            raise KeyboardInterrupt


out = TerminalConsole()
err = TerminalConsole(stderr=True, soft_wrap=True)
