"""The routes beside /ask: liveness and the API documentation."""

from __future__ import annotations

import logging

import pytest
from conftest import AppClient, MakeClient, MakeSimulator

from llmwatch import __version__


async def test_healthz(client: AppClient, simulator_url: str) -> None:
    response = await client.get("/healthz")
    body = await response.json()

    assert response.status == 200
    assert body == {
        "status": "ok",
        "upstream": "openai-compatible",
        "base_url": simulator_url,
        "version": __version__,
    }


async def test_base_url_without_key(
    make_client: MakeClient,
    make_simulator: MakeSimulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []
    base_url = await make_simulator(calls=calls)
    caplog.set_level(logging.INFO)

    client = await make_client(api_key=None, base_url=base_url)
    health = await (await client.get("/healthz")).json()
    response = await client.post("/ask", json={"prompt": "Hello"})

    assert response.status == 200
    assert health["upstream"] == "openai-compatible"
    assert health["base_url"] == base_url
    assert calls == ["/v1/chat/completions"]
    assert f"calling {base_url} without a key" in caplog.text
    assert "simulated upstream" not in caplog.text


async def test_docs_page(client: AppClient) -> None:
    response = await client.get("/api/docs")
    html = await response.text()

    assert response.status == 200
    assert response.content_type == "text/html"
    assert "swagger-ui" in html
    assert "/api/docs/swagger.json" in html


async def test_docs_spec_lists_ask(client: AppClient) -> None:
    response = await client.get("/api/docs/swagger.json")
    spec = await response.json()

    assert response.status == 200
    operation = spec["paths"]["/ask"]["post"]
    body_schema = operation["parameters"][0]["schema"]
    assert body_schema == {"$ref": "#/definitions/AskRequest"}
    request = spec["definitions"]["AskRequest"]
    assert request["additionalProperties"] is False
    assert request["properties"]["messages"]["type"] == "array"
    assert request["properties"]["prompt"]["type"] == "string"
    assert request["properties"]["temperature"]["type"] == "number"
    assert request["properties"]["max_tokens"]["type"] == "integer"
    assert request["properties"]["stream"]["type"] == "boolean"
    answer = spec["definitions"]["AskResponse"]["properties"]
    assert {"cost_usd", "latency_s", "prompt_tokens", "request_id"} <= set(answer)
    for status in ("200", "400", "413", "415", "422", "429", "502", "504"):
        assert status in operation["responses"], status
    assert "/metrics" in spec["paths"]
    assert "/healthz" in spec["paths"]
