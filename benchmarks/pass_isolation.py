"""What the pass-isolation fallback saves. Benches the fake vLLM server (tests/fake_vllm.py)
when it honours cache_salt and when it ignores it (prefix-cache blocks shared across
passes; uncached prompt tokens cost "prefill" time), the latter with the fallback off, with
the warm-pass fallback, and with the prefix-cache reset (dev mode). For each it prints the
per-pass output throughput, the spread (max/min), the first pass against the rest, and the
95 % interval of an A/A comparison (two benches of the same server config, no between-boot
noise): a leaking cache widens it, the fallback brings it back.

    python benchmarks/pass_isolation.py [--passes 5] [--requests 16]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aevyra_forge.core.workload import Request, Workload  # noqa: E402
from aevyra_forge.decide.stats import relative_interval  # noqa: E402
from aevyra_forge.measure.client import BenchConfig, BenchRun, bench_run  # noqa: E402
from aevyra_forge.measure.metrics import parse_metrics  # noqa: E402
from tests.fake_vllm import BLOCK_TOKENS, FakeConfig, FakeVllm  # noqa: E402

MODEL = "fake-model"
CASES = (  # name, ignore_cache_salt, dev_mode, fallback
    ("salt honoured", False, False, True),
    ("salt ignored, no fallback", True, False, False),
    ("salt ignored, warm pass", True, False, True),
    ("salt ignored, cache reset", True, True, True),
)


def workload(requests: int) -> Workload:
    reqs = [Request(line=i, prompt=" ".join(f"q{i}w{j}" for j in range(4 * BLOCK_TOKENS)),
                    expected_output_tokens=8) for i in range(requests)]
    return Workload(path="mem.jsonl", sha256="0" * 64, requests=tuple(reqs))


def bench(ignore: bool, dev: bool, fallback: bool, passes: int, requests: int) -> BenchRun:
    config = FakeConfig(model=MODEL, prefill_s_per_token=0.0015, token_delay_s=0.004,
                        ignore_cache_salt=ignore, dev_mode=dev)
    with FakeVllm(config) as fake:
        async def go() -> BenchRun:
            async with httpx.AsyncClient() as client:
                async def scrape() -> dict[str, float]:
                    return parse_metrics((await client.get(fake.url + "/metrics")).text)

                async def reset() -> bool:
                    resp = await client.post(fake.url + "/reset_prefix_cache")
                    return resp.status_code == 200 and resp.json()["success"] is True

                return await bench_run(
                    fake.url, MODEL, workload(requests),
                    BenchConfig(concurrency=4, warmup_requests=4, passes=passes,
                                isolation_fallback=fallback),
                    scrape=scrape, reset_cache=reset)

        return asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--requests", type=int, default=16)
    args = parser.parse_args()
    print(f"{'case':<28} {'isolation':<10} {'tok/s per pass':<38} spread  pass1  A/A 95 %")
    for name, ignore, dev, fallback in CASES:
        a = bench(ignore, dev, fallback, args.passes, args.requests)
        b = bench(ignore, dev, fallback, args.passes, args.requests)
        speeds = [m.output_throughput for m in a.passes]
        rest = sorted(speeds[1:])[len(speeds[1:]) // 2]
        iv = relative_interval([m.output_throughput for m in a.passes],
                               [m.output_throughput for m in b.passes], boot_cv=0.0)
        shown = " ".join(f"{s:6.0f}" for s in speeds)
        print(f"{name:<28} {a.isolation.method:<10} {shown:<38} {max(speeds) / min(speeds):5.2f}"
              f"  {speeds[0] / rest:4.0%}  [{iv.low:+.0%}, {iv.high:+.0%}]")


if __name__ == "__main__":
    main()
