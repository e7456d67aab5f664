"""The OpenAI client wrapper: request arguments and rate-limit headers."""

from __future__ import annotations

import pytest
from conftest import MakeClient

from llmwatch.upstream import ChatRequest, RateLimits, is_reasoning_model

MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("model", "reasoning"),
    [
        ("o1", True),
        ("o3-mini", True),
        ("o4-mini-2025-04-16", True),
        ("gpt-5", True),
        ("gpt-5-nano", True),
        ("gpt-4o-mini", False),
        ("gpt-4.1", False),
        ("gpt-50", False),
        ("omni", False),
    ],
)
def test_is_reasoning_model(model: str, reasoning: bool) -> None:
    assert is_reasoning_model(model) is reasoning


def test_max_tokens_argument_by_model() -> None:
    chat = ChatRequest("gpt-4o-mini", MESSAGES, temperature=0.5, max_tokens=7)
    reasoning = ChatRequest("o4-mini", MESSAGES, max_tokens=7)

    assert chat.create_arguments() == {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "temperature": 0.5,
        "max_tokens": 7,
    }
    assert reasoning.create_arguments() == {
        "model": "o4-mini",
        "messages": MESSAGES,
        "max_completion_tokens": 7,
    }


async def test_reasoning_model_max_tokens(make_client: MakeClient) -> None:
    client = await make_client()

    response = await client.post(
        "/ask", json={"prompt": "Hi", "model": "o4-mini", "max_tokens": 5}
    )
    body = await response.json()

    assert response.status == 200
    assert body["finish_reason"] == "length"
    # The limit cuts the visible answer to 5 tokens; the simulator adds twice
    # as many reasoning tokens on top.
    assert body["completion_tokens"] == 15
    assert body["reasoning_tokens"] == 10


def test_rate_limits_from_headers() -> None:
    limits = RateLimits.from_headers(
        {
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-remaining-requests": "9999",
            "x-ratelimit-limit-tokens": "2000000",
            "x-ratelimit-remaining-tokens": "not-a-number",
        }
    )

    assert limits.limit == {"requests": 10000, "tokens": 2000000}
    assert limits.remaining == {"requests": 9999}
