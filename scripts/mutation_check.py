"""Does the test suite notice when the decision wiring breaks? Applies each one-line
mutation in MUTATIONS (exact text replacement) to a throw-away copy of the repository,
runs the default suite there, and reports whether the suite caught it (failed). A control
run without any mutation comes first and must pass. Every run starts from one snapshot of
the work tree taken at the start, so edits made meanwhile do not mix into the runs. A
developer tool, not part of the suite; it takes one suite run per mutation plus the
control.

    python scripts/mutation_check.py                 # control, then every mutation
    python scripts/mutation_check.py --only latency-guard-compares-candidate-with-itself
    python scripts/mutation_check.py -- tests/decide  # a narrower suite while iterating

Exit status: 0 when the control passes and every mutation is caught; 1 when a mutation
survives; 2 when the control fails or a mutation no longer applies (its text is not found
exactly once: update the table below)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mutation:
    """Replace `old` by `new` in the one file matched by `where` (a glob relative to the
    repository root) that contains it; `old` must occur exactly once among those files,
    so a module may move within its package without the table changing."""

    name: str
    where: str
    old: str
    new: str
    caught_by: str  # the test meant to catch it


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "boot-cv-ignores-remeasured-boots", "aevyra_forge/decide/*.py",
        "    return max(s.boot_cv(), between_boot_noise(boots).cv)\n",
        "    return s.boot_cv()\n",
        "tests/decide/test_verdict.py::"
        "test_incumbent_boots_that_disagree_widen_the_interval_and_refuse_the_keep"),
    Mutation(
        "pass-noise-not-pooled", "aevyra_forge/decide/*.py",
        "    return pooled_noise(groups) if len(groups) >= 2 else None\n",
        "    return None\n",
        "tests/decide/test_verdict.py::"
        "test_pass_noise_pooled_from_earlier_configs_decides_a_close_call"),
    Mutation(
        "latency-guard-compares-candidate-with-itself", "aevyra_forge/decide/*.py",
        "latency = latency_regressions(passes, incumbent,",
        "latency = latency_regressions(passes, passes,",
        "tests/decide/test_verdict.py::"
        "test_a_throughput_win_with_a_far_worse_tail_is_refused_by_the_latency_guard"),
    Mutation(
        "state-ignores-drift-checks", "aevyra_forge/loop/*.py",
        "rec.recipe_id == self.best.id and (rec.kept or rec.remeasure)",
        "rec.recipe_id == self.best.id and rec.kept",
        "tests/loop/test_state.py::"
        "test_a_drift_check_gives_the_incumbent_its_re_measured_passes"),
    Mutation(
        "failed-request-config-judged-ok", "aevyra_forge/decide/*.py",
        'if status != "ok" or median is None or not healthy(measured):',
        'if status != "ok" or median is None:',
        "tests/decide/test_verdict.py::"
        "test_an_ok_measurement_with_too_many_failed_requests_is_never_kept"),
    Mutation(
        "failed-request-record-takes-the-lead", "aevyra_forge/core/*.py",
        "    return healthy(record.passes or (record.metrics,))\n",
        "    return True\n",
        "tests/loop/test_state.py::"
        "test_a_kept_record_whose_requests_failed_never_takes_the_lead"),
    Mutation(
        "lossy-change-kept-without-accuracy", "aevyra_forge/decide/*.py",
        "    if accuracy is None and output_changes and best is not None:\n",
        "    if False:\n",
        "tests/decide/test_rules.py::"
        "test_a_change_that_can_alter_outputs_needs_an_accuracy_figure"),
)

ROOT = Path(__file__).resolve().parent.parent
PYTEST = ("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider")
# Not part of a checkout: copied only when the repository is not a git work tree.
_IGNORED = ("__pycache__", ".git", ".venv*", ".mypy_cache", ".ruff_cache", ".pytest_cache",
            ".hypothesis", ".forge", "*.egg-info", "build", "dist")


class MutationError(Exception):
    """A mutation that no longer applies to the code."""


@dataclass(frozen=True)
class Outcome:
    passed: bool
    seconds: float
    first_failure: str
    output: str


def locate(root: Path, mutation: Mutation) -> Path:
    """The one file under `root` that `mutation` changes."""
    hits = [(path, path.read_text().count(mutation.old))
            for path in sorted(root.glob(mutation.where)) if path.is_file()]
    found = [(path, n) for path, n in hits if n]
    if len(found) != 1 or found[0][1] != 1:
        where = ", ".join(f"{p.relative_to(root)} ({n}x)" for p, n in found) or "nowhere"
        raise MutationError(f"{mutation.name}: expected the text exactly once in "
                            f"{mutation.where}, found it {where}:\n{mutation.old}")
    return found[0][0]


def apply(root: Path, mutation: Mutation) -> Path:
    path = locate(root, mutation)
    path.write_text(path.read_text().replace(mutation.old, mutation.new, 1))
    return path


def copy_repository(destination: Path) -> None:
    """The work tree as git sees it (tracked and untracked-but-not-ignored files), so
    virtual environments and caches stay behind; everything but those when git is
    missing. Reads the work tree only: no git command here writes anything."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, check=True, capture_output=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(*_IGNORED),
                        dirs_exist_ok=True)
        return
    for name in filter(None, listing.split("\0")):
        source = ROOT / name
        if source.is_file():  # listed but deleted in the work tree: skip
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_suite(root: Path, pytest_args: Sequence[str], timeout_s: float) -> Outcome:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root),
                                                       os.environ.get("PYTHONPATH")]))}
    where = subprocess.run([sys.executable, "-c",
                            "import aevyra_forge; print(aevyra_forge.__file__)"],
                           cwd=root, env=env, capture_output=True, text=True)
    if not where.stdout.strip().startswith(str(root)):
        raise MutationError(f"the copy's package is not the one imported "
                            f"({where.stdout.strip() or where.stderr.strip()})")
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, *PYTEST, *pytest_args], cwd=root, env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return Outcome(False, time.perf_counter() - start, f"timed out after {timeout_s:g} s",
                       text)
    output = done.stdout + done.stderr
    first = next((line for line in output.splitlines()
                  if line.startswith(("FAILED ", "ERROR "))), "")
    if done.returncode != 0 and not first:
        first = f"pytest exited {done.returncode}"
    return Outcome(done.returncode == 0, time.perf_counter() - start, first, output)


def trial(snapshot: Path, mutation: Mutation | None, pytest_args: Sequence[str],
          timeout_s: float) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as tmp:
        root = Path(tmp).resolve() / "repo"
        shutil.copytree(snapshot, root)
        if mutation is not None:
            apply(root, mutation)
        return run_suite(root, pytest_args, timeout_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        choices=[m.name for m in MUTATIONS], help="run only this mutation")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds one suite run may take (default 1800)")
    parser.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    with tempfile.TemporaryDirectory(prefix="mutation-snapshot-") as tmp:
        snapshot = Path(tmp).resolve() / "repo"
        copy_repository(snapshot)
        return check(snapshot, chosen, args.pytest_args, args.timeout)


def check(snapshot: Path, chosen: Sequence[Mutation], pytest_args: Sequence[str],
          timeout_s: float) -> int:
    try:
        for mutation in chosen:  # fail before any suite run when the table is stale
            locate(snapshot, mutation)
        control = trial(snapshot, None, pytest_args, timeout_s)
    except MutationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    width = max(len(m.name) for m in MUTATIONS)
    print(f"{'control (no mutation)':<{width}}  {'passed' if control.passed else 'FAILED':<8}"
          f" {control.seconds:6.1f} s  {control.first_failure}", flush=True)
    if not control.passed:
        print("the suite fails without any mutation, so a mutation run says nothing:\n"
              + "\n".join(control.output.splitlines()[-30:]), file=sys.stderr)
        return 2
    survived = []
    for mutation in chosen:
        try:
            outcome = trial(snapshot, mutation, pytest_args, timeout_s)
        except MutationError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        verdict = "SURVIVED" if outcome.passed else "caught"
        detail = (f"meant to be caught by {mutation.caught_by}" if outcome.passed
                  else outcome.first_failure)
        print(f"{mutation.name:<{width}}  {verdict:<8} {outcome.seconds:6.1f} s  {detail}",
              flush=True)
        if outcome.passed:
            survived.append(mutation.name)
    if survived:
        print(f"{len(survived)} of {len(chosen)} mutations survived: {', '.join(survived)}",
              file=sys.stderr)
        return 1
    print(f"all {len(chosen)} mutations caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
