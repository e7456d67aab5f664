"""POST /ask: response fields, token counts, costs and the served models.

Token counts follow the simulator's rule: a run of ASCII letters or any other
non-space character is 1 token, each message adds 3 and each request adds 3.
Prices are those of config/prices.yaml, in US dollars per 1M tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeClient, MakeSimulator, label_values, sample, scrape

from llmwatch.simulator import count_tokens

# "Hello": 1 token + 3 for the message + 3 for the request.
HELLO_PROMPT_TOKENS = 7
DEFAULT_ANSWER_TOKENS = 20
# A prompt of 1200 words: 1200 + 3 + 3 = 1206 tokens, past the 1024 needed for
# the prompt cache. Cached: 1206 // 128 * 128 = 1152.
LONG_PROMPT = " ".join(["cache"] * 1200)

ANSWER_FIELDS = {
    "model",
    "answer",
    "latency_s",
    "prompt_tokens",
    "completion_tokens",
    "cached_prompt_tokens",
    "reasoning_tokens",
    "cost_usd",
    "finish_reason",
    "upstream_model",
    "request_id",
    "upstream_attempts",
    "time_to_first_token_s",
    "usage_missing",
}


def is_cjk_answer_character(character: str) -> bool:
    """Tell whether a character is a CJK ideograph or the CJK full stop."""
    return "\u4e00" <= character <= "\u9fff" or character == "\u3002"


async def test_ask_prompt(make_client: MakeClient) -> None:
    client = await make_client()

    response = await client.post("/ask", json={"prompt": "Hello"})
    body = await response.json()

    assert response.status == 200
    assert set(body) == ANSWER_FIELDS
    assert body["model"] == "gpt-4o-mini"
    assert body["upstream_model"] == "gpt-4o-mini-2024-07-18"
    assert body["prompt_tokens"] == HELLO_PROMPT_TOKENS
    assert body["completion_tokens"] == DEFAULT_ANSWER_TOKENS
    assert count_tokens(body["answer"]) == DEFAULT_ANSWER_TOKENS
    assert body["cached_prompt_tokens"] == 0
    assert body["reasoning_tokens"] == 0
    assert body["finish_reason"] == "stop"
    assert body["request_id"].startswith("req_")
    assert body["latency_s"] > 0
    assert body["upstream_attempts"] == 1
    assert body["time_to_first_token_s"] is None
    assert body["usage_missing"] is False
    # 7 x $0.15/1M + 20 x $0.60/1M = 0.00001305
    assert body["cost_usd"] == pytest.approx(0.00001305, rel=1e-9)


async def test_ask_messages_with_options(make_client: MakeClient) -> None:
    client = await make_client()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is RAG?"},
    ]

    response = await client.post(
        "/ask",
        json={
            "messages": messages,
            "model": "gpt-4o",
            "temperature": 0.2,
            "max_tokens": 5,
        },
    )
    body = await response.json()

    assert response.status == 200
    assert body["model"] == "gpt-4o"
    assert body["upstream_model"] == "gpt-4o-2024-08-06"
    # (3 + 3) + (4 + 3) + 3 = 16 prompt tokens; max_tokens cuts the answer at 5.
    assert body["prompt_tokens"] == 16
    assert body["completion_tokens"] == 5
    assert count_tokens(body["answer"]) == 5
    assert body["finish_reason"] == "length"
    # 16 x $2.50/1M + 5 x $10.00/1M = 0.00009
    assert body["cost_usd"] == pytest.approx(0.00009, rel=1e-9)


async def test_ask_request_id_from_upstream(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client()

    with caplog.at_level(logging.DEBUG, logger="llmwatch.simulator"):
        first = await (await client.post("/ask", json={"prompt": "Hello"})).json()
        second = await (await client.post("/ask", json={"prompt": "Hello"})).json()
    simulator_lines = [
        r.getMessage() for r in caplog.records if r.name == "llmwatch.simulator"
    ]

    assert first["request_id"].startswith("req_")
    assert first["request_id"] != second["request_id"]
    # The simulator logs the x-request-id it sends with each completion.
    assert any(first["request_id"] in line for line in simulator_lines)
    assert any(second["request_id"] in line for line in simulator_lines)


async def test_ask_cjk_round_trip(make_client: MakeClient) -> None:
    client = await make_client()

    response = await client.post("/ask", json={"prompt": "用三點解釋 RAG"})
    raw = await response.text()
    body = await response.json()

    assert response.status == 200
    # 5 ideographs + "RAG" = 6 tokens, + 3 + 3 = 12; an intact prompt only.
    assert body["prompt_tokens"] == 12
    assert body["completion_tokens"] == DEFAULT_ANSWER_TOKENS
    assert len(body["answer"]) == DEFAULT_ANSWER_TOKENS
    assert all(is_cjk_answer_character(c) for c in body["answer"])
    # The body carries the text as UTF-8, not as \\u escapes.
    assert body["answer"] in raw
    assert response.charset == "utf-8"
    # 12 x $0.15/1M + 20 x $0.60/1M = 0.0000138
    assert body["cost_usd"] == pytest.approx(0.0000138, rel=1e-9)


async def test_cost_cached_prompt(make_client: MakeClient) -> None:
    client = await make_client()

    first = await (await client.post("/ask", json={"prompt": LONG_PROMPT})).json()
    second = await (await client.post("/ask", json={"prompt": LONG_PROMPT})).json()
    samples = await scrape(client)

    assert first["prompt_tokens"] == 1206
    assert first["cached_prompt_tokens"] == 0
    # 1206 x $0.15/1M + 20 x $0.60/1M = 0.0001929
    assert first["cost_usd"] == pytest.approx(0.0001929, rel=1e-9)
    assert second["prompt_tokens"] == 1206
    assert second["cached_prompt_tokens"] == 1152
    # 54 x $0.15/1M + 1152 x $0.075/1M + 20 x $0.60/1M = 0.0001065
    assert second["cost_usd"] == pytest.approx(0.0001065, rel=1e-9)
    labels = {"model": "gpt-4o-mini"}
    # Cached tokens are part of the prompt tokens, not added to them.
    assert sample(samples, "llm_tokens_total", type="prompt", **labels) == 2412
    assert sample(samples, "llm_cached_prompt_tokens_total", **labels) == 1152
    assert sample(samples, "llm_cost_usd_total", **labels) == pytest.approx(
        0.0002994, rel=1e-9
    )


@pytest.mark.parametrize(
    ("model", "expected_cost"),
    [
        # 7 x $1.10/1M + 60 x $4.40/1M = 0.0002717
        pytest.param("o4-mini", 0.0002717, id="o4-mini"),
        # 7 x $1.25/1M + 60 x $10.00/1M = 0.00060875
        pytest.param("gpt-5", 0.00060875, id="gpt-5"),
    ],
)
async def test_cost_reasoning_tokens(
    make_client: MakeClient, model: str, expected_cost: float
) -> None:
    client = await make_client()

    response = await client.post("/ask", json={"prompt": "Hello", "model": model})
    body = await response.json()
    samples = await scrape(client)

    assert response.status == 200
    # 20 answer tokens and 2 reasoning tokens per answer token: 20 + 40.
    assert body["reasoning_tokens"] == 40
    assert body["completion_tokens"] == 60
    assert count_tokens(body["answer"]) == DEFAULT_ANSWER_TOKENS
    assert body["cost_usd"] == pytest.approx(expected_cost, rel=1e-9)
    assert sample(samples, "llm_reasoning_tokens_total", model=model) == 40
    assert sample(samples, "llm_tokens_total", model=model, type="completion") == 60
    assert sample(samples, "llm_cost_usd_total", model=model) == pytest.approx(
        expected_cost, rel=1e-9
    )


async def test_cost_unpriced_model(
    make_client: MakeClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text(
        "models:\n  gpt-4o:\n    input: 2.50\n    cached_input: 1.25\n"
        "    output: 10.00\n",
        encoding="utf-8",
    )
    client = await make_client(prices_file=prices, extra_models=("gpt-4o-mini",))

    with caplog.at_level(logging.WARNING):
        response = await client.post("/ask", json={"prompt": "Hello"})
        repeat = await client.post("/ask", json={"prompt": "Hello"})
    body = await response.json()
    samples = await scrape(client)

    assert response.status == 200
    assert repeat.status == 200
    assert body["model"] == "gpt-4o-mini"
    assert body["cost_usd"] is None
    assert body["prompt_tokens"] == HELLO_PROMPT_TOKENS
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "gpt-4o-mini" in warnings[0]
    assert "price" in warnings[0]
    # The repeat is counted but not logged again at WARNING.
    assert sample(samples, "llm_unpriced_requests_total", model="gpt-4o-mini") == 2
    assert sample(samples, "llm_requests_total", model="gpt-4o-mini") == 2
    # An unknown cost is no cost series at all, never $0.
    cost_series = [labels for name, labels in samples if name == "llm_cost_usd_total"]
    assert frozenset({("model", "gpt-4o-mini")}) not in cost_series


async def test_usage_missing(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client()

    with caplog.at_level(logging.WARNING):
        response = await client.post("/ask", json={"prompt": "Hi #fault=no_usage"})
    body = await response.json()
    samples = await scrape(client)

    assert response.status == 200
    assert body["usage_missing"] is True
    assert body["prompt_tokens"] == 0
    assert body["completion_tokens"] == 0
    assert body["cost_usd"] == 0
    assert count_tokens(body["answer"]) == DEFAULT_ANSWER_TOKENS
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "usage" in warnings[0]
    labels = {"model": "gpt-4o-mini"}
    assert sample(samples, "llm_usage_missing_total", **labels) == 1
    assert sample(samples, "llm_requests_total", **labels) == 1
    assert sample(samples, "llm_tokens_total", type="prompt", **labels) == 0
    assert sum(v for (n, _), v in samples.items() if n == "llm_errors_total") == 0


@pytest.mark.parametrize(
    "model", ["gpt-3.5-turbo", "gpt-4o-minix", "gpt-4o-mini-foo", "GPT-4O-MINI"]
)
async def test_model_not_served(
    make_client: MakeClient, make_simulator: MakeSimulator, model: str
) -> None:
    calls: list[str] = []
    client = await make_client(base_url=await make_simulator(calls=calls))

    response = await client.post("/ask", json={"prompt": "Hello", "model": model})
    error = (await response.json())["error"]
    samples = await scrape(client)

    assert response.status == 400
    assert error["type"] == "invalid_request"
    assert error["field"] == "model"
    assert repr(model) in error["message"]
    assert "gpt-4o-mini, " in error["message"]
    assert "o4-mini" in error["message"]
    assert "LLMWATCH_EXTRA_MODELS" in error["message"]
    assert "LLMWATCH_PRICES_FILE" in error["message"]
    assert calls == []
    assert model not in label_values(samples, "model")
    assert sample(samples, "llm_requests_total", model="unknown") == 1
    assert (
        sample(samples, "llm_errors_total", model="unknown", type="invalid_request")
        == 1
    )
    assert sample(samples, "llm_requests_total", model="gpt-4o-mini") == 0


async def test_model_extra_is_served(
    make_client: MakeClient, make_simulator: MakeSimulator
) -> None:
    calls: list[str] = []
    base_url = await make_simulator(calls=calls)
    client = await make_client(base_url=base_url, extra_models=("gpt-4.1-nano",))

    served = await client.post(
        "/ask", json={"prompt": "Hello", "model": "gpt-4.1-nano"}
    )
    rejected = await client.post("/ask", json={"prompt": "Hello", "model": "o9"})
    rejected_error = (await rejected.json())["error"]

    assert served.status == 200
    assert calls == ["/v1/chat/completions"]
    assert rejected.status == 400
    # The allowed set is the price table plus the extra models.
    assert "gpt-4.1-nano" in rejected_error["message"]
    assert "gpt-5-nano" in rejected_error["message"]


@pytest.mark.parametrize(
    ("snapshot", "base", "expected_cost"),
    [
        # 7 x $0.15/1M + 20 x $0.60/1M = 0.00001305
        pytest.param("gpt-4o-mini-2024-07-18", "gpt-4o-mini", 0.00001305, id="mini"),
        # 7 x $2.50/1M + 20 x $10.00/1M = 0.0002175
        pytest.param("gpt-4o-2024-08-06", "gpt-4o", 0.0002175, id="4o"),
    ],
)
async def test_model_snapshot_uses_base_name(
    make_client: MakeClient, snapshot: str, base: str, expected_cost: float
) -> None:
    client = await make_client()

    response = await client.post("/ask", json={"prompt": "Hello", "model": snapshot})
    body: dict[str, Any] = await response.json()
    samples = await scrape(client)

    assert response.status == 200
    assert body["model"] == base
    assert body["upstream_model"] == snapshot
    assert body["cost_usd"] == pytest.approx(expected_cost, rel=1e-9)
    assert sample(samples, "llm_requests_total", model=base) == 1
    assert snapshot not in label_values(samples, "model")


async def test_snapshot_with_own_price(make_client: MakeClient) -> None:
    client = await make_client()

    response = await client.post(
        "/ask", json={"prompt": "Hi", "model": "gpt-4o-2024-05-13"}
    )
    body = await response.json()
    samples = await scrape(client)

    assert response.status == 200
    assert body["model"] == "gpt-4o"
    assert body["prompt_tokens"] == 7
    assert body["completion_tokens"] == 20
    # This snapshot has its own entry: 7 x $5/1M + 20 x $15/1M, not gpt-4o's
    # $2.50 and $10.
    assert body["cost_usd"] == pytest.approx(0.000335)
    assert sample(samples, "llm_cost_usd_total", model="gpt-4o") == pytest.approx(
        0.000335
    )
    assert "gpt-4o-2024-05-13" not in label_values(samples, "model")
