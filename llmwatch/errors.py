"""The llmwatch exception tree.

LlmwatchError
 +-- ConfigError         a setting or the price table is invalid; stops start-up
 +-- ApiError            a request failed; the service returns it as JSON
"""

from __future__ import annotations

from typing import Any


class LlmwatchError(Exception):
    """Base class of every error llmwatch raises on purpose."""


class ConfigError(LlmwatchError):
    """A setting, flag or the price table is invalid."""


class ApiError(LlmwatchError):
    """A failed LLM request, with the HTTP status and the metric's error type.

    ``error_type`` is one of ``metrics.ERROR_TYPES``. ``headers`` go to the
    client (Retry-After); ``upstream_headers`` are the failed upstream
    response's, kept for its rate-limit figures, and ``upstream_retries`` the
    retries the OpenAI client made before giving up. ``counted`` is true once
    the failure has been added to ``llm_errors_total``, so that no layer counts
    a request twice.
    """

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        field: str | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        upstream_headers: dict[str, str] | None = None,
        upstream_retries: int = 0,
        counted: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.field = field
        self.details = details
        self.headers = headers or {}
        self.upstream_headers = upstream_headers or {}
        self.upstream_retries = upstream_retries
        self.counted = counted

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON body of the error response."""
        body: dict[str, Any] = {"type": self.error_type, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        if self.details is not None:
            body["details"] = self.details
        return {"error": body}
