"""Tests of the simulated upstream through the real openai client over loopback.

Expected token counts are worked out by hand from the rule in count_tokens:
a run of ASCII letters is 1 token, every other non-whitespace character is 1,
each message adds 3 and the prompt adds 3.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam
from pytest_aiohttp import AiohttpClient, AiohttpServer

from llmwatch.simtext import build_answer
from llmwatch.simulator import (
    MODEL_SNAPSHOTS,
    OLDER_SNAPSHOTS,
    SimulatorConfig,
    count_tokens,
    create_simulator_app,
)

FAST = SimulatorConfig(ttft_s=0.0, token_delay_s=0.0)
# "Hello, world!" is 4 tokens, so its prompt is 4 + 3 + 3 = 10 tokens.
HELLO = "Hello, world!"
HELLO_PROMPT_TOKENS = 10

MakeOpenAI = Callable[..., Awaitable[openai.AsyncOpenAI]]


def user(text: str) -> ChatCompletionMessageParam:
    return {"role": "user", "content": text}


def open_client(
    base_url: str, *, max_retries: int = 0, timeout: float = 10.0
) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key="sk-test",
        base_url=base_url,
        max_retries=max_retries,
        timeout=timeout,
        http_client=openai.DefaultAioHttpClient(),
    )


@pytest.fixture
async def make_openai(aiohttp_server: AiohttpServer) -> AsyncIterator[MakeOpenAI]:
    """Start a simulator with the given config and return a client for it."""
    clients: list[openai.AsyncOpenAI] = []

    async def make(
        config: SimulatorConfig = FAST, *, max_retries: int = 0, timeout_s: float = 10.0
    ) -> openai.AsyncOpenAI:
        server = await aiohttp_server(create_simulator_app(config))
        client = open_client(
            str(server.make_url("/v1")), max_retries=max_retries, timeout=timeout_s
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def collect(
    stream: openai.AsyncStream[ChatCompletionChunk],
) -> list[ChatCompletionChunk]:
    return [chunk async for chunk in stream]


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        pytest.param("", 0, id="empty"),
        pytest.param(" \t\n\u3000", 0, id="whitespace"),
        pytest.param(HELLO, 4, id="words-and-punctuation"),
        pytest.param("2024", 4, id="digits"),
        pytest.param("abc123def", 5, id="letters-around-digits"),
        pytest.param("naïve", 3, id="non-ascii-letter-splits-run"),
        pytest.param("你好。", 3, id="cjk"),
        pytest.param("👍 ok", 2, id="emoji"),
        pytest.param("#fault=rate_limit", 6, id="directive"),
    ],
)
def test_count_tokens_rule(text: str, tokens: int) -> None:
    assert count_tokens(text) == tokens


@pytest.mark.parametrize("chinese", [False, True])
def test_build_answer_one_token_per_piece(chinese: bool) -> None:
    for length in range(30):
        pieces = build_answer(b"seed", length, chinese=chinese)
        assert len(pieces) == length
        assert all(count_tokens(piece) == 1 for piece in pieces)
        assert count_tokens("".join(pieces)) == length


def test_config_rejects_invalid_values() -> None:
    with pytest.raises(ValueError, match="ttft_s"):
        SimulatorConfig(ttft_s=-1.0)
    with pytest.raises(ValueError, match="requests_per_minute"):
        SimulatorConfig(requests_per_minute=0)


async def test_completion_usage_counted(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    started = time.time()
    completion = await client.chat.completions.create(
        model="gpt-4o",
        messages=[
            {"role": "system", "content": "You are terse."},
            user("Hello, world! 42"),
        ],
        temperature=0.2,
    )

    # System: You, are, terse, "." = 4 + 3. User: Hello, ",", world, "!", 4, 2
    # = 6 + 3. Prompt: 7 + 9 + 3.
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == 19
    assert usage.completion_tokens == 20
    assert usage.total_tokens == 39
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 0

    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-2024-08-06"
    assert completion.system_fingerprint is not None
    assert completion.system_fingerprint.startswith("fp_")
    assert started - 1 <= completion.created <= time.time() + 1
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content is not None
    assert count_tokens(choice.message.content) == 20


async def test_prompt_of_several_messages(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    completion = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "Be brief."},
            user("Hi"),
            {"role": "assistant", "content": "Hello!"},
            user("Bye 2"),
        ],
    )

    # 3 + 3, 1 + 3, 2 + 3, 2 + 3, plus 3.
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 23


async def test_content_parts_count_text_only(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    completion = await client.chat.completions.create(
        model="gpt-4o",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Hello there"},
                    {"type": "text", "text": "again"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,AAAA"},
                    },
                ],
            }
        ],
    )

    # Each text part counts on its own: 2 + 1, then + 3 + 3.
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 9


async def test_answer_is_deterministic(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    first = await client.chat.completions.create(model="gpt-4o", messages=[user("A")])
    again = await client.chat.completions.create(model="gpt-4o", messages=[user("A")])
    other = await client.chat.completions.create(model="gpt-4o", messages=[user("B")])

    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content


async def test_max_tokens_cuts_answer(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    full = await client.chat.completions.create(model="gpt-4o", messages=[user(HELLO)])
    cut = await client.chat.completions.create(
        model="gpt-4o", messages=[user(HELLO)], max_tokens=5
    )
    cut_new_name = await client.chat.completions.create(
        model="gpt-4o", messages=[user(HELLO)], max_completion_tokens=7
    )

    full_text = full.choices[0].message.content
    cut_text = cut.choices[0].message.content
    assert full_text is not None
    assert cut_text is not None
    assert full_text.startswith(cut_text)
    assert count_tokens(cut_text) == 5
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage is not None
    assert cut.usage.completion_tokens == 5
    assert cut_new_name.choices[0].finish_reason == "length"
    assert cut_new_name.usage is not None
    assert cut_new_name.usage.completion_tokens == 7


async def test_answer_tokens_directive(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    short = await client.chat.completions.create(
        model="gpt-4o", messages=[user("#answer_tokens=3 Hi")]
    )
    cut = await client.chat.completions.create(
        model="gpt-4o", messages=[user("#answer_tokens=3 Hi")], max_tokens=2
    )
    empty = await client.chat.completions.create(
        model="gpt-4o", messages=[user("#answer_tokens=0")]
    )

    # "#", answer, "_", tokens, "=", "3", Hi = 7 tokens, + 3 + 3.
    assert short.usage is not None
    assert short.usage.prompt_tokens == 13
    assert short.usage.completion_tokens == 3
    assert short.choices[0].finish_reason == "stop"
    assert cut.usage is not None
    assert cut.usage.completion_tokens == 2
    assert cut.choices[0].finish_reason == "length"
    assert empty.choices[0].message.content == ""
    assert empty.usage is not None
    assert empty.usage.completion_tokens == 0
    assert empty.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("requested", "snapshot"),
    [
        ("gpt-4o", "gpt-4o-2024-08-06"),
        ("gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
        ("gpt-4.1", "gpt-4.1-2025-04-14"),
        ("gpt-4.1-mini", "gpt-4.1-mini-2025-04-14"),
        ("gpt-4.1-nano", "gpt-4.1-nano-2025-04-14"),
        ("o1", "o1-2024-12-17"),
        ("o3", "o3-2025-04-16"),
        ("o3-mini", "o3-mini-2025-01-31"),
        ("o4-mini", "o4-mini-2025-04-16"),
        ("gpt-5", "gpt-5-2025-08-07"),
        ("gpt-5-mini", "gpt-5-mini-2025-08-07"),
        ("gpt-5-nano", "gpt-5-nano-2025-08-07"),
        ("o4-mini-2025-04-16", "o4-mini-2025-04-16"),
        ("gpt-4o-2024-08-06", "gpt-4o-2024-08-06"),
    ],
)
async def test_response_names_snapshot(
    make_openai: MakeOpenAI, requested: str, snapshot: str
) -> None:
    client = await make_openai()
    completion = await client.chat.completions.create(
        model=requested, messages=[user(HELLO)]
    )
    assert completion.model == snapshot


async def test_unknown_model_not_found(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="gpt-9", messages=[user(HELLO)])
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert caught.value.type == "invalid_request_error"
    assert "gpt-9" in caught.value.message


async def test_empty_messages_rejected(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=[])
    assert caught.value.status_code == 400
    assert caught.value.param == "messages"
    assert caught.value.code == "empty_array"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        pytest.param(
            {"messages": [{"role": "user", "content": "Hi"}]},
            "model",
            "missing_required_parameter",
            id="no-model",
        ),
        pytest.param(
            {"model": "gpt-4o"}, "messages", "missing_required_parameter", id="no-msgs"
        ),
        pytest.param(
            {"model": "gpt-4o", "messages": []}, "messages", "empty_array", id="empty"
        ),
        pytest.param(
            {"model": "gpt-4o", "messages": [{"role": "bot", "content": "Hi"}]},
            "messages[0].role",
            "invalid_value",
            id="bad-role",
        ),
        pytest.param(
            {"model": "gpt-4o", "messages": [{"role": "user"}]},
            "messages[0].content",
            "missing_required_parameter",
            id="no-content",
        ),
        pytest.param(
            {
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 0,
            },
            "max_tokens",
            "integer_below_min_value",
            id="max-tokens-zero",
        ),
        pytest.param(
            {
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": "Hi"}],
                "temperature": 3,
            },
            "temperature",
            "decimal_above_max_value",
            id="temperature-too-high",
        ),
        pytest.param(
            {
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": "Hi"}],
                "stream_options": {"include_usage": True},
            },
            "stream_options",
            "invalid_value",
            id="stream-options-without-stream",
        ),
        pytest.param(
            {
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": "Hi"}],
                "n": 2,
            },
            "n",
            "unsupported_parameter",
            id="several-choices",
        ),
    ],
)
async def test_invalid_request_error_body(
    aiohttp_client: AiohttpClient, body: dict[str, Any], param: str, code: str
) -> None:
    client = await aiohttp_client(create_simulator_app(FAST))
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status == 400
    error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == code
    assert error["message"]
    assert re.fullmatch(r"req_[0-9a-f]{32}", response.headers["x-request-id"])


async def test_body_not_json_rejected(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_simulator_app(FAST))
    response = await client.post(
        "/v1/chat/completions",
        data="{not json",
        headers={"content-type": "application/json"},
    )
    assert response.status == 400
    error = (await response.json())["error"]
    assert "JSON" in error["message"]
    assert error["type"] == "invalid_request_error"


async def test_request_without_key_answered(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_simulator_app(FAST))
    response = await client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": HELLO}]},
    )
    assert response.status == 200
    assert (await response.json())["usage"]["prompt_tokens"] == HELLO_PROMPT_TOKENS


async def test_unknown_route_not_found(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_simulator_app(FAST))
    response = await client.post("/v1/embeddings", json={})
    assert response.status == 404
    error = (await response.json())["error"]
    assert error["message"] == "Invalid URL (POST /v1/embeddings)"
    assert error["type"] == "invalid_request_error"


async def test_models_listed_and_retrieved(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    page = await client.models.list()
    model = await client.models.retrieve("o3-mini")

    ids = {entry.id for entry in page.data}
    assert ids == set(MODEL_SNAPSHOTS) | set(MODEL_SNAPSHOTS.values()) | set(
        OLDER_SNAPSHOTS
    )
    assert len(page.data) == 25
    assert all(entry.object == "model" for entry in page.data)
    assert all(entry.owned_by == "system" for entry in page.data)
    assert model.id == "o3-mini"
    # o3-mini-2025-01-31 at midnight UTC.
    assert model.created == 1738281600
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-9")


async def test_stream_chunk_order_with_usage(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=[user(HELLO)],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = await collect(stream)

    # 20 token chunks, the finish chunk, the usage chunk.
    assert len(chunks) == 22
    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    assert chunks[0].id.startswith("chatcmpl-")
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert all(chunk.model == "gpt-4o-2024-08-06" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.choices[0].delta.role is None for chunk in chunks[1:21])
    token_chunks = chunks[:20]
    assert all(
        count_tokens(chunk.choices[0].delta.content or "") == 1
        for chunk in token_chunks
    )
    assert all(chunk.choices[0].finish_reason is None for chunk in token_chunks)
    assert all(chunk.usage is None for chunk in chunks[:21])

    finish = chunks[20]
    assert finish.choices[0].finish_reason == "stop"
    assert finish.choices[0].delta.content is None

    last = chunks[21]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == HELLO_PROMPT_TOKENS
    assert last.usage.completion_tokens == 20
    assert last.usage.total_tokens == 30


async def test_stream_without_include_usage(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=[user(HELLO)], stream=True, max_tokens=4
    )
    chunks = await collect(stream)

    assert len(chunks) == 5
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_stream_matches_completion(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    completion = await client.chat.completions.create(
        model="gpt-4.1", messages=[user(HELLO)]
    )
    stream = await client.chat.completions.create(
        model="gpt-4.1", messages=[user(HELLO)], stream=True
    )
    chunks = await collect(stream)

    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert streamed == completion.choices[0].message.content


async def test_empty_stream_sends_role(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=[user("#answer_tokens=0")], stream=True
    )
    chunks = await collect(stream)

    assert len(chunks) == 2
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert chunks[1].choices[0].finish_reason == "stop"


async def test_stream_ends_with_done(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_simulator_app(FAST))
    response = await client.post(
        "/v1/chat/completions",
        json={
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "#answer_tokens=2"}],
            "stream": True,
        },
    )
    text = await response.text()

    assert response.status == 200
    assert response.content_type == "text/event-stream"
    events = text.split("\n\n")
    # Two token chunks, the finish chunk, [DONE], and the empty tail.
    assert len(events) == 5
    assert events[-2] == "data: [DONE]"
    assert events[-1] == ""


async def test_reasoning_tokens_o4_mini(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    completion = await client.chat.completions.create(
        model="o4-mini", messages=[user(HELLO)]
    )
    cut = await client.chat.completions.create(
        model="o4-mini", messages=[user(HELLO)], max_completion_tokens=5
    )
    stream = await client.chat.completions.create(
        model="o4-mini",
        messages=[user(HELLO)],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = await collect(stream)

    usage = completion.usage
    assert usage is not None
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 40
    assert usage.completion_tokens == 60
    assert usage.total_tokens == HELLO_PROMPT_TOKENS + 60
    assert completion.choices[0].message.content is not None
    assert count_tokens(completion.choices[0].message.content) == 20

    assert cut.usage is not None
    assert cut.usage.completion_tokens_details is not None
    assert cut.usage.completion_tokens_details.reasoning_tokens == 10
    assert cut.usage.completion_tokens == 15

    streamed_usage = chunks[-1].usage
    assert streamed_usage is not None
    assert streamed_usage.completion_tokens_details is not None
    assert streamed_usage.completion_tokens_details.reasoning_tokens == 40
    assert streamed_usage.completion_tokens == 60


@pytest.mark.parametrize(
    ("words", "prompt_tokens", "cached_tokens"),
    [
        pytest.param(1017, 1023, 0, id="below-1024"),
        pytest.param(1018, 1024, 1024, id="exactly-1024"),
        pytest.param(1300, 1306, 1280, id="rounded-down-to-128"),
    ],
)
async def test_prompt_cached_on_repeat(
    make_openai: MakeOpenAI, words: int, prompt_tokens: int, cached_tokens: int
) -> None:
    client = await make_openai()
    messages = [user("word " * words)]
    first = await client.chat.completions.create(model="gpt-4o", messages=messages)
    second = await client.chat.completions.create(model="gpt-4o", messages=messages)
    other = await client.chat.completions.create(
        model="gpt-4o", messages=[user("other " * words)]
    )

    for completion, cached in ((first, 0), (second, cached_tokens), (other, 0)):
        usage = completion.usage
        assert usage is not None
        assert usage.prompt_tokens == prompt_tokens
        assert usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens == cached


async def test_prompt_cache_per_model(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    messages = [user("word " * 1100)]

    await client.chat.completions.create(model="o4-mini", messages=messages)
    other_model = await client.chat.completions.create(
        model="gpt-4o-mini", messages=messages
    )
    snapshot = await client.chat.completions.create(
        model="o4-mini-2025-04-16", messages=messages
    )

    assert other_model.usage is not None
    assert other_model.usage.prompt_tokens_details is not None
    assert other_model.usage.prompt_tokens_details.cached_tokens == 0
    # A snapshot shares its base model's cache: 1106 // 128 * 128 = 1024.
    assert snapshot.usage is not None
    assert snapshot.usage.prompt_tokens_details is not None
    assert snapshot.usage.prompt_tokens_details.cached_tokens == 1024


async def test_cjk_prompt_gets_chinese(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    completion = await client.chat.completions.create(
        model="gpt-4o", messages=[user("请用中文回答。")]
    )
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=[user("请用中文回答。")], stream=True
    )
    chunks = await collect(stream)

    # 7 characters, + 3 + 3.
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 13
    text = completion.choices[0].message.content
    assert text is not None
    assert len(text) == 20
    assert re.fullmatch(r"[\u4e00-\u9fff。]+", text)
    assert text.endswith("。")
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert streamed == text


async def test_headers_count_down(make_openai: MakeOpenAI) -> None:
    config = SimulatorConfig(
        ttft_s=0.0, token_delay_s=0.0, requests_per_minute=5, tokens_per_minute=1000
    )
    client = await make_openai(config)
    first = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[user(HELLO)]
    )
    second = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[user(HELLO)]
    )

    assert re.fullmatch(r"req_[0-9a-f]{32}", first.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    assert int(first.headers["openai-processing-ms"]) >= 0
    for response in (first, second):
        assert response.headers["x-ratelimit-limit-requests"] == "5"
        assert response.headers["x-ratelimit-limit-tokens"] == "1000"
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
            assert re.fullmatch(r"\d+ms|\d+(\.\d+)?s|1m0s", response.headers[name])
    # Each request uses 10 prompt and 20 completion tokens.
    assert first.headers["x-ratelimit-remaining-requests"] == "4"
    assert first.headers["x-ratelimit-remaining-tokens"] == "970"
    assert second.headers["x-ratelimit-remaining-requests"] == "3"
    assert second.headers["x-ratelimit-remaining-tokens"] == "940"


async def test_request_limit_enforced(make_openai: MakeOpenAI) -> None:
    config = SimulatorConfig(ttft_s=0.0, token_delay_s=0.0, requests_per_minute=2)
    client = await make_openai(config)
    for _ in range(2):
        await client.chat.completions.create(model="gpt-4o", messages=[user(HELLO)])
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=[user(HELLO)])

    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.type == "requests"
    headers = caught.value.response.headers
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(headers["retry-after"]) <= 60


async def test_token_limit_enforced(make_openai: MakeOpenAI) -> None:
    config = SimulatorConfig(ttft_s=0.0, token_delay_s=0.0, tokens_per_minute=40)
    client = await make_openai(config)
    # 30 tokens fit, and the next 30 do not fit in the 10 left.
    await client.chat.completions.create(model="gpt-4o", messages=[user(HELLO)])
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=[user(HELLO)])

    assert caught.value.type == "tokens"
    assert caught.value.response.headers["x-ratelimit-remaining-tokens"] == "10"


async def test_fault_rate_limit(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(
            model="gpt-4o", messages=[user("Hi #fault=rate_limit")]
        )

    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    headers = caught.value.response.headers
    assert headers["retry-after"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-limit-requests"] == "10000"
    assert re.fullmatch(r"req_[0-9a-f]{32}", headers["x-request-id"])


@pytest.mark.parametrize(
    ("fault", "status"), [("server_error", 500), ("unavailable", 503)]
)
async def test_fault_server_errors(
    make_openai: MakeOpenAI, fault: str, status: int
) -> None:
    client = await make_openai()
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(
            model="gpt-4o", messages=[user(f"#fault={fault}")]
        )
    with pytest.raises(openai.InternalServerError) as caught_streamed:
        await client.chat.completions.create(
            model="gpt-4o", messages=[user(f"#fault={fault}")], stream=True
        )

    for error in (caught.value, caught_streamed.value):
        assert error.status_code == status
        assert error.type == "server_error"
        assert error.message


async def test_fault_from_header(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(
            model="gpt-4o",
            messages=[user(HELLO)],
            extra_headers={"x-simulator-fault": "unavailable"},
        )
    assert caught.value.status_code == 503


async def test_fault_malformed(
    make_openai: MakeOpenAI, aiohttp_client: AiohttpClient
) -> None:
    client = await make_openai()
    with pytest.raises(json.JSONDecodeError):
        await client.chat.completions.create(
            model="gpt-4o", messages=[user("#fault=malformed")]
        )
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=[user("#fault=malformed")], stream=True
    )
    with pytest.raises(json.JSONDecodeError):
        await collect(stream)

    raw_client = await aiohttp_client(create_simulator_app(FAST))
    response = await raw_client.post(
        "/v1/chat/completions",
        json={
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "#fault=malformed"}],
        },
    )
    assert response.status == 200
    assert response.content_type == "application/json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(await response.text())


async def test_fault_drop_completion(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(
            model="gpt-4o", messages=[user("#fault=drop")]
        )


async def test_fault_drop_stream(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=[user("#fault=drop")],
        stream=True,
        stream_options={"include_usage": True},
    )
    received: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk)

    assert len(received) == 3
    assert received[0].choices[0].delta.role == "assistant"
    assert all(chunk.choices[0].finish_reason is None for chunk in received)


async def test_fault_no_usage(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    completion = await client.chat.completions.create(
        model="gpt-4o", messages=[user("#fault=no_usage")]
    )
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=[user("#fault=no_usage")],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = await collect(stream)

    assert completion.usage is None
    assert completion.choices[0].message.content
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_fault_hang_times_out(make_openai: MakeOpenAI) -> None:
    client = await make_openai(timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(
            model="gpt-4o", messages=[user("#fault=hang")]
        )
    assert time.monotonic() - started >= 0.3


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve ``app`` the way llmwatch does, with aiohttp's default runner."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/v1"


async def test_hang_ends_when_client_leaves(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    runner, base_url = await serve(create_simulator_app(FAST))
    client = open_client(base_url, timeout=0.2)
    try:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(
                model="gpt-4o", messages=[user("#fault=hang")]
            )
        # aiohttp writes the access log line once the handler has returned.
        for _ in range(40):
            if any('" 499 ' in record.getMessage() for record in caplog.records):
                break
            await asyncio.sleep(0.05)
        assert any('" 499 ' in record.getMessage() for record in caplog.records)
    finally:
        await client.close()
        await runner.cleanup()


async def test_hang_does_not_block_shutdown() -> None:
    runner, base_url = await serve(create_simulator_app(FAST))
    client = open_client(base_url, timeout=30.0)
    try:
        request = asyncio.create_task(
            client.chat.completions.create(
                model="gpt-4o", messages=[user("#fault=hang")]
            )
        )
        await asyncio.sleep(0.2)
        assert not request.done()

        started = time.monotonic()
        await runner.cleanup()
        assert time.monotonic() - started < 5
        with pytest.raises(openai.APIConnectionError):
            await request
    finally:
        await client.close()


async def test_times_lets_retries_succeed(make_openai: MakeOpenAI) -> None:
    client = await make_openai(max_retries=2)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[user("#fault=server_error #times=2 Hello")]
    )
    completion = raw.parse()

    assert raw.retries_taken == 2
    # "#", fault, "=", server, "_", error is 6 tokens, "#", times, "=", "2" is 4
    # and Hello is 1, so the prompt is 11 + 3 + 3.
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 17


async def test_times_counts_per_messages(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    messages = [user("#fault=rate_limit #times=1 ping")]
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o", messages=messages)
    second = await client.chat.completions.create(model="gpt-4o", messages=messages)
    other = [user("#fault=rate_limit #times=1 pong")]
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o", messages=other)

    assert second.choices[0].finish_reason == "stop"


async def test_drop_retried_after_times(make_openai: MakeOpenAI) -> None:
    client = await make_openai(max_retries=1)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[user("#fault=drop #times=1")]
    )
    assert raw.retries_taken == 1
    assert raw.parse().choices[0].finish_reason == "stop"


async def test_delay_directive(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    started = time.monotonic()
    completion = await client.chat.completions.create(
        model="gpt-4o", messages=[user("#delay=0.3 Hi")]
    )
    elapsed = time.monotonic() - started

    assert 0.3 <= elapsed < 3
    # "#", delay, "=", "0", ".", "3", Hi = 7, + 3 + 3.
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 13


async def test_completion_waits_for_all_tokens(make_openai: MakeOpenAI) -> None:
    client = await make_openai(SimulatorConfig(ttft_s=0.1, token_delay_s=0.02))
    started = time.monotonic()
    await client.chat.completions.create(
        model="gpt-4o", messages=[user("#answer_tokens=10")]
    )
    # 0.1 s + 10 * 0.02 s.
    assert time.monotonic() - started >= 0.29


async def test_stream_chunks_spaced(make_openai: MakeOpenAI) -> None:
    client = await make_openai(SimulatorConfig(ttft_s=0.0, token_delay_s=0.05))
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=[user("#answer_tokens=10")], stream=True
    )
    arrivals = [time.monotonic() async for _ in stream]

    # 10 token chunks 0.05 s apart take 0.45 s from the first to the last.
    # The bound of 0.3 s leaves room for a slow machine.
    assert len(arrivals) == 11
    assert arrivals[-1] - arrivals[0] >= 0.3


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        pytest.param("#fault=bogus", ["#fault", "rate_limit", "no_usage"], id="fault"),
        pytest.param("#fault=hang #times=0", ["#times", "whole number"], id="times"),
        pytest.param("#delay=soon", ["#delay", "seconds"], id="delay"),
        pytest.param("#answer_tokens=-1", ["#answer_tokens", "0 to"], id="answer"),
        pytest.param("#times=2", ["#times=2", "#fault"], id="times-without-fault"),
        pytest.param("#delay=1 #delay=2", ["#delay", "more than once"], id="twice"),
    ],
)
async def test_invalid_directive_rejected(
    make_openai: MakeOpenAI, prompt: str, expected: list[str]
) -> None:
    client = await make_openai()
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=[user(prompt)])
    for text in expected:
        assert text in caught.value.message


async def test_invalid_fault_header_rejected(make_openai: MakeOpenAI) -> None:
    client = await make_openai()
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="gpt-4o",
            messages=[user(HELLO)],
            extra_headers={"x-simulator-fault": "explode"},
        )
    assert "x-simulator-fault" in caught.value.message
    assert "server_error" in caught.value.message
