"""Is our bench client ever the bottleneck? Starts the fake vLLM server (tests/fake_vllm.py,
instant answers) in its own process and measures the requests/s and output tokens/s that
forge's client (bench.bench_passes) sustains at several concurrencies, side by side with
`vllm bench serve`'s client against the same server in the same run. Goal: ratio >= 1.

    python benchmarks/client_overhead.py [--vllm-bin PATH] [--num-prompts 400]

`vllm bench serve` needs a tokenizer for its random prompts: pass --tokenizer DIR, or the
script writes a tiny local model with `python -m aevyra_forge.testing.tinymodel` using the vLLM
interpreter (no download).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aevyra_forge.core.workload import Request, Workload
from aevyra_forge.measure.client import BenchConfig, bench_passes

ROOT = Path(__file__).resolve().parent.parent
FAKE_SERVER = ROOT / "tests" / "fake_vllm.py"
MODEL = "fake/instant"
INPUT_WORDS = 32  # prompt length (the fake counts words as tokens)
OUTPUT_TOKENS = 64
WARMUP_REQUESTS = 8


@dataclass
class Rate:
    req_s: float
    tok_s: float
    completed: int
    server_busy: float  # fraction of one core the fake server used while serving


def start_server() -> tuple[subprocess.Popen[str], str]:
    """The fake server in its own process (so it never shares a GIL with a client); its
    first line announces the URL once it listens."""
    proc = subprocess.Popen([sys.executable, str(FAKE_SERVER), "--port", "0", "--model",
                             MODEL], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "running on" not in line:
        proc.kill()
        raise SystemExit(f"fake server did not start: {line!r}")
    return proc, line.split("running on ", 1)[1].split()[0]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ours(url: str, concurrency: int, n: int, server_pid: int) -> Rate:
    reqs = tuple(Request(line=i, prompt=" ".join(f"w{i}x{k}" for k in range(INPUT_WORDS)),
                         expected_output_tokens=OUTPUT_TOKENS) for i in range(n))
    workload = Workload(path="synthetic", sha256="0" * 64, requests=reqs)
    config = BenchConfig(concurrency=concurrency, warmup_requests=WARMUP_REQUESTS,
                         request_timeout_s=60.0, bench_timeout_s=600.0)
    cpu0 = cpu_seconds(server_pid)
    [m] = asyncio.run(bench_passes(url, MODEL, workload, config))
    busy = (cpu_seconds(server_pid) - cpu0) / m.duration_s
    if m.failed:
        print(f"  ours c={concurrency}: {m.failed} failed: {m.failure_reasons}")
    return Rate(m.request_throughput, m.output_throughput, m.completed, busy)


def vllm_bench(vllm_bin: str, url: str, tokenizer: str, concurrency: int, n: int,
               server_pid: int, out_dir: Path) -> Rate | str:
    result = out_dir / f"vllm_c{concurrency}.json"
    cmd = [vllm_bin, "bench", "serve", "--backend", "vllm", "--base-url", url,
           "--endpoint", "/v1/completions", "--model", MODEL, "--tokenizer", tokenizer,
           "--dataset-name", "random", "--random-input-len", str(INPUT_WORDS),
           "--random-output-len", str(OUTPUT_TOKENS), "--ignore-eos",
           "--num-prompts", str(n), "--max-concurrency", str(concurrency),
           "--num-warmups", str(WARMUP_REQUESTS), "--disable-tqdm", "--save-result",
           "--result-dir", str(out_dir), "--result-filename", result.name]
    cpu0 = cpu_seconds(server_pid)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "VLLM_NO_USAGE_STATS": "1"})
    cpu = cpu_seconds(server_pid) - cpu0
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return f"exit {proc.returncode}: " + " | ".join(tail)
    data = json.loads(result.read_text())
    return Rate(float(data["request_throughput"]), float(data["output_throughput"]),
                int(data["completed"]), cpu / float(data["duration"]))


def interpreter_of(executable: str) -> str:
    """The Python a console script runs with (its shebang), to build the tokenizer."""
    try:
        first = Path(executable).read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return sys.executable
    return first[2:].strip() if first.startswith("#!") and "python" in first else \
        sys.executable


def tiny_tokenizer(vllm_bin: str, out_dir: Path) -> str | None:
    target = out_dir / "tiny"
    proc = subprocess.run([interpreter_of(vllm_bin), "-m", "aevyra_forge.testing.tinymodel",
                           str(target)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        print(f"cannot build a tokenizer for vllm bench: {proc.stderr.strip()[-300:]}")
        return None
    return str(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-bin", default=os.environ.get("FORGE_VLLM_BIN")
                        or shutil.which("vllm"))
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--num-prompts", type=int, default=400)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell; the median "
                        "is reported")
    args = parser.parse_args()

    server, url = start_server()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="forge-overhead-") as tmp:
            out_dir = Path(tmp)
            tokenizer = args.tokenizer
            why_not = ""
            if not args.vllm_bin:
                why_not = "no vllm executable (use --vllm-bin or FORGE_VLLM_BIN)"
            elif tokenizer is None:
                tokenizer = tiny_tokenizer(args.vllm_bin, out_dir)
                why_not = "" if tokenizer else "no tokenizer for vllm bench serve"
            for c in args.concurrency:
                mine, theirs = [], []
                for _ in range(args.repeats):
                    mine.append(ours(url, c, args.num_prompts, server.pid))
                    if not why_not and tokenizer:
                        got = vllm_bench(args.vllm_bin, url, tokenizer, c, args.num_prompts,
                                         server.pid, out_dir)
                        if isinstance(got, str):
                            why_not = f"vllm bench serve failed: {got}"
                        else:
                            theirs.append(got)
                rows.append((c, mine, theirs))
    finally:
        server.terminate()
        server.wait()

    def med(rates: list[Rate], attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in rates))

    print(f"\n{args.num_prompts} requests of {INPUT_WORDS} words -> {OUTPUT_TOKENS} tokens, "
          f"instant-answer fake server on loopback, median of {args.repeats} run(s)")
    print(f"{'conc':>5} {'ours req/s':>11} {'ours tok/s':>11} {'vllm req/s':>11} "
          f"{'vllm tok/s':>11} {'ratio':>6}   server busy (ours / vllm)")
    for c, mine, theirs in rows:
        line = f"{c:>5} {med(mine, 'req_s'):>11.1f} {med(mine, 'tok_s'):>11.0f}"
        if theirs:
            ratio = med(mine, "req_s") / med(theirs, "req_s")
            line += (f" {med(theirs, 'req_s'):>11.1f} {med(theirs, 'tok_s'):>11.0f} "
                     f"{ratio:>6.2f}   {med(mine, 'server_busy'):.0%} / "
                     f"{med(theirs, 'server_busy'):.0%}")
        else:
            line += f" {'-':>11} {'-':>11} {'-':>6}   {med(mine, 'server_busy'):.0%} / -"
        print(line)
    if why_not:
        print(f"vllm bench serve not compared: {why_not}")


if __name__ == "__main__":
    main()
