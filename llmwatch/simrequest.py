"""Chat completion request validation for the simulated upstream.

The checks and error bodies follow the OpenAI API, so clients see the same
400 responses they would get from the real service.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool", "function")

# Options that would change the response shape in ways the simulator cannot
# produce, so they are rejected instead of silently ignored.
_UNSUPPORTED_OPTIONS = ("tools", "functions", "audio", "prediction")


class OpenAIError(Exception):
    """An error response with OpenAI's body shape ``{"error": {...}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """Return the JSON body that the OpenAI API sends for this error."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class ChatRequest:
    """The fields of a valid chat completion request that the simulator uses."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    max_tokens: int | None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _missing(param: str) -> OpenAIError:
    return OpenAIError(
        400,
        f"Missing required parameter: '{param}'.",
        param=param,
        code="missing_required_parameter",
    )


def _invalid_type(param: str, expected: str, value: object) -> OpenAIError:
    return OpenAIError(
        400,
        f"Invalid type for '{param}': expected {expected}, "
        f"but got {_json_type(value)} instead.",
        param=param,
        code="invalid_type",
    )


def _check_int(param: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid_type(param, "an integer", value)
    if value < minimum:
        raise OpenAIError(
            400,
            f"Invalid '{param}': integer below minimum value. Expected a value "
            f">= {minimum}, but got {value} instead.",
            param=param,
            code="integer_below_min_value",
        )
    return value


def _check_temperature(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid_type("temperature", "a decimal", value)
    if value < 0:
        raise OpenAIError(
            400,
            "Invalid 'temperature': decimal below minimum value. Expected a "
            f"value >= 0, but got {value} instead.",
            param="temperature",
            code="decimal_below_min_value",
        )
    if value > 2:
        raise OpenAIError(
            400,
            "Invalid 'temperature': decimal above maximum value. Expected a "
            f"value <= 2, but got {value} instead.",
            param="temperature",
            code="decimal_above_max_value",
        )


def _check_content(param: str, role: str, content: object) -> None:
    if content is None:
        # An assistant message that only calls tools has no content.
        if role != "assistant":
            raise _missing(param)
        return
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _invalid_type(param, "one of a string or array of objects", content)
    if not content:
        raise OpenAIError(
            400,
            f"Invalid '{param}': empty array. Expected an array with minimum "
            "length 1, but got an empty array instead.",
            param=param,
            code="empty_array",
        )
    for index, part in enumerate(content):
        part_param = f"{param}[{index}]"
        if not isinstance(part, dict):
            raise _invalid_type(part_param, "an object", part)
        if not isinstance(part.get("type"), str):
            raise _missing(f"{part_param}.type")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise _invalid_type(f"{part_param}.text", "a string", part.get("text"))


def _check_messages(messages: object) -> list[dict[str, Any]]:
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list):
        raise _invalid_type("messages", "an array", messages)
    if not messages:
        raise OpenAIError(
            400,
            "Invalid 'messages': empty array. Expected an array with minimum "
            "length 1, but got an empty array instead.",
            param="messages",
            code="empty_array",
        )
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _invalid_type(param, "an object", message)
        role = message.get("role")
        if role is None:
            raise _missing(f"{param}.role")
        if role not in ROLES:
            supported = ", ".join(f"'{name}'" for name in ROLES)
            raise OpenAIError(
                400,
                f"Invalid value: {role!r}. Supported values are: {supported}.",
                param=f"{param}.role",
                code="invalid_value",
            )
        _check_content(f"{param}.content", role, message.get("content"))
    return messages


def _check_unsupported(body: Mapping[str, Any]) -> None:
    for name in _UNSUPPORTED_OPTIONS:
        if body.get(name):
            raise OpenAIError(
                400,
                f"The simulated upstream does not support '{name}'. Remove it, or "
                "set OPENAI_API_KEY to send requests to the OpenAI API.",
                param=name,
                code="unsupported_parameter",
            )
    n = body.get("n")
    if n is not None and n != 1:
        raise OpenAIError(
            400,
            f"The simulated upstream returns one choice only, but 'n' is {n!r}. "
            "Remove 'n', or set OPENAI_API_KEY to send requests to the OpenAI API.",
            param="n",
            code="unsupported_parameter",
        )


def parse_chat_request(body: object) -> ChatRequest:
    """Validate a decoded request body and return its fields.

    Raises OpenAIError with status 400 and the message, param and code that the
    OpenAI API uses for the same mistake. The model name is not looked up here.
    """
    if not isinstance(body, dict):
        raise _invalid_type("body", "an object", body)

    model = body.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str):
        raise _invalid_type("model", "a string", model)
    messages = _check_messages(body.get("messages"))

    if body.get("temperature") is not None:
        _check_temperature(body["temperature"])
    _check_unsupported(body)

    # max_tokens is the older name of max_completion_tokens, so the newer wins.
    max_tokens: int | None = None
    for name in ("max_tokens", "max_completion_tokens"):
        if body.get(name) is not None:
            max_tokens = _check_int(name, body[name], 1)

    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _invalid_type("stream", "a boolean", stream)
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise OpenAIError(
                400,
                "The 'stream_options' parameter is only allowed when 'stream' is "
                "enabled.",
                param="stream_options",
                code="invalid_value",
            )
        if not isinstance(stream_options, dict):
            raise _invalid_type("stream_options", "an object", stream_options)
        include_usage = stream_options.get("include_usage") is True

    return ChatRequest(
        model=model,
        messages=messages,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
    )
