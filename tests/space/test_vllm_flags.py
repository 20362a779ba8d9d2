"""Reading what the installed vLLM accepts: parsing its recorded `serve --help=all`, the
per-version cache (through a fake `vllm` executable), and the knob space narrowed to it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from aevyra_forge.core.errors import HardwareError, RecipeError
from aevyra_forge.core.values import Hardware
from aevyra_forge.space import gpu_catalogue
from aevyra_forge.space.knob_space import KNOBS, KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.vllm_flags import (
    VllmArgs,
    check_fixed,
    interpreter,
    introspect,
    parse_help,
    vendored,
    vllm_version,
)

HELP = Path(__file__).parents[1] / "data" / "vllm" / "serve_help_all_0.32.0+cpu.txt"
ARGS = parse_help(HELP.read_text())


def test_parses_every_option_of_the_recorded_help() -> None:
    assert len(ARGS) > 300
    seqs = ARGS["max_num_seqs"]
    assert seqs.flags == ("--max-num-seqs",) and not seqs.boolean and seqs.default == "None"
    prefix = ARGS["enable_prefix_caching"]
    assert prefix.boolean and "--no-enable-prefix-caching" in prefix.flags
    assert ARGS["dtype"].choices == ("auto", "bfloat16", "float", "float16", "float32",
                                     "half")
    assert ARGS["gpu_memory_utilization"].default == "0.92"
    assert "fp8_e5m2" in (ARGS["kv_cache_dtype"].choices or ())
    assert ARGS["tensor_parallel_size"].flags == ("--tensor-parallel-size", "-tp")
    assert "help" not in ARGS and "num_scheduler_steps" not in ARGS  # removed V0 flag


def _fake_vllm(tmp_path: Path, version: str = "0.32.0+cpu", help_rc: int = 0) -> Path:
    calls = tmp_path / "calls.log"
    script = tmp_path / "vllm"
    script.write_text(f"""#!/bin/sh
echo "$@" >> {calls}
if [ "$1" = "--version" ]; then echo "{version}"; exit 0; fi
if [ "$1 $2" = "serve --help=all" ]; then cat {HELP}; exit {help_rc}; fi
echo "unexpected: $@" >&2; exit 2
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_introspect_runs_the_vllm_once_per_version(tmp_path: Path) -> None:
    vllm = _fake_vllm(tmp_path)
    first = introspect(str(vllm), cache_dir=tmp_path / "cache")
    again = introspect(str(vllm), cache_dir=tmp_path / "cache")
    assert first.version == "0.32.0+cpu" and first.is_cpu_build
    assert again.args == first.args
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls.count("serve --help=all") == 1
    assert calls.count("--version") == 2


def test_a_broken_vllm_is_a_hardware_error(tmp_path: Path) -> None:
    with pytest.raises(HardwareError, match="--help=all failed"):
        introspect(str(_fake_vllm(tmp_path, help_rc=1)), cache_dir=tmp_path / "c")
    with pytest.raises(HardwareError, match="cannot run"):
        introspect(str(tmp_path / "missing-vllm"), cache_dir=tmp_path / "c")


def test_the_knob_space_follows_this_vllm() -> None:
    vllm = VllmArgs(version="0.32.0+cpu", args=ARGS)
    gpu = KnobSpace(gpu_catalogue.gpu_spec("H100").hardware(),
                    profile("meta-llama/Llama-3.1-8B-Instruct"), vllm=vllm)
    assert gpu.default(KNOBS["gpu_memory_utilization"]) == 0.92  # not the registry's 0.9
    assert gpu.default(KNOBS["max_num_seqs"]) == 1024  # "None" there: hardware default
    assert set(gpu.choices(KNOBS["kv_cache_dtype"])) == {"auto", "fp8", "fp8_e4m3",
                                                         "fp8_e5m2"}
    cpu = KnobSpace(Hardware(device="cpu", cpu_cores=2, memory_gib=24),
                    profile("meta-llama/Llama-3.1-8B-Instruct"), vllm=vllm)
    assert cpu.choices(KNOBS["dtype"]) == ("auto", "float32")
    trimmed = {k: v for k, v in ARGS.items() if k != "max_num_batched_tokens"}
    lacking = KnobSpace(cpu.hw, cpu.model, vllm=VllmArgs("0.32.0+cpu", trimmed))
    assert "max_num_batched_tokens" not in {k.name for k in lacking.knobs(1)}


@pytest.mark.parametrize(("shebang", "expected"), [
    ("#!/opt/venv/bin/python3\n", ["/opt/venv/bin/python3"]),
    ("#!/opt/venv/bin/python3.11 -sE\n", ["/opt/venv/bin/python3.11", "-sE"]),
    ("#!/usr/bin/env python3\n", ["/usr/bin/env", "python3"]),
    ("#!/usr/bin/env -S python3 -u\n", ["/usr/bin/env", "python3", "-u"]),
    ("#!/bin/sh\n", None),
    ("#!/usr/bin/env bash\n", None),
    ("#!/usr/bin/env -i python3\n", None),
    ("#!\n", None),
    ("import vllm\n", None),
])
def test_the_interpreter_is_read_from_the_shebang(tmp_path: Path, shebang: str,
                                                  expected: list[str] | None) -> None:
    script = tmp_path / "vllm"
    script.write_text(shebang + "print('hi')\n")
    assert interpreter(str(script)) == expected
    assert interpreter(str(tmp_path / "absent")) is None


@pytest.mark.parametrize("shebang", ["#!/usr/bin/env python3", "#!/usr/bin/env -S python3 -u"])
def test_an_env_launcher_is_asked_through_its_interpreter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shebang: str) -> None:
    """pip's launchers in some environments start with `#!/usr/bin/env python3`: the
    version comes from that python (found on PATH), never from a slow `vllm --version`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "python.argv"
    python = bin_dir / "python3"
    python.write_text(f"""#!/bin/sh
echo "$@" > {seen}
for a in "$@"; do [ "$a" = "-c" ] && {{ echo 0.32.0+cpu; exit 0; }}; done
exit 3
""")
    python.chmod(0o755)
    vllm = bin_dir / "vllm"
    vllm.write_text(f"{shebang}\nraise SystemExit('vllm itself must not run')\n")
    vllm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert vllm_version(str(vllm)) == "0.32.0+cpu"
    assert seen.read_text().startswith("-u -c " if "-u" in shebang else "-c ")


def test_a_cache_that_cannot_be_written_costs_only_time(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would go")
    args = introspect(str(_fake_vllm(tmp_path)), cache_dir=blocked / "cache")
    assert args.accepts("max_num_seqs")


# -- a recipe's fixed engine arguments ------------------------------------------------------

def test_the_vendored_flags_are_the_recorded_help() -> None:
    """A dry run checks recipes against this list: it must be vLLM's, not a hand copy."""
    flags = vendored()
    assert flags.version == "0.32.0" and flags.args == ARGS


def test_switches_booleans_and_valued_flags_are_told_apart() -> None:
    assert ARGS["disable_log_stats"].switch and not ARGS["disable_log_stats"].boolean
    assert ARGS["trust_remote_code"].boolean and not ARGS["trust_remote_code"].switch
    assert not (ARGS["max_model_len"].switch or ARGS["max_model_len"].boolean)
    assert not ARGS["served_model_name"].switch  # nargs="+": takes values


VLLM = VllmArgs(version="0.32.0", args=ARGS)


def test_fixed_arguments_are_kept_exactly_as_given() -> None:
    config = {"trust_remote_code": True, "served_model_name": "svc", "seed": 7,
              "enable_chunked_prefill": False, "disable_log_stats": True,
              "dtype": "float16", "max_model_len": None}
    assert check_fixed(config, VLLM, "r.yaml") == config


@pytest.mark.parametrize(("config", "message"), [
    ({"max_num_seq": 8}, "r.yaml: config.max_num_seq: vLLM 0.32.0 has no such argument "
                         "(see vllm serve --help=all); did you mean max_num_seqs?"),
    ({"zzzz": 1}, "r.yaml: config.zzzz: vLLM 0.32.0 has no such argument (see vllm serve "
                  "--help=all)"),
    ({"trust_remote_code": "yes"}, "r.yaml: config.trust_remote_code: --trust-remote-code "
                                   "is on or off: write true or false"),
    ({"disable_log_stats": False}, "r.yaml: config.disable_log_stats: --disable-log-stats "
                                   "takes no value: write true to pass it, or drop the key"),
    ({"seed": True}, "r.yaml: config.seed: --seed takes a value, not true"),
    ({"dtype": "fp64"}, "r.yaml: config.dtype: 'fp64' is not one of auto, bfloat16, float, "
                        "float16, float32, half"),
    ({"port": 9000}, "r.yaml: config.port: not for a recipe: forge chooses where each "
                     "server listens (deploy.sh keeps it)"),
    ({"api_key": "sk-1"}, "r.yaml: config.api_key: not for a recipe: a key in a recipe "
                          "would be copied into the run's logs; set VLLM_API_KEY in the "
                          "environment instead"),
])
def test_a_bad_fixed_argument_is_one_line(config: dict[str, object], message: str) -> None:
    with pytest.raises(RecipeError) as exc:
        check_fixed(config, VLLM, "r.yaml")  # type: ignore[arg-type]
    assert str(exc.value) == message


def test_a_real_run_checks_fixed_arguments_against_the_installed_vllm() -> None:
    from aevyra_forge.core.recipe import Recipe

    older = VllmArgs(version="0.30.1", args={d: a for d, a in ARGS.items() if d != "seed"})
    hw = gpu_catalogue.gpu_spec("A100-80GB").hardware()
    model = "meta-llama/Llama-3.1-8B-Instruct"
    recipe = Recipe(model=model, config={"seed": 3, "trust_remote_code": True})
    with pytest.raises(RecipeError, match=r"config\.seed: vLLM 0\.30\.1 has no such argument"):
        KnobSpace(hw, profile(model), vllm=older).check_recipe(recipe, "r.yaml")
    current = VllmArgs(version="0.32.0", args=ARGS)
    assert KnobSpace(hw, profile(model), vllm=current).check_recipe(recipe).config == {
        "seed": 3, "trust_remote_code": True}
