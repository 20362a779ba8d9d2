"""Between-boot noise in the dry-run simulator: each boot of a recipe draws one throughput
factor (CV `boot_cv`) that scales every pass it serves, reproducibly per (recipe, k-th
boot); none at boot_cv=0, and a dry run's drift checks measure it."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from aevyra_forge.core.errors import UsageError
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.settings import DEFAULT_BOOT_CV
from aevyra_forge.core.values import ExperimentRecord
from aevyra_forge.core.workload import Workload
from aevyra_forge.decide.stats import between_boot_noise
from aevyra_forge.engine.sim.engine import SimulatedEngine
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile
from tests.conftest import MODEL_8B, run_cli
from tests.engine.test_sim_engine import boot, make_workload, short_rows

WORDS = ("router", "invoice", "printer", "kernel", "budget", "tenant", "cluster", "ledger")


def engine(seed: int = 3, noise_cv: float = 0.0, boot_cv: float = 0.0,
           gpu: str = "A100-80GB") -> tuple[SimulatedEngine, KnobSpace]:
    spec = gpu_spec(gpu)
    hw = spec.hardware()
    space = KnobSpace(hw, profile(MODEL_8B), simulated=True)
    return SimulatedEngine(hw, spec, space.model, space, seed=seed, noise_cv=noise_cv,
                           boot_cv=boot_cv), space


def throughputs(sim: SimulatedEngine, recipe: Recipe, work: Workload, tmp_path: Path,
                passes: int = 3) -> list[float]:
    """One boot of `recipe`, benched `passes` times: each pass's output throughput."""
    outcome = sim.bench(boot(sim, recipe, tmp_path), work, 4, passes)
    assert outcome.status == "ok", outcome.reason
    return [p.output_throughput for p in outcome.passes]


def test_two_boots_differ_by_a_factor_whose_spread_is_boot_cv(tmp_path: Path) -> None:
    """Over 300 recipes, two boots each against the noise-free figure: the log factors
    centre on 0 with the lognormal sigma of boot_cv (600 draws: the sd's standard error
    is ~3 %, the tolerance 10 %), and every pass of a boot carries its boot's factor."""
    boot_cv = 0.02
    sigma = math.sqrt(math.log1p(boot_cv ** 2))
    noisy, space = engine(boot_cv=boot_cv)
    quiet, _ = engine()
    work = make_workload(tmp_path / "w.jsonl", short_rows(4, out=16, words=20))
    logs, pairs = [], []
    for n in range(8, 308):  # 300 recipes, alike at 4 clients
        recipe = space.apply(space.baseline(MODEL_8B), {"max_num_seqs": n})
        (truth,) = set(throughputs(quiet, recipe, work, tmp_path))
        first, second = (throughputs(noisy, recipe, work, tmp_path) for _ in range(2))
        assert len(set(first)) == len(set(second)) == 1  # one factor for all its passes
        logs += [math.log(first[0] / truth), math.log(second[0] / truth)]
        pairs.append(math.log(second[0] / first[0]))
    assert abs(statistics.fmean(logs)) < 3 * sigma / math.sqrt(len(logs))
    assert statistics.stdev(logs) == pytest.approx(sigma, rel=0.10)
    # two boots of one recipe differ by about sqrt(2) sigma on the log scale
    assert statistics.stdev(pairs) / math.sqrt(2) == pytest.approx(sigma, rel=0.15)
    assert all(p != 0.0 for p in pairs)


def test_a_boots_factor_scales_every_pass_alike_under_pass_noise(tmp_path: Path) -> None:
    """With pass noise, pass i of two boots draws the same pass noise; the boots differ by
    one factor, so pass by pass the ratio is the same."""
    sim, space = engine(noise_cv=0.03, boot_cv=0.05)
    work = make_workload(tmp_path / "w.jsonl", short_rows(8, out=64))
    recipe = space.baseline(MODEL_8B)
    first, second = (throughputs(sim, recipe, work, tmp_path, passes=5) for _ in range(2))
    assert len(set(first)) == 5  # passes still differ by their own noise
    ratios = [b / a for a, b in zip(first, second, strict=True)]
    assert abs(ratios[0] - 1) > 1e-3  # the boots differ...
    assert max(ratios) - min(ratios) < 1e-4 * ratios[0]  # ...by one factor


def test_the_kth_boot_of_a_recipe_is_reproducible(tmp_path: Path) -> None:
    """The factor depends on (seed, recipe, which boot of it), not on what else booted."""
    work = make_workload(tmp_path / "w.jsonl", short_rows(8, out=64))
    a, space = engine(seed=5, noise_cv=0.03, boot_cv=DEFAULT_BOOT_CV)
    base = space.baseline(MODEL_8B)
    other = space.apply(base, {"max_num_seqs": 32})
    a_first = throughputs(a, base, work, tmp_path)
    throughputs(a, other, work, tmp_path)
    a_second = throughputs(a, base, work, tmp_path)
    b, _ = engine(seed=5, noise_cv=0.03, boot_cv=DEFAULT_BOOT_CV)
    assert throughputs(b, base, work, tmp_path) == a_first
    assert throughputs(b, base, work, tmp_path) == a_second != a_first
    c, _ = engine(seed=6, noise_cv=0.03, boot_cv=DEFAULT_BOOT_CV)
    assert throughputs(c, base, work, tmp_path) != a_first


def test_a_resumed_engine_counts_the_boots_its_log_records(tmp_path: Path) -> None:
    """A resumed dry run's fresh engine, told the log, boots a recipe as the k-th boot
    it is in the run; a refused row (no boot time) never booted."""
    work = make_workload(tmp_path / "w.jsonl", short_rows(8, out=64))
    first, space = engine(noise_cv=0.03, boot_cv=DEFAULT_BOOT_CV)
    base = space.baseline(MODEL_8B)
    boots = [throughputs(first, base, work, tmp_path) for _ in range(3)]

    def row(exp: int, boot_s: float | None) -> ExperimentRecord:
        return ExperimentRecord(exp=exp, recipe=base.to_dict(), recipe_id=base.id,
                                parent_id=None, generation=0, layer=1,
                                status="ok" if boot_s else "duplicate", started_at="t",
                                finished_at="t", boot_s=boot_s)

    resumed, _ = engine(noise_cv=0.03, boot_cv=DEFAULT_BOOT_CV)
    resumed.remember([row(0, 80.0), row(1, None), row(2, 81.0)])
    assert throughputs(resumed, base, work, tmp_path) == boots[2]


def test_boot_cv_zero_reproduces_the_figures_before_boot_noise(tmp_path: Path) -> None:
    """Figures the simulator gave before it modelled boots (pinned from that code): at
    boot_cv=0, the default, every boot of a recipe serves them, whatever came between."""
    rows = [{"prompt": f"Question {i}: " + " ".join(WORDS[(i * 7 + j * 3) % 8]
                                                    for j in range(40)),
             "expected_output_tokens": 64 + 8 * i} for i in range(12)]
    work = make_workload(tmp_path / "w.jsonl", rows)
    spec = gpu_spec("H100")
    hw = spec.hardware()
    space = KnobSpace(hw, profile(MODEL_8B), simulated=True)
    sim = SimulatedEngine(hw, spec, space.model, space, seed=11, noise_cv=0.03)
    base = space.baseline(MODEL_8B)
    other = space.apply(base, {"max_num_seqs": 4, "max_model_len": 4096})
    pinned = {base.id: (85.27, [669.0816695116064, 663.9116713001846, 634.9441159923914]),
              other.id: (55.42, [465.22430812068944, 442.222507033945, 453.3668980381597])}
    for recipe in (base, other, base):
        server = boot(sim, recipe, tmp_path)
        outcome = sim.bench(server, work, 8, passes=3)
        boot_s, figures = pinned[recipe.id]
        assert server.boot_s == boot_s and server.boot_factor == 1.0
        assert [p.output_throughput for p in outcome.passes] == pytest.approx(figures,
                                                                              rel=1e-12)


def test_a_negative_cv_is_refused() -> None:
    with pytest.raises(UsageError, match="pass 0 for none"):
        engine(boot_cv=-0.01)


def _boots_of_the_remeasured(run_dir: Path) -> tuple[list[list[float]], str]:
    """Per-pass throughputs of each boot of the recipe a drift check re-measured."""
    (run,) = sorted((run_dir / "runs").glob("0*"))
    recs = [json.loads(line) for line in (run / "experiments.jsonl").read_text().splitlines()
            if line.strip()]
    drift = next(r for r in recs if r["remeasure"])
    boots = [[p["output_throughput"] for p in r["passes"]] for r in recs
             if r["recipe_id"] == drift["recipe_id"] and r["status"] == "ok"]
    return boots, drift["recipe_id"]


@pytest.mark.parametrize("noise", [None, "0", "0.1"])
def test_a_dry_runs_drift_check_measures_between_boot_noise(
        tmp_path: Path, small_workload: Path, capsys: pytest.CaptureFixture[str],
        noise: str | None) -> None:
    """A dry run simulates the between-boot noise its keep rule assumes (--boot-noise, by
    default DEFAULT_BOOT_CV on GPUs): the incumbent re-measured on a fresh boot differs from
    its first boot by one factor on every pass; with --boot-noise 0 the boots agree
    exactly. decide.stats sees the factor once it exceeds what the pass noise explains:
    at 10 % always, at the default 1 % only when that boot's draw is large (two boots of
    five passes at 3 % pass noise hide a gap below about 2 %)."""
    argv = ["tune", "--dry-run", "--model", MODEL_8B, "--workload", str(small_workload),
            "--llm", "builtin", "--run-dir", str(tmp_path / "run"), "--max-experiments", "6",
            "--remeasure-every", "2", "--seed", "3",
            *(["--boot-noise", noise] if noise is not None else [])]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    boots, _ = _boots_of_the_remeasured(tmp_path / "run")
    assert len(boots) >= 2 and all(len(b) >= 2 for b in boots)
    first, again = boots[0], boots[-1]
    n = min(len(first), len(again))
    ratios = [b / a for a, b in zip(first[:n], again[:n], strict=True)]
    estimate = between_boot_noise(boots)
    if noise == "0":
        assert ratios == [1.0] * n and estimate.cv == 0.0
        return
    assert abs(ratios[0] - 1) > 1e-4 and max(ratios) - min(ratios) < 1e-3 * ratios[0]
    if noise == "0.1":
        assert estimate.cv > 0.0
