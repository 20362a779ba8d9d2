"""The vLLM side, an ordinary `vllm.general_plugins` entry point. vLLM calls `register()`
in every server process (API server, engine core, worker) whose VLLM_PLUGINS names it,
possibly more than once, so it is idempotent. Unless FORGE_KERNEL_DEMO=1 it does nothing:
installing the package never changes a server that did not ask for it."""

from __future__ import annotations

import os
import sys

from forge_kernel_demo import MARKER_FILE, REGISTERED, SWITCH

_done = False


def proof(line: str) -> None:
    """One line in the server log (stderr, which the launcher captures) and, when
    FORGE_KERNEL_DEMO_MARKER names a file, in that file too: from every process."""
    text = f"{line} (pid {os.getpid()})"
    print(text, file=sys.stderr, flush=True)
    path = os.environ.get(MARKER_FILE)
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")


def register() -> None:
    global _done
    if _done or os.environ.get(SWITCH) != "1":
        return
    _done = True
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        # The CPU platform ignores --attention-backend choices other than CPU_ATTN, so the
        # plug-in overrides CPU_ATTN's class path instead of registering CUSTOM.
        register_backend(AttentionBackendEnum.CPU_ATTN,
                         "forge_kernel_demo.cpu_attn.DemoCPUAttentionBackend")
        proof(f"{REGISTERED}: CPU_ATTN -> forge_kernel_demo.cpu_attn")
    else:
        proof(f"{REGISTERED}: no kernel for {current_platform.device_name}, nothing changed")
