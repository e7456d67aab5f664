"""Marshmallow schemas of the HTTP API, used for validation and OpenAPI docs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    validate,
    validates_schema,
)

from llmwatch.errors import ApiError

MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")
# A JSON \uXXXX escape of a UTF-16 surrogate, the only way a JSON text can
# carry a code point that has no UTF-8 encoding.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class JsonBodyError(ValueError):
    """A request body or input line that is not a JSON document llmwatch takes."""


def decode_json(raw: bytes) -> Any:
    """Parse UTF-8 JSON, raising JsonBodyError with a reason a user can act on.

    Besides syntax errors this rejects a byte-order mark, nesting too deep
    for the parser, and lone surrogates, which the upstream cannot encode.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JsonBodyError("it is not UTF-8 encoded text") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JsonBodyError(
            f"it is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise JsonBodyError("its JSON is nested too deeply") from None
    except ValueError as exc:
        # Python refuses integers of more than 4300 digits (sys.int_info).
        raise JsonBodyError(f"it holds a number that cannot be read: {exc}") from None
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise JsonBodyError(
                "it contains a lone UTF-16 surrogate escape such as \\ud800, "
                "which is not valid Unicode text"
            ) from None
    return value


def _check_content(value: Any) -> None:
    """Accept a string or OpenAI's list of content parts, each with a type."""
    if isinstance(value, str):
        return
    if isinstance(value, list) and value:
        for part in value:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ValidationError(
                    'Each content part must be an object with a "type", such as '
                    '{"type": "text", "text": "..."}.'
                )
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise ValidationError(
                    'A part of type "text" needs a "text" string, such as '
                    '{"type": "text", "text": "..."}.'
                )
        return
    raise ValidationError("Must be a string or a non-empty list of content parts.")


class JsonBoolean(fields.Boolean):
    """A boolean that must be JSON true or false, so "yes", "1" and 1 are invalid."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class JsonNumber(fields.Float):
    """A number that must be a JSON number, so a string such as "0.7" is invalid."""

    def _deserialize(
        self, value: Any, attr: Any, data: Any, **kwargs: Any
    ) -> float | None:
        if not isinstance(value, int | float):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class MessageSchema(Schema):
    """One chat message in OpenAI's format."""

    class Meta:
        unknown = RAISE

    role = fields.String(
        required=True,
        validate=validate.OneOf(MESSAGE_ROLES),
        metadata={"description": "Who wrote the message."},
    )
    content = fields.Raw(
        required=True,
        allow_none=True,
        validate=_check_content,
        metadata={"description": "Text, or a list of content parts."},
    )
    name = fields.String(metadata={"description": "Optional author name."})
    tool_call_id = fields.String()
    tool_calls = fields.List(fields.Dict())

    @validates_schema
    def check_content_present(self, data: dict[str, Any], **_: Any) -> None:
        """Allow null content only on assistant messages that call tools."""
        if data.get("content") is None and not data.get("tool_calls"):
            raise ValidationError("Must not be null.", "content")


class AskRequestSchema(Schema):
    """The body of POST /ask."""

    class Meta:
        unknown = RAISE

    messages = fields.List(
        fields.Nested(MessageSchema),
        validate=validate.Length(min=1, error="Must contain at least one message."),
        metadata={"description": "The conversation, in OpenAI chat format."},
    )
    prompt = fields.String(
        validate=validate.Length(min=1, error="Must not be empty."),
        metadata={"description": "Shorthand for one user message."},
    )
    model = fields.String(
        validate=validate.Length(min=1, error="Must not be empty."),
        metadata={"description": "Model to call; OPENAI_MODEL by default."},
    )
    temperature = JsonNumber(
        validate=validate.Range(min=0, max=2),
        metadata={"description": "Sampling temperature, 0 to 2."},
    )
    max_tokens = fields.Integer(
        strict=True,
        validate=validate.Range(min=1),
        metadata={"description": "Upper bound on completion tokens."},
    )
    stream = JsonBoolean(
        load_default=False,
        metadata={"description": "Answer as server-sent events."},
    )

    @validates_schema
    def check_one_input(self, data: dict[str, Any], **_: Any) -> None:
        """Require exactly one of messages and prompt."""
        has_messages = "messages" in data
        has_prompt = "prompt" in data
        if has_messages and has_prompt:
            raise ValidationError("Give either messages or prompt, not both.", "prompt")
        if not has_messages and not has_prompt:
            raise ValidationError(
                'Missing: give "messages" (OpenAI chat format) or "prompt" (a string).',
                "messages",
            )


class AskResponseSchema(Schema):
    """Response body of POST /ask, also sent as the summary event of a stream."""

    model = fields.String(metadata={"description": "Base model name."})
    answer = fields.String()
    latency_s = fields.Float(metadata={"description": "Upstream latency, seconds."})
    prompt_tokens = fields.Integer()
    completion_tokens = fields.Integer()
    cached_prompt_tokens = fields.Integer(
        metadata={"description": "Part of prompt_tokens read from the cache."}
    )
    reasoning_tokens = fields.Integer(
        metadata={"description": "Part of completion_tokens spent reasoning."}
    )
    cost_usd = fields.Float(
        allow_none=True,
        metadata={"description": "US dollars; null when the model has no price."},
    )
    finish_reason = fields.String(allow_none=True)
    upstream_model = fields.String(
        allow_none=True, metadata={"description": "Snapshot the upstream named."}
    )
    request_id = fields.String(
        allow_none=True, metadata={"description": "The upstream's x-request-id."}
    )
    upstream_attempts = fields.Integer(
        metadata={"description": "1 plus the retries the client made."}
    )
    time_to_first_token_s = fields.Float(
        allow_none=True, metadata={"description": "Streams only, seconds."}
    )
    usage_missing = fields.Boolean(
        metadata={"description": "True when the upstream sent no usage."}
    )


class ErrorDetailSchema(Schema):
    """Error type, message and the request field at fault."""

    type = fields.String(metadata={"description": "The llm_errors_total type."})
    message = fields.String()
    field = fields.String(metadata={"description": "The request field at fault."})
    details = fields.Dict()


class ErrorSchema(Schema):
    """Every failure's JSON body."""

    error = fields.Nested(ErrorDetailSchema)


class HealthSchema(Schema):
    """Response body of GET /healthz."""

    status = fields.String()
    upstream = fields.String(
        metadata={"description": "simulated, openai or openai-compatible."}
    )
    base_url = fields.String(allow_none=True)
    version = fields.String()


def invalid_request(messages: Any, hint: str = "") -> ApiError:
    """Turn marshmallow's error messages into a 422 naming the first bad field.

    Nested fields are named by path, such as ``messages[0].role``.
    """
    if not isinstance(messages, dict):
        messages = {"body": messages}
    problems = dict(_field_problems(messages))
    field = next(iter(problems), "body")
    summary = "; ".join(f"{name}: {text}" for name, text in problems.items())
    return ApiError(
        422,
        "invalid_request",
        f"Invalid request body: {summary}. {hint}".rstrip(),
        field=field,
        details=messages,
    )


def _field_problems(messages: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Yield (field path, message) pairs such as ("messages[0].role", "...")."""
    if isinstance(messages, dict):
        for key, value in messages.items():
            if key == "_schema":
                name = path or "body"
            elif isinstance(key, int):
                name = f"{path}[{key}]"
            else:
                name = f"{path}.{key}" if path else str(key)
            yield from _field_problems(value, name)
        return
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        text = " ".join(m.rstrip(".") + "." for m in messages).rstrip(".")
        if text == "Invalid input type" and path in ("", "body"):
            text = "Expected a JSON object"
        yield path or "body", text
        return
    if isinstance(messages, list):
        for item in messages:
            yield from _field_problems(item, path)
        return
    yield path or "body", str(messages).rstrip(".")
