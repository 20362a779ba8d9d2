"""Tests for aevyra_forge.engine.hub_fetch through the Preparer: a Hub sibling is
downloaded by the real huggingface_hub client from the project's fake Hub (127.0.0.1)
into its cache before the boot, with progress and its time as prepare time; every way it
can fail is a reason, never an exception."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from aevyra_forge.core.recipe import QuantSettings, Recipe
from aevyra_forge.engine import hub_fetch
from aevyra_forge.engine.hub_fetch import HubFetch
from aevyra_forge.engine.prepare import Preparer
from tests.fake_hub import FakeHub, FakeRepo, model_files, online, quantization_config

REPO = "fake/tiny-llama-W8A8"
FILES = {**model_files({"model_type": "llama",
                        "quantization_config": quantization_config("W8A8")}),
         "tokenizer.json": b"{}", "model.safetensors": bytes(range(256)) * 40,
         "original/consolidated.pth": b"never fetched", "README.md": b"# card"}


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    online(monkeypatch, tmp_path)
    folder = tmp_path / "hf-cache"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(folder))
    return folder


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub({REPO: FakeRepo(dict(FILES), downloads=3, gated=False),
                  "fake/gated-W4A16": FakeRepo(dict(FILES), gated=True)}) as server:
        yield server


def served(repo: str = REPO) -> Recipe:
    return Recipe(model="fake/tiny-llama", quant=QuantSettings(method="w8a8_int8",
                                                               checkpoint=repo))


def preparer(hub: FakeHub, repo: str = REPO, **kw: object) -> tuple[Preparer, list[str]]:
    told: list[str] = []
    fetches = {repo: HubFetch(repo, len(FILES["model.safetensors"]), hub.url)}
    return Preparer("", {}, fetches=fetches, progress=told.append, **kw), told  # type: ignore[arg-type]


def test_a_sibling_is_downloaded_into_the_cache_vllm_reads_then_reused(
        cache: Path, hub: FakeHub, tmp_path: Path) -> None:
    prep, told = preparer(hub)
    first = prep(served(), tmp_path / "logs" / "exp_001.prepare.log")
    assert first is not None and first.failure is None and not first.reused
    assert first.seconds >= 0 and first.log == tmp_path / "logs" / "exp_001.prepare.log"
    snapshot = hub_fetch.cache_folder(REPO) / "snapshots" / hub.repos[REPO].sha
    assert hub_fetch.cache_folder(REPO).parent == cache
    assert {p.name for p in snapshot.iterdir()} == {"config.json", "tokenizer.json",
                                                     "model.safetensors"}
    assert (snapshot / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert (cache / f"models--{REPO.replace('/', '--')}" / "refs" / "main").read_text() \
        == hub.repos[REPO].sha  # what `vllm serve fake/tiny-llama-W8A8` resolves main to
    assert hub.lfs_url(REPO, "model.safetensors") in hub.paths("GET")
    assert told[0] == f"hub:{REPO}: downloading {REPO} from {hub.url} of ~0.00 GiB"
    assert told[-1].startswith(f"hub:{REPO}: downloaded {REPO}: ")
    log = first.log.read_text()
    assert log.splitlines()[0] == f"downloading {REPO} from {hub.url} of ~0.00 GiB"

    gets = len(hub.paths("GET"))
    again = prep(served(), tmp_path / "logs" / "exp_002.prepare.log")
    assert again is not None and again.failure is None and again.reused
    assert hub.lfs_url(REPO, "model.safetensors") not in hub.paths("GET")[gets:]
    assert told[-1] == f"hub:{REPO}: {REPO} was already in {hub_fetch.cache_folder(REPO)}"


def test_a_recipe_without_a_hub_checkpoint_needs_no_prepare(hub: FakeHub, tmp_path: Path
                                                           ) -> None:
    prep, _ = preparer(hub)
    assert prep(served("other/repo"), tmp_path / "x.log") is None
    assert hub.requests == []


def test_a_long_download_says_how_far_it_got(cache: Path, hub: FakeHub,
                                            tmp_path: Path) -> None:
    """The CDN holds the weights until forge has said the download is under way: the
    heartbeat line comes while the download runs, then the download ends."""
    hub.hold = threading.Event()
    ticks = itertools.count(0, 31)  # every look is past the heartbeat
    prep, told = preparer(hub, clock=lambda: float(next(ticks)), timeout_s=10**9)

    def progress(text: str) -> None:
        told.append(text)
        if ": downloading " + REPO + ":" in text:
            assert hub.hold is not None
            hub.hold.set()
    prep = prep.reporting(progress)
    result = prep(served(), tmp_path / "x.log")
    assert result is not None and result.failure is None
    beat = [t for t in told if f": downloading {REPO}:" in t]
    assert beat and beat[0].endswith(" of ~0.00 GiB (31 s)")
    assert told[-1].startswith(f"hub:{REPO}: downloaded {REPO}: ")


def test_a_stalled_download_stops_at_the_limit(cache: Path, hub: FakeHub,
                                              tmp_path: Path) -> None:
    hub.hold = threading.Event()
    ticks = itertools.count(0, 1000)
    prep, _ = preparer(hub, clock=lambda: float(next(ticks)), timeout_s=1500)
    result = prep(served(), tmp_path / "x.log")
    hub.hold.set()  # let the abandoned download thread finish
    assert result is not None and result.failure is not None
    assert result.failure.startswith(f"downloading {REPO} took over 1500 s (")
    assert (tmp_path / "x.log").read_text().splitlines()[-1] == f"failed: {result.failure}"


def test_no_disk_refuses_before_any_request(cache: Path, hub: FakeHub, tmp_path: Path
                                            ) -> None:
    prep, _ = preparer(hub, free_bytes=lambda p: 2**20)
    result = prep(served(), tmp_path / "x.log")
    assert result is not None and (result.failure or "").startswith(
        f"not enough disk to download {REPO}: ~0.25 GiB needed, 0.00 GiB free under ")
    assert "set HF_HOME elsewhere" in (result.failure or "")
    assert hub.requests == []


def test_a_gated_sibling_without_a_token_is_a_reason(cache: Path, hub: FakeHub,
                                                     tmp_path: Path) -> None:
    prep, _ = preparer(hub, repo="fake/gated-W4A16")
    result = prep(served("fake/gated-W4A16"), tmp_path / "x.log")
    assert result is not None and (result.failure or "").startswith(
        "downloading fake/gated-W4A16 failed: it is gated: accept its terms on the Hub and "
        "set HF_TOKEN: GatedRepoError")


def test_an_unreachable_hub_is_a_reason(cache: Path, tmp_path: Path) -> None:
    with FakeHub({}) as gone:
        url = gone.url  # a port nothing listens on once the server is closed
    prep = Preparer("", {}, fetches={REPO: HubFetch(REPO, None, url)})
    result = prep(served(), tmp_path / "x.log")
    assert result is not None and (result.failure or "").startswith(
        f"downloading {REPO} failed: the Hub or the network failed: ")
    assert result.log is not None and "failed: " in result.log.read_text()


def test_hub_fetch_is_picklable_for_ray_workers() -> None:
    import pickle
    job = HubFetch(REPO, 10, "http://127.0.0.1:1")
    assert pickle.loads(pickle.dumps(job)) == job
    assert json.dumps(hub_fetch.PATTERNS)  # plain strings, what snapshot_download takes


BASE = "fake/tiny-llama"


def model_preparer(hub: FakeHub, model: str = BASE, **kw: object
                   ) -> tuple[Preparer, list[str]]:
    told: list[str] = []
    fetches = {REPO: HubFetch(REPO, None, hub.url)}
    return Preparer("", {}, fetches=fetches, model=HubFetch(model, 10_240, hub.url),
                    progress=told.append, **kw), told  # type: ignore[arg-type]


@pytest.fixture
def base_hub() -> Iterator[FakeHub]:
    with FakeHub({BASE: FakeRepo(dict(FILES)), REPO: FakeRepo(dict(FILES)),
                  "fake/gated": FakeRepo(dict(FILES), gated=True)}) as server:
        yield server


def test_the_model_is_downloaded_once_before_the_first_boot(
        cache: Path, base_hub: FakeHub, tmp_path: Path) -> None:
    """The baseline's prepare phase downloads the model (so its boot is a boot); later
    trials, in this worker or another of the pool, find it done; a sibling's trial pays
    only for the sibling."""
    prep, told = model_preparer(base_hub)
    baseline = Recipe(model=BASE)
    first = prep(baseline, tmp_path / "exp_000.prepare.log")
    assert first is not None and first.failure is None and not first.reused
    assert first.log == tmp_path / "exp_000.prepare.model.log"
    assert told[0] == f"model: downloading {BASE} from {base_hub.url} of ~0.00 GiB"
    snapshot = hub_fetch.cache_folder(BASE) / "snapshots" / base_hub.repos[BASE].sha
    assert (snapshot / "model.safetensors").is_file()
    requests = len(base_hub.requests)
    assert prep(baseline, tmp_path / "exp_001.prepare.log") is None
    other_worker = prep.reporting(told.append)
    assert other_worker(baseline, tmp_path / "exp_002.prepare.log") is None
    assert len(base_hub.requests) == requests  # the Hub is not asked again
    sibling = other_worker(served(), tmp_path / "exp_003.prepare.log")
    assert sibling is not None and sibling.log == tmp_path / "exp_003.prepare.log"
    assert told[-1].startswith(f"hub:{REPO}: downloaded {REPO}: ")


def test_the_first_trial_of_a_resumed_run_pays_for_both(
        cache: Path, base_hub: FakeHub, tmp_path: Path) -> None:
    """A resume whose next trial serves a sibling: the model's download (its own log) and
    the sibling's are both this trial's prepare time."""
    now = [0.0]

    def clock() -> float:  # 100 s per read while the model downloads, 1 s after
        done = (hub_fetch.cache_folder(BASE) / "refs" / "main").exists()
        now[0] += 1.0 if done else 100.0
        return now[0]
    prep, _ = model_preparer(base_hub, clock=clock)
    both = prep(served(), tmp_path / "exp_007.prepare.log")
    assert both is not None and both.failure is None and both.log == (
        tmp_path / "exp_007.prepare.log")
    assert both.seconds > 100  # the model's time is in it
    assert both.seconds < 1000 and int(both.seconds) % 100 != 0  # and the sibling's
    assert f"downloaded {BASE}: " in (tmp_path / "exp_007.prepare.model.log").read_text()


def test_a_gated_model_without_a_token_is_the_baselines_reason_and_asked_again(
        cache: Path, base_hub: FakeHub, tmp_path: Path) -> None:
    prep, _ = model_preparer(base_hub, model="fake/gated")
    failed = prep(Recipe(model="fake/gated"), tmp_path / "exp_000.prepare.log")
    assert failed is not None and (failed.failure or "").startswith(
        "downloading fake/gated failed: it is gated: accept its terms on the Hub and set "
        "HF_TOKEN")
    again = prep(Recipe(model="fake/gated"), tmp_path / "exp_001.prepare.log")
    assert again is not None and again.failure is not None  # not remembered as done


def test_a_preparer_sent_to_another_node_downloads_there(base_hub: FakeHub) -> None:
    """Ray sends the preparer to a worker node with its cloudpickle: the copy has not
    downloaded the model there yet."""
    cloudpickle = pytest.importorskip("ray.cloudpickle")
    prep, _ = model_preparer(base_hub)
    prep.once.done = True
    copy = cloudpickle.loads(cloudpickle.dumps(prep))
    assert copy.model == prep.model and not copy.once.done
