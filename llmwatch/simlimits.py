"""Rate-limit accounting of the simulated upstream, as in x-ratelimit headers."""

from __future__ import annotations

import time

WINDOW_S = 60.0


def format_duration(seconds: float) -> str:
    """Format ``seconds`` as the API's reset headers do: 12ms, 1.5s, 6m0s."""
    milliseconds = max(0, round(seconds * 1000))
    if milliseconds < 1000:
        return f"{milliseconds}ms"
    minutes, milliseconds = divmod(milliseconds, 60_000)
    text = f"{milliseconds / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{minutes}m{text}" if minutes else text


class RateLimitWindow:
    """Requests and tokens counted in fixed 60 s windows, for x-ratelimit headers.

    NOTE: OpenAI refills its limits continuously. Here the counts return to 0
    when a window ends, and the reset headers give the time until then.
    """

    def __init__(self, requests_limit: int, tokens_limit: int) -> None:
        self.requests_limit = requests_limit
        self.tokens_limit = tokens_limit
        self._start = time.monotonic()
        self._requests = 0
        self._tokens = 0

    def _roll(self) -> None:
        now = time.monotonic()
        if now - self._start >= WINDOW_S:
            self._start = now
            self._requests = 0
            self._tokens = 0

    def seconds_to_reset(self) -> float:
        """Return the seconds until the counts of this window return to 0."""
        self._roll()
        return max(0.0, self._start + WINDOW_S - time.monotonic())

    def admit(self, tokens: int) -> str | None:
        """Count one request of ``tokens`` tokens, or return the exceeded limit.

        Returns "requests" or "tokens", without counting anything, when the
        request does not fit in the current window.
        """
        self._roll()
        if self._requests >= self.requests_limit:
            return "requests"
        if self._tokens + tokens > self.tokens_limit:
            return "tokens"
        self._requests += 1
        self._tokens += tokens
        return None

    def headers(self, *, exhausted: bool = False) -> dict[str, str]:
        """Return the x-ratelimit headers, with 0 remaining requests if exhausted."""
        reset = format_duration(self.seconds_to_reset())
        remaining_requests = 0 if exhausted else self.requests_limit - self._requests
        return {
            "x-ratelimit-limit-requests": str(self.requests_limit),
            "x-ratelimit-remaining-requests": str(remaining_requests),
            "x-ratelimit-reset-requests": reset,
            "x-ratelimit-limit-tokens": str(self.tokens_limit),
            "x-ratelimit-remaining-tokens": str(self.tokens_limit - self._tokens),
            "x-ratelimit-reset-tokens": reset,
        }
