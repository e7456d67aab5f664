"""Push mode: the batch run families and pushes to a Prometheus Pushgateway."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import re
import threading
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import basic_auth_handler, push_to_gateway
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmwatch.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_PUSH_TIMEOUT_S = 5.0
DEFAULT_PUSH_RETRIES = 3
MAX_PUSH_RETRIES = 10
# The first retry waits this long, and each next one twice as long.
RETRY_BACKOFF_S = 0.25

LAST_SUCCESS_METRIC = "llm_batch_last_success_timestamp_seconds"
ITEM_OUTCOMES = ("succeeded", "failed", "skipped")
# Label names of llmwatch's own families, plus those Prometheus reserves. The
# Pushgateway gives a grouping label precedence over a pushed label of the
# same name, so a grouping key such as model=x would relabel every series.
RESERVED_LABELS = frozenset(
    {
        "job",
        "model",
        "type",
        "resource",
        "outcome",
        "version",
        "python_version",
        "le",
        "quantile",
    }
)
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# HTTP statuses worth a retry, because the gateway may respond differently later.
_RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class PushTarget:
    """A Pushgateway group to push to, with the limits and credentials to use.

    The group is ``job`` plus ``grouping_key``: a push replaces only the
    series of its own group, so give each job, and each instance of a job
    that runs in parallel, a distinct group. Raises ConfigError for an
    invalid value.
    """

    url: str
    job: str
    grouping_key: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = DEFAULT_PUSH_TIMEOUT_S
    retries: int = DEFAULT_PUSH_RETRIES
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"invalid Pushgateway URL {self.url!r}: expected http://host:port "
                "or https://host:port (--pushgateway, LLMWATCH_PUSHGATEWAY_URL)"
            )
        if parts.username is not None or parts.password is not None:
            raise ConfigError(
                "invalid Pushgateway URL: it contains credentials; give the user "
                "with --push-user and the password in LLMWATCH_PUSHGATEWAY_PASSWORD"
            )
        if not self.job.strip():
            raise ConfigError("invalid job name '': give the batch job a name (--job)")
        for key in self.grouping_key:
            check_grouping_key(key)
        if not math.isfinite(self.timeout_s) or self.timeout_s <= 0:
            raise ConfigError(
                f"invalid --push-timeout {self.timeout_s}: expected a positive "
                "number of seconds"
            )
        if not 0 <= self.retries <= MAX_PUSH_RETRIES:
            raise ConfigError(
                f"invalid --push-retries {self.retries}: expected 0 to "
                f"{MAX_PUSH_RETRIES}"
            )
        if (self.username is None) != (self.password is None):
            raise ConfigError(
                "basic auth for the Pushgateway needs both a user (--push-user or "
                "LLMWATCH_PUSHGATEWAY_USER) and a password "
                "(LLMWATCH_PUSHGATEWAY_PASSWORD); only one is set"
            )

    @property
    def labels(self) -> dict[str, str]:
        """The labels that identify the group: job and the grouping key."""
        return {"job": self.job, **self.grouping_key}

    def describe(self) -> str:
        """Name the gateway and group for log lines; never the credentials."""
        labels = " ".join(f"{key}={value}" for key, value in self.labels.items())
        return f"{self.url.rstrip('/')} ({labels})"


def check_push_options(
    job: str | None, pushgateway: str | None, push_interval: float | None
) -> None:
    """Raise ConfigError for push options that do not fit together."""
    if pushgateway is not None and job is None:
        raise ConfigError(
            "pushing to a Pushgateway needs a job name: pass job=... (--job), "
            "such as nightly-eval"
        )
    if push_interval is None:
        return
    if not math.isfinite(push_interval) or push_interval <= 0:
        raise ConfigError(
            f"invalid --push-interval {push_interval}: expected a positive number "
            "of seconds"
        )
    if pushgateway is None:
        raise ConfigError(
            "--push-interval needs a Pushgateway (--pushgateway or "
            "LLMWATCH_PUSHGATEWAY_URL)"
        )


def check_grouping_key(key: str) -> None:
    """Raise ConfigError unless ``key`` can name a grouping label."""
    if not _LABEL_NAME.fullmatch(key) or key.startswith("__"):
        raise ConfigError(
            f"invalid grouping key {key!r} (--grouping): expected a label name of "
            "letters, digits and underscores that does not start with a digit or "
            "with __"
        )
    if key in RESERVED_LABELS:
        raise ConfigError(
            f"invalid grouping key {key!r} (--grouping): llmwatch's metrics or "
            "Prometheus use this label, and the Pushgateway would overwrite it; "
            "choose another key, such as instance or shard"
        )


def parse_grouping(pairs: Iterable[str]) -> dict[str, str]:
    """Parse ``key=value`` pairs of --grouping into a grouping key."""
    grouping: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(
                f"invalid --grouping {pair!r}: expected key=value, such as "
                "instance=worker-1"
            )
        check_grouping_key(key)
        if key in grouping:
            raise ConfigError(f"invalid --grouping: key {key!r} is given twice")
        grouping[key] = value
    return grouping


class _LastSuccessCollector(Collector):
    """The last-success gauge, exported only once its value is known.

    A job that never succeeded has no such series, rather than a zero that
    would read as a success in 1970.
    """

    help_text = (
        "Unix time when the last successful batch run ended: every item succeeded "
        "or was answered by an earlier run."
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value: float | None = None

    def set_if_unset(self, value: float) -> bool:
        """Set the value unless one is already set; return whether it was set."""
        with self._lock:
            if self.value is not None:
                return False
            self.value = value
            return True

    def set(self, value: float) -> None:
        with self._lock:
            self.value = value

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(LAST_SUCCESS_METRIC, self.help_text)]

    def collect(self) -> Iterable[Metric]:
        value = self.value
        if value is None:
            return []
        return [GaugeMetricFamily(LAST_SUCCESS_METRIC, self.help_text, value=value)]


class RunMetrics:
    """The ``llm_batch_*`` families of one run, added to the run's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.duration = Gauge(
            "llm_batch_duration_seconds",
            "Seconds since the batch run started; its total once the run ended.",
            registry=registry,
        )
        self.items = Counter(
            "llm_batch_items",
            "Batch items by outcome: succeeded, failed, or skipped because an "
            "earlier run answered them.",
            ["outcome"],
            registry=registry,
        )
        for outcome in ITEM_OUTCOMES:
            self.items.labels(outcome)
        self._last_success = _LastSuccessCollector()
        registry.register(self._last_success)

    @property
    def last_success(self) -> float | None:
        """Unix time of the last successful run, if this run has one."""
        return self._last_success.value

    def mark_success(self, timestamp: float) -> None:
        """Record that the run succeeded at ``timestamp`` (Unix seconds)."""
        self._last_success.set(timestamp)

    def carry_over(self, timestamp: float) -> bool:
        """Keep a previous run's last success unless this run has its own."""
        return self._last_success.set_if_unset(timestamp)


class Pusher:
    """Push one run's registry to one Pushgateway group, off the event loop.

    Every push replaces the group (HTTP PUT) with the whole registry. One push
    takes at most ``target.timeout_s``, retries included. A gateway that is
    unreachable, hangs or responds with an error is logged and returned as
    False, not raised. Before a push that may end a
    failed run, the group's previous last-success time is read from the
    gateway (``GET /api/v1/metrics``) and carried over, since the PUT would
    otherwise delete it.
    """

    def __init__(self, target: PushTarget, run: RunMetrics) -> None:
        self.target = target
        self.run = run
        # Serializes pushes, so an abandoned slow push cannot land after a
        # newer one and replace its values.
        self._lock = threading.Lock()
        self._previous_read = False
        self._read_warned = False
        self._failing = False
        self.attempted = 0
        self.failed = 0

    def push_blocking(self, *, carry_over: bool) -> bool:
        """Push now from the calling thread; return whether the gateway took it.

        With ``carry_over``, first read the previous last-success time unless
        it is known already. Run this in a worker thread, never on the loop.
        """
        started = time.monotonic()
        deadline = started + self.target.timeout_s
        if not self._lock.acquire(timeout=self.target.timeout_s):
            self._record_outcome("an earlier push is still running", started, 0)
            return False
        read_error: str | None = None
        try:
            if carry_over:
                read_error = self._read_previous(deadline)
            error, attempts = self._put(deadline)
        finally:
            self._lock.release()
        self._record_outcome(error, started, attempts)
        if read_error is not None:
            self._report_unread(read_error, pushed=error is None)
        return error is None

    def _read_previous(self, deadline: float) -> str | None:
        """Carry over the group's previous last success; return the read error."""
        if self._previous_read or self.run.last_success is not None:
            return None
        # The read gets at most half the time, so the push itself still can
        # be tried when the read hangs.
        timeout = min(deadline - time.monotonic(), self.target.timeout_s / 2)
        try:
            previous = read_last_success(self.target, timeout)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return describe_error(exc)
        self._previous_read = True
        if previous is not None and self.run.carry_over(previous):
            logger.debug("carried over %s=%s", LAST_SUCCESS_METRIC, previous)
        return None

    def _report_unread(self, error: str, *, pushed: bool) -> None:
        # When the push failed as well, its WARNING covers both.
        level = logging.DEBUG if self._read_warned or not pushed else logging.WARNING
        self._read_warned = self._read_warned or pushed
        logger.log(
            level,
            "cannot read the previous %s of %s: %s; if this run fails, its push "
            "leaves that series out",
            LAST_SUCCESS_METRIC,
            self.target.describe(),
            error,
        )

    def _put(self, deadline: float) -> tuple[str | None, int]:
        """PUT the registry with retries; return the last error and attempts.

        NOTE: urllib applies the timeout to each socket operation, so a gateway
        that sends its response a few bytes at a time can hold an attempt past
        the deadline.
        """
        target = self.target
        attempts = 0
        error: str | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return error or f"timed out after {target.timeout_s} s", attempts
            attempts += 1
            try:
                push_to_gateway(
                    target.url,
                    job=target.job,
                    registry=self.run.registry,
                    grouping_key=dict(target.grouping_key),
                    timeout=remaining,
                    handler=self._handler,
                )
                return None, attempts
            except urllib.error.HTTPError as exc:
                error = describe_error(exc)
                if exc.code not in _RETRIED_STATUSES:
                    return error, attempts
            except (OSError, http.client.HTTPException) as exc:
                error = describe_error(exc)
            if attempts > target.retries:
                return error, attempts
            backoff = RETRY_BACKOFF_S * 2 ** (attempts - 1)
            time.sleep(max(0.0, min(backoff, deadline - time.monotonic())))

    def _handler(
        self,
        url: str,
        method: str,
        timeout: float | None,
        headers: list[tuple[str, str]],
        data: bytes,
    ) -> Callable[[], None]:
        handle: Callable[[], None] = basic_auth_handler(
            url,
            method,
            timeout,
            headers,
            data,
            self.target.username,
            self.target.password,
        )
        return handle

    def _record_outcome(self, error: str | None, started: float, attempts: int) -> None:
        self.attempted += 1
        elapsed = time.monotonic() - started
        where = self.target.describe()
        if error is None:
            logger.info(
                "pushed metrics to %s in %.3f s (attempts: %d)",
                where,
                elapsed,
                attempts,
            )
            if self._failing:
                logger.info("pushes to %s succeed again", where)
            self._failing = False
            return
        self.failed += 1
        # One WARNING when pushes start failing; repeats go to DEBUG until a
        # push succeeds again.
        level = logging.DEBUG if self._failing else logging.WARNING
        self._failing = True
        logger.log(
            level,
            "push to %s failed after %d attempts in %.1f s: %s; the job goes on, "
            "and the Pushgateway keeps this group's previous values",
            where,
            attempts,
            elapsed,
            error,
        )


def read_last_success(target: PushTarget, timeout: float) -> float | None:
    """Read the group's last-success time from the gateway; None if it has none.

    Raises OSError or http.client.HTTPException when the gateway cannot be
    reached or responds with an error, and ValueError when its response is not
    the JSON of ``/api/v1/metrics``.
    """
    if timeout <= 0:
        raise TimeoutError("no time left to read the previous value")
    request = urllib.request.Request(f"{target.url.rstrip('/')}/api/v1/metrics")
    if target.username is not None and target.password is not None:
        token = b64encode(f"{target.username}:{target.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        document = json.load(response)
    return find_last_success(document, target.labels)


def find_last_success(document: Any, labels: Mapping[str, str]) -> float | None:
    """Find the last-success value of the group with ``labels`` in the response."""
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise ValueError("the response of /api/v1/metrics has no 'data' list")
    for group in document["data"]:
        if not isinstance(group, dict) or group.get("labels") != dict(labels):
            continue
        family = group.get(LAST_SUCCESS_METRIC)
        if family is None:
            return None
        try:
            return float(family["metrics"][0]["value"])
        except (KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"malformed {LAST_SUCCESS_METRIC} entry") from exc
    return None


def describe_error(exc: BaseException) -> str:
    """Describe a push or read failure in one line, with the gateway's reason."""
    if isinstance(exc, urllib.error.HTTPError):
        reason = ""
        with contextlib.suppress(OSError, http.client.HTTPException):
            reason = exc.read(300).decode("utf-8", "replace").strip()
        text = f"HTTP {exc.code} {exc.reason}"
        return f"{text}: {reason}" if reason else text
    if isinstance(exc, urllib.error.URLError):
        return f"cannot connect: {exc.reason}"
    if isinstance(exc, TimeoutError):
        detail = str(exc)
        return (
            f"timed out: {detail}" if detail and detail != "timed out" else "timed out"
        )
    return str(exc) or type(exc).__name__
