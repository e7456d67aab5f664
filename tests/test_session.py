"""The library API: requests, foreign calls, and what each run pushes.

Costs are computed by hand from config/prices.yaml (US dollars per 1M tokens)
and the simulator's token rule: a run of ASCII letters or any other
non-space character is one token, each message adds 3 and the request 3.
"Say hello" is 2 + 3 + 3 = 8 prompt tokens. Answers are 20 tokens, and
reasoning models add twice that as reasoning tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import AppClient, Samples, parse_metrics, sample, scrape
from gateways import memory_pushgateway, read_gateway
from openai.types import CompletionUsage
from prometheus_client.exposition import generate_latest

from llmwatch import ApiError, BatchSession, Usage
from llmwatch.config import Settings
from llmwatch.errors import ConfigError
from llmwatch.push import LAST_SUCCESS_METRIC

MakeSettings = Callable[..., Settings]
# gpt-4o-mini: 8 prompt tokens at $0.15 and 20 completion tokens at $0.60.
SAY_HELLO_COST = (8 * 0.15 + 20 * 0.60) / 1e6
# gpt-5-mini: 8 prompt tokens at $0.25, 20 + 40 reasoning tokens at $2.00.
SECOND_ONE_COST = (8 * 0.25 + 60 * 2.00) / 1e6
# gpt-4o: 488 uncached prompt tokens at $2.50, 512 cached at $1.25 and 200
# completion tokens at $10.00.
FOREIGN_COST = (488 * 2.50 + 512 * 1.25 + 200 * 10.00) / 1e6


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Pushgateway shared by this module; each test uses its own job."""
    with memory_pushgateway(tmp_path_factory.mktemp("pushgateway")) as url:
        yield url


def registry_samples(session: BatchSession) -> Samples:
    return parse_metrics(generate_latest(session.registry).decode())


async def read_async(url: str) -> Samples:
    return await asyncio.to_thread(read_gateway, url)


async def test_session_pushes_calls_and_run(
    gateway_url: str, make_settings: MakeSettings
) -> None:
    job = "session-push"
    started = time.time()
    async with BatchSession(
        job=job,
        pushgateway=gateway_url,
        grouping_key={"instance": "worker-1"},
        settings=make_settings(),
    ) as session:
        hello = await session.ask("Say hello")
        second = await session.ask(
            messages=[{"role": "user", "content": "Second one"}], model="gpt-5-mini"
        )
        foreign = session.record(
            "gpt-4o-2024-08-06",
            Usage(prompt_tokens=1000, completion_tokens=200, cached_tokens=512),
            1.5,
        )
    finished = time.time()

    assert hello.cost_usd == pytest.approx(SAY_HELLO_COST)
    assert second.cost_usd == pytest.approx(SECOND_ONE_COST)
    assert foreign.cost_usd == pytest.approx(FOREIGN_COST)
    samples = await read_async(gateway_url)
    group = {"job": job, "instance": "worker-1"}
    for model in ("gpt-4o-mini", "gpt-5-mini", "gpt-4o"):
        assert sample(samples, "llm_requests_total", model=model, **group) == 1
    tokens = "llm_tokens_total"
    assert sample(samples, tokens, model="gpt-4o-mini", type="prompt", **group) == 8
    assert (
        sample(samples, tokens, model="gpt-4o-mini", type="completion", **group) == 20
    )
    assert sample(samples, tokens, model="gpt-5-mini", type="completion", **group) == 60
    assert sample(samples, tokens, model="gpt-4o", type="prompt", **group) == 1000
    assert (
        sample(samples, "llm_reasoning_tokens_total", model="gpt-5-mini", **group) == 40
    )
    assert (
        sample(samples, "llm_cached_prompt_tokens_total", model="gpt-4o", **group)
        == 512
    )
    cost = "llm_cost_usd_total"
    assert sample(samples, cost, model="gpt-4o-mini", **group) == pytest.approx(
        SAY_HELLO_COST
    )
    assert sample(samples, cost, model="gpt-5-mini", **group) == pytest.approx(
        SECOND_ONE_COST
    )
    assert sample(samples, cost, model="gpt-4o", **group) == pytest.approx(FOREIGN_COST)
    latency = "llm_request_latency_seconds"
    assert sample(samples, f"{latency}_count", model="gpt-4o", **group) == 1
    assert sample(samples, f"{latency}_sum", model="gpt-4o", **group) == 1.5
    items = "llm_batch_items_total"
    assert sample(samples, items, outcome="succeeded", **group) == 3
    assert sample(samples, items, outcome="failed", **group) == 0
    assert started <= sample(samples, LAST_SUCCESS_METRIC, **group) <= finished
    duration = sample(samples, "llm_batch_duration_seconds", **group)
    assert 0 < duration <= finished - started
    assert session.pusher is not None
    assert (session.pusher.attempted, session.pusher.failed) == (1, 0)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"prompt": "Hi", "messages": [{"role": "user"}]}, id="both"),
        pytest.param({}, id="neither"),
        pytest.param({"prompt": ""}, id="empty-prompt"),
        pytest.param({"prompt": "Hi", "temperature": 3.0}, id="temperature"),
        pytest.param({"prompt": "Hi", "max_tokens": 0}, id="max-tokens"),
        pytest.param(
            {"messages": [{"role": "robot", "content": "Hi"}]}, id="message-role"
        ),
        pytest.param({"prompt": "Hi", "model": "gpt-3"}, id="model-not-served"),
        pytest.param({"prompt": "Hi #fault=rate_limit"}, id="rate-limited"),
        pytest.param({"prompt": "Hi #fault=server_error"}, id="upstream-error"),
    ],
)
async def test_session_errors_match_ask(
    body: dict[str, Any], client: AppClient, make_settings: MakeSettings
) -> None:
    response = await client.post("/ask", json=body)
    expected = (await response.json())["error"]

    async with BatchSession(settings=make_settings()) as session:
        with pytest.raises(ApiError) as raised:
            await session.ask(**body)

    assert raised.value.status == response.status
    assert raised.value.error_type == expected["type"]
    assert raised.value.field == expected.get("field")
    service = await scrape(client)
    errors = {
        key: value
        for key, value in registry_samples(session).items()
        if key[0] == "llm_errors_total" and value
    }
    assert len(errors) == 1
    assert errors == {key: value for key, value in service.items() if key in errors}
    assert session.failed == 1
    assert (
        sample(registry_samples(session), "llm_batch_items_total", outcome="failed")
        == 1
    )


async def test_session_exception_keeps_last_success(
    gateway_url: str, make_settings: MakeSettings
) -> None:
    job = "session-exception"
    async with BatchSession(
        job=job, pushgateway=gateway_url, settings=make_settings()
    ) as first:
        await first.ask("Say hello")
    previous = sample(
        await read_async(gateway_url), LAST_SUCCESS_METRIC, job=job, instance=""
    )
    assert previous > 0

    with pytest.raises(RuntimeError, match="the job broke"):
        async with BatchSession(
            job=job, pushgateway=gateway_url, settings=make_settings()
        ) as session:
            with contextlib.suppress(ApiError):
                await session.ask("Say hello #fault=server_error")
            raise RuntimeError("the job broke")

    assert session.run_failed
    samples = await read_async(gateway_url)
    group = {"job": job, "instance": ""}
    assert sample(samples, LAST_SUCCESS_METRIC, **group) == previous
    assert sample(samples, "llm_batch_items_total", outcome="failed", **group) == 1
    assert sample(samples, "llm_batch_items_total", outcome="succeeded", **group) == 0
    assert (
        sample(
            samples,
            "llm_errors_total",
            model="gpt-4o-mini",
            type="upstream_error",
            **group,
        )
        == 1
    )


async def test_failed_first_run_omits_timestamp(
    gateway_url: str, make_settings: MakeSettings
) -> None:
    job = "session-never-succeeded"
    async with BatchSession(
        job=job, pushgateway=gateway_url, settings=make_settings()
    ) as session:
        await session.ask("Say hello")
        session.mark_failed()

    samples = await read_async(gateway_url)
    group = {"job": job, "instance": ""}
    assert sample(samples, "llm_batch_items_total", outcome="succeeded", **group) == 1
    assert (LAST_SUCCESS_METRIC, frozenset(group.items())) not in samples


async def test_record_foreign_calls(make_settings: MakeSettings) -> None:
    openai_usage = CompletionUsage.model_validate(
        {
            "prompt_tokens": 100,
            "completion_tokens": 300,
            "total_tokens": 400,
            "completion_tokens_details": {"reasoning_tokens": 200},
        }
    )
    async with BatchSession(settings=make_settings()) as session:
        foreign = session.record(
            "gpt-4o-2024-08-06",
            Usage(prompt_tokens=1000, completion_tokens=200, cached_tokens=512),
            1.5,
            request_id="req_foreign",
        )
        reasoning = session.record("o3", openai_usage, 4.0, time_to_first_token_s=3.0)
        no_usage = session.record("gpt-4o", None, 0.5)

    assert foreign.model == "gpt-4o"
    assert foreign.cost_usd == pytest.approx(FOREIGN_COST)
    assert foreign.request_id == "req_foreign"
    # o3: 100 prompt tokens at $2.00 and 300 completion tokens at $8.00.
    assert reasoning.cost_usd == pytest.approx((100 * 2.00 + 300 * 8.00) / 1e6)
    assert reasoning.reasoning_tokens == 200
    assert no_usage.usage_missing
    samples = registry_samples(session)
    assert sample(samples, "llm_requests_total", model="gpt-4o") == 2
    assert sample(samples, "llm_cost_usd_total", model="gpt-4o") == pytest.approx(
        FOREIGN_COST
    )
    assert sample(samples, "llm_cached_prompt_tokens_total", model="gpt-4o") == 512
    assert sample(samples, "llm_reasoning_tokens_total", model="o3") == 200
    assert sample(samples, "llm_usage_missing_total", model="gpt-4o") == 1
    assert sample(samples, "llm_time_to_first_token_seconds_sum", model="o3") == 3.0
    assert sample(samples, "llm_batch_items_total", outcome="succeeded") == 3
    assert session.pusher is None
    assert not await session.push()


@pytest.mark.parametrize(
    ("counts", "latency_s", "message"),
    [
        ({"prompt_tokens": -1}, 1.0, "prompt_tokens"),
        ({"prompt_tokens": 10, "cached_tokens": 11}, 1.0, "cached_tokens"),
        ({"completion_tokens": 5, "reasoning_tokens": 6}, 1.0, "reasoning_tokens"),
        ({}, -0.1, "latency_s"),
        ({}, float("inf"), "latency_s"),
    ],
)
async def test_record_rejects_invalid_numbers(
    counts: dict[str, int], latency_s: float, message: str, make_settings: MakeSettings
) -> None:
    async with BatchSession(settings=make_settings()) as session:
        with pytest.raises(ValueError, match=message):
            session.record("gpt-4o", Usage(**counts), latency_s)

    samples = registry_samples(session)
    assert sample(samples, "llm_requests_total", model="gpt-4o") == 0
    assert session.succeeded == 0


async def test_record_failure_counts_error(make_settings: MakeSettings) -> None:
    async with BatchSession(settings=make_settings()) as session:
        session.record_failure("gpt-4o-2024-08-06", "timeout", 30.0)
        session.record_failure(None, "invalid_request", message="line 3: not JSON")
        with pytest.raises(ValueError, match="unknown error type"):
            session.record_failure("gpt-4o", "exploded")

    samples = registry_samples(session)
    errors = "llm_errors_total"
    assert sample(samples, errors, model="gpt-4o", type="timeout") == 1
    assert sample(samples, errors, model="unknown", type="invalid_request") == 1
    assert sample(samples, "llm_requests_total", model="gpt-4o") == 1
    assert sample(samples, "llm_batch_items_total", outcome="failed") == 2


async def test_interval_push_keeps_last_success(
    gateway_url: str, make_settings: MakeSettings
) -> None:
    job = "session-interval"
    async with BatchSession(job=job, pushgateway=gateway_url, settings=make_settings()):
        pass
    previous = sample(
        await read_async(gateway_url), LAST_SUCCESS_METRIC, job=job, instance=""
    )
    group = {"job": job, "instance": ""}

    async with BatchSession(
        job=job, pushgateway=gateway_url, push_interval=0.05, settings=make_settings()
    ) as session:
        await session.ask("Say hello")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            during = await read_async(gateway_url)
            if sample(during, "llm_batch_items_total", outcome="succeeded", **group):
                break
            await asyncio.sleep(0.05)

    assert sample(during, "llm_batch_items_total", outcome="succeeded", **group) == 1
    assert sample(during, LAST_SUCCESS_METRIC, **group) == previous
    assert sample(during, "llm_requests_total", model="gpt-4o-mini", **group) == 1
    after = await read_async(gateway_url)
    assert sample(after, LAST_SUCCESS_METRIC, **group) > previous
    assert session.pusher is not None
    assert session.pusher.attempted >= 2


async def test_session_simulated_without_api_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(sim_ttft=0.0, sim_token_delay=0.0)
    async with BatchSession(settings=settings) as session:
        result = await session.ask("Say hello")

    assert result.prompt_tokens == 8
    assert result.completion_tokens == 20
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "OPENAI_API_KEY is not set" in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pushgateway": "http://127.0.0.1:9091"}, "needs a job name"),
        ({"push_interval": 5.0}, "needs a Pushgateway"),
        (
            {"job": "j", "pushgateway": "http://127.0.0.1:9091", "push_interval": 0.0},
            "invalid --push-interval",
        ),
        ({"job": "j", "pushgateway": "127.0.0.1:9091"}, "invalid Pushgateway URL"),
    ],
)
def test_session_rejects_invalid_push_option(
    options: dict[str, Any], message: str, make_settings: MakeSettings
) -> None:
    with pytest.raises(ConfigError, match=message):
        BatchSession(settings=make_settings(), **options)


async def test_session_used_outside_block(make_settings: MakeSettings) -> None:
    session = BatchSession(settings=make_settings())
    with pytest.raises(RuntimeError, match="async with"):
        await session.ask("Say hello")
    async with session:
        pass
    with pytest.raises(RuntimeError, match="only once"):
        await session.__aenter__()


async def test_ask_rejects_lone_surrogate(make_settings: MakeSettings) -> None:
    async with BatchSession(settings=make_settings()) as session:
        with pytest.raises(ApiError) as raised:
            await session.ask(prompt="Hi \ud800")

    assert raised.value.status == 400
    assert raised.value.error_type == "invalid_request"
    assert "UTF-8" in raised.value.message
    samples = registry_samples(session)
    assert (
        sample(samples, "llm_errors_total", model="gpt-4o-mini", type="upstream_error")
        == 0
    )
    assert (
        sample(samples, "llm_errors_total", model="gpt-4o-mini", type="invalid_request")
        == 1
    )


async def test_record_rejects_empty_model_and_negative_latency(
    make_settings: MakeSettings,
) -> None:
    async with BatchSession(settings=make_settings()) as session:
        with pytest.raises(ValueError, match="model"):
            session.record("", Usage(), 1.0)
        with pytest.raises(ValueError, match="latency_s"):
            session.record_failure("gpt-4o", "timeout", -1.0)

    samples = registry_samples(session)
    assert sample(samples, "llm_requests_total", model="") == 0
    assert sample(samples, "llm_errors_total", model="gpt-4o", type="timeout") == 0
    assert session.failed == 0
