"""Shared fixtures: the simulated upstream on loopback and the service under test."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.typedefs import Handler, Middleware
from prometheus_client.parser import text_string_to_metric_families

from llmwatch.app import create_app
from llmwatch.config import Settings
from llmwatch.simulator import SimulatorConfig, create_simulator_app

# The key the tests pass; any key works against the simulator.
TEST_API_KEY = "sk-test-0123456789abcdef"

AppClient = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[AppClient]]
MakeSimulator = Callable[..., Awaitable[str]]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
# A server-sent event of /ask: its name and its JSON data.
Event = tuple[str, dict[str, Any]]


@pytest.fixture
async def simulator_url(aiohttp_server: Any) -> str:
    """Base URL of a simulated upstream with no simulated latency."""
    app = create_simulator_app(SimulatorConfig(ttft_s=0.0, token_delay_s=0.0))
    server: TestServer = await aiohttp_server(app)
    return str(server.make_url("/v1"))


@pytest.fixture
def make_simulator(aiohttp_server: Any) -> MakeSimulator:
    """Start another simulated upstream and return its base URL.

    Pass ``calls`` to collect the path of every request the simulator receives.
    """

    async def make(
        ttft_s: float = 0.0, token_delay_s: float = 0.0, calls: list[str] | None = None
    ) -> str:
        app = create_simulator_app(
            SimulatorConfig(ttft_s=ttft_s, token_delay_s=token_delay_s)
        )
        if calls is not None:
            app.middlewares.append(_recorder(calls))
        server: TestServer = await aiohttp_server(app)
        return str(server.make_url("/v1"))

    return make


def _recorder(calls: list[str]) -> Middleware:
    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        calls.append(request.path)
        return await handler(request)

    return record


@pytest.fixture
def make_settings(simulator_url: str) -> Callable[..., Settings]:
    """Build settings that call the test simulator, with overrides."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "api_key": TEST_API_KEY,
            "base_url": simulator_url,
            "max_retries": 0,
            "timeout": 5.0,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def make_client(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> MakeClient:
    """Start the service with the given setting overrides and return a client."""

    async def make(**overrides: Any) -> AppClient:
        app = create_app(make_settings(**overrides))
        client: AppClient = await aiohttp_client(
            app, server_kwargs={"handler_cancellation": True}
        )
        return client

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> AppClient:
    """The service on its defaults, calling the test simulator."""
    return await make_client()


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Index an exposition's samples by name and label set."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float],
    name: str,
    **labels: str,
) -> float:
    """Return one sample's value, or 0.0 when the series does not exist."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum the samples named ``name`` whose labels include ``labels``."""
    required = set(labels.items())
    return sum(
        value
        for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and required <= sample_labels
    )


def label_values(samples: Samples, label: str) -> set[str]:
    """Return every value that ``label`` takes in any sample."""
    return {value for _, labels in samples for key, value in labels if key == label}


async def scrape(
    client: AppClient,
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics and parse it with prometheus_client's parser."""
    response = await client.get("/metrics")
    assert response.status == 200
    return parse_metrics(await response.text())


def parse_event(frame: str) -> Event:
    """Split one server-sent event into its name and its JSON data."""
    name = ""
    data = ""
    for line in frame.strip("\n").split("\n"):
        field, _, value = line.partition(": ")
        if field == "event":
            name = value
        elif field == "data":
            data += value
    return name, json.loads(data)


def parse_events(text: str) -> list[Event]:
    """Parse a whole event stream."""
    return [parse_event(frame) for frame in text.split("\n\n") if frame.strip()]
