"""Pushes to a real Pushgateway and to gateways that fail in each way."""

from __future__ import annotations

import logging
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import sample
from external import free_port
from gateways import (
    garbage_server,
    hanging_server,
    memory_pushgateway,
    read_gateway,
    status_server,
)
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmwatch.calls import CallTracker
from llmwatch.errors import ConfigError
from llmwatch.metrics import Metrics
from llmwatch.pricing import PriceTable, Usage
from llmwatch.push import (
    LAST_SUCCESS_METRIC,
    RESERVED_LABELS,
    Pusher,
    PushTarget,
    RunMetrics,
    parse_grouping,
)
from llmwatch.upstream import RateLimits

# A grouping value with a slash travels base64-encoded in the push URL.
GROUPING = {"instance": "worker/1"}
# bcrypt hash (cost 4) of PUSH_PASSWORD, for the gateway's web configuration.
PUSH_USER = "pusher"
PUSH_PASSWORD = "test-push-password"
PUSH_PASSWORD_HASH = "$2b$04$1NacA.lPQOrCthlcNJ73COuRM3p1BmB/blvRzkfT7lMEJ3IFL91oK"


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Pushgateway shared by this module; each test uses its own job."""
    with memory_pushgateway(tmp_path_factory.mktemp("pushgateway")) as url:
        yield url


def make_pusher(url: str, job: str, **options: Any) -> Pusher:
    options.setdefault("grouping_key", GROUPING)
    return Pusher(
        PushTarget(url=url, job=job, **options), RunMetrics(CollectorRegistry())
    )


def push_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "llmwatch.push" and record.levelno == logging.WARNING
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"url": "localhost:9091"}, "invalid Pushgateway URL"),
        ({"url": "ftp://127.0.0.1:9091"}, "invalid Pushgateway URL"),
        ({"url": "http://user:secret@127.0.0.1:9091"}, "contains credentials"),
        ({"job": " "}, "invalid job name"),
        ({"grouping_key": {"model": "x"}}, "Pushgateway would overwrite it"),
        ({"grouping_key": {"job": "x"}}, "Pushgateway would overwrite it"),
        ({"grouping_key": {"9lives": "x"}}, "expected a label name"),
        ({"grouping_key": {"__name__": "x"}}, "expected a label name"),
        ({"timeout_s": 0.0}, "invalid --push-timeout"),
        ({"timeout_s": float("nan")}, "invalid --push-timeout"),
        ({"retries": 11}, "invalid --push-retries"),
        ({"username": "pusher"}, "needs both a user"),
        ({"password": "secret"}, "needs both a user"),
    ],
)
def test_target_rejects_invalid_option(options: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {"url": "http://127.0.0.1:9091", "job": "nightly"}
    values.update(options)
    with pytest.raises(ConfigError, match=message) as raised:
        PushTarget(**values)
    assert "secret" not in str(raised.value)


def test_target_password_not_in_repr() -> None:
    target = PushTarget(
        url="http://127.0.0.1:9091", job="nightly", username="u", password="secret"
    )
    assert "secret" not in repr(target)
    assert "secret" not in target.describe()


def test_parse_grouping_pairs() -> None:
    assert parse_grouping(["instance=a/b", "shard=", "region=eu=west"]) == {
        "instance": "a/b",
        "shard": "",
        "region": "eu=west",
    }
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_grouping(["instance"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_grouping(["shard=1", "shard=2"])
    with pytest.raises(ConfigError, match="overwrite"):
        parse_grouping(["model=gpt-4o"])


def test_reserved_labels_cover_every_family() -> None:
    metrics = Metrics()
    run = RunMetrics(metrics.registry)
    tracker = CallTracker(None, metrics, PriceTable.load(), default_model="gpt-4o-mini")
    limits = RateLimits(remaining={"requests": 9}, limit={"requests": 10})
    tracker.record("gpt-4o", Usage(5, 5), 0.5, rate_limits=limits, retries=1)
    tracker.record("gpt-4o", None, 0.5, time_to_first_token_s=0.1)
    run.mark_success(1.0)
    text = generate_latest(metrics.registry).decode()
    names = {
        label
        for family in text_string_to_metric_families(text)
        for series in family.samples
        for label in series.labels
    }
    assert {"model", "type", "resource", "outcome", "version", "le"} <= names
    assert names <= RESERVED_LABELS


def test_push_sends_whole_registry(gateway_url: str) -> None:
    pusher = make_pusher(gateway_url, "push-whole")
    pusher.run.items.labels("succeeded").inc(3)
    pusher.run.duration.set(2.5)
    pusher.run.mark_success(1_700_000_000.5)

    assert pusher.push_blocking(carry_over=False)

    samples = read_gateway(gateway_url)
    group = {"job": "push-whole", "instance": "worker/1"}
    items = "llm_batch_items_total"
    assert sample(samples, items, outcome="succeeded", **group) == 3
    assert (items, frozenset({**group, "outcome": "failed"}.items())) in samples
    assert sample(samples, items, outcome="failed", **group) == 0
    assert sample(samples, items, outcome="skipped", **group) == 0
    assert sample(samples, "llm_batch_duration_seconds", **group) == 2.5
    assert sample(samples, LAST_SUCCESS_METRIC, **group) == 1_700_000_000.5
    assert sample(samples, "push_failure_time_seconds", **group) == 0
    assert (pusher.attempted, pusher.failed) == (1, 0)


def test_last_success_absent_until_known(gateway_url: str) -> None:
    pusher = make_pusher(gateway_url, "push-never-succeeded")
    pusher.run.items.labels("failed").inc()

    assert pusher.push_blocking(carry_over=True)

    samples = read_gateway(gateway_url)
    group = {"job": "push-never-succeeded", "instance": "worker/1"}
    assert sample(samples, "llm_batch_items_total", outcome="failed", **group) == 1
    assert (LAST_SUCCESS_METRIC, frozenset(group.items())) not in samples
    assert pusher.run.last_success is None


def test_carry_over_keeps_previous_success(gateway_url: str) -> None:
    job = "push-carry-over"
    first = make_pusher(gateway_url, job)
    first.run.items.labels("succeeded").inc(5)
    first.run.mark_success(1_700_000_000.0)
    assert first.push_blocking(carry_over=False)
    other_instance = make_pusher(gateway_url, job, grouping_key={"instance": "w2"})
    assert other_instance.push_blocking(carry_over=True)

    failed = make_pusher(gateway_url, job)
    failed.run.items.labels("failed").inc(2)
    assert failed.push_blocking(carry_over=True)

    samples = read_gateway(gateway_url)
    group = {"job": job, "instance": "worker/1"}
    assert sample(samples, LAST_SUCCESS_METRIC, **group) == 1_700_000_000.0
    assert sample(samples, "llm_batch_items_total", outcome="failed", **group) == 2
    assert sample(samples, "llm_batch_items_total", outcome="succeeded", **group) == 0
    assert failed.run.last_success == 1_700_000_000.0
    # The carried value belongs to its own group only.
    assert other_instance.run.last_success is None


def test_push_closed_port_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    pusher = make_pusher(url, "push-closed", retries=2, timeout_s=3.0)

    started = time.monotonic()
    assert not pusher.push_blocking(carry_over=True)
    elapsed = time.monotonic() - started

    # Backoff of 0.25 s and 0.5 s between the three attempts.
    assert 0.7 < elapsed < 2.0
    warnings = push_warnings(caplog)
    assert len(warnings) == 1
    assert url in warnings[0]
    assert "after 3 attempts" in warnings[0]
    assert "cannot connect" in warnings[0]
    assert (pusher.attempted, pusher.failed) == (1, 1)


def test_push_warns_once_while_failing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="llmwatch.push")
    pusher = make_pusher(f"http://127.0.0.1:{free_port()}", "push-down", retries=0)

    for _ in range(3):
        assert not pusher.push_blocking(carry_over=False)

    assert len(push_warnings(caplog)) == 1
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert sum("push to" in r.getMessage() for r in debug) == 2
    assert (pusher.attempted, pusher.failed) == (3, 3)


def test_push_hanging_gateway_times_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with hanging_server() as url:
        pusher = make_pusher(url, "push-hang", retries=3, timeout_s=1.0)
        started = time.monotonic()
        assert not pusher.push_blocking(carry_over=True)
        elapsed = time.monotonic() - started

    assert 0.9 < elapsed < 1.5
    warnings = push_warnings(caplog)
    assert len(warnings) == 1
    assert "timed out" in warnings[0]


def test_push_to_non_http_server_fails(caplog: pytest.LogCaptureFixture) -> None:
    with garbage_server() as url:
        pusher = make_pusher(url, "push-garbage", retries=1)
        assert not pusher.push_blocking(carry_over=True)

    warnings = push_warnings(caplog)
    assert len(warnings) == 1
    assert "after 2 attempts" in warnings[0]
    assert (pusher.attempted, pusher.failed) == (1, 1)


def test_push_server_error_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    requests: list[str] = []
    with status_server(500, requests) as url:
        pusher = make_pusher(url, "push-500", retries=2)
        assert not pusher.push_blocking(carry_over=False)

    assert requests == ["PUT /metrics/job/push-500/instance@base64/d29ya2VyLzE="] * 3
    warnings = push_warnings(caplog)
    assert len(warnings) == 1
    assert "HTTP 500" in warnings[0]
    assert "simulated failure" in warnings[0]


def test_push_client_error_is_not_retried() -> None:
    requests: list[str] = []
    with status_server(400, requests) as url:
        pusher = make_pusher(url, "push-400", retries=3)
        assert not pusher.push_blocking(carry_over=False)

    assert len(requests) == 1


def test_push_rejected_by_real_gateway(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Another job pushed llm_batch_items_total as a gauge first, so the
    # gateway rejects llmwatch's counter of that name as inconsistent.
    registry = CollectorRegistry()
    Gauge("llm_batch_items_total", "Not a counter.", registry=registry).set(1)
    with memory_pushgateway(tmp_path) as url:
        push_to_gateway(url, job="push-conflict-other", registry=registry)
        pusher = make_pusher(url, "push-conflict", retries=3)
        assert not pusher.push_blocking(carry_over=False)

    warnings = push_warnings(caplog)
    assert len(warnings) == 1
    assert "HTTP 400" in warnings[0]
    assert "inconsistent" in warnings[0]
    assert (pusher.attempted, pusher.failed) == (1, 1)


def _make_certificate(workdir: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed; on Debian run 'apt-get install openssl'")
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_basic_auth_over_https(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    cert, key = _make_certificate(tmp_path)
    web_config = tmp_path / "web.yml"
    web_config.write_text(
        f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        f"basic_auth_users:\n  {PUSH_USER}: {PUSH_PASSWORD_HASH}\n"
    )
    context = ssl.create_default_context(cafile=str(cert))
    auth = (PUSH_USER, PUSH_PASSWORD)
    # urllib's default HTTPS context trusts the CA file named here.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))

    with memory_pushgateway(
        tmp_path, web_config=web_config, scheme="https", context=context, auth=auth
    ) as url:
        job = "push-auth"
        first = make_pusher(url, job, username=PUSH_USER, password=PUSH_PASSWORD)
        first.run.mark_success(1_700_000_000.0)
        assert first.push_blocking(carry_over=False)
        failed = make_pusher(url, job, username=PUSH_USER, password=PUSH_PASSWORD)
        assert failed.push_blocking(carry_over=True)
        wrong = make_pusher(url, job, username=PUSH_USER, password="wrong-password")
        assert not wrong.push_blocking(carry_over=False)
        samples = read_gateway(url, context=context, auth=auth)

    group = {"job": job, "instance": "worker/1"}
    assert sample(samples, LAST_SUCCESS_METRIC, **group) == 1_700_000_000.0
    assert failed.run.last_success == 1_700_000_000.0
    warnings = push_warnings(caplog)
    assert len(warnings) == 1
    assert "HTTP 401" in warnings[0]
    assert url in warnings[0]
    assert PUSH_PASSWORD not in caplog.text
    assert "wrong-password" not in caplog.text
