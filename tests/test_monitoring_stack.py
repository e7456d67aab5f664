"""Run the shipped monitoring configuration against real processes.

llmwatch (on its simulated upstream), the Pushgateway and Prometheus run on
loopback. Prometheus uses the shipped prometheus.yml and rules, changed only
to scrape static 127.0.0.1 targets every second. After a known set of
requests and two batch runs, every dashboard query, template variable and
recording rule runs through Prometheus's HTTP API.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from external import (
    free_port,
    prometheus,
    pushgateway,
    stop_process,
    wait_ready,
)

from llmwatch.pricing import default_prices_path

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "monitoring" / "prometheus"
DASHBOARD_FILE = ROOT / "monitoring" / "grafana" / "dashboards" / "llmwatch.json"
LOADGEN = ROOT / "monitoring" / "demo" / "loadgen.py"

MODEL = "gpt-4o-mini"
# A model the simulated upstream serves, taken out of the price table and
# served through LLMWATCH_EXTRA_MODELS, so its requests count as unpriced.
# It is a reasoning model, so the reasoning token panel gets data too.
UNPRICED_MODEL = "o4-mini"
LOADGEN_MODEL = "gpt-4.1-nano"
LOADGEN_REQUESTS = 6
BATCH_JOB = "monitoring-test-batch"
# Every request of the first batch run succeeds, so it records a last
# success. The second run resumes: it skips those lines, completes one more
# and fails one, so its push carries the first run's last success over.
FIRST_BATCH: list[dict[str, object]] = [
    {"id": n, "model": MODEL, "prompt": f"Item {n}."} for n in (1, 2, 3)
]
SECOND_BATCH: list[dict[str, object]] = [
    *FIRST_BATCH,
    {"id": 4, "model": MODEL, "prompt": "Item 4."},
    {"id": 5, "model": MODEL, "prompt": "Item 5. #fault=server_error"},
]
BATCH_ITEMS = {"succeeded": 1, "failed": 1, "skipped": 3}
UPSTREAM_TIMEOUT_S = 1

# Template variables as Grafana fills them in: multi-value selections become
# a regex group, All becomes ".*". $__rate_interval and $__range cover the
# whole run, so rate() and increase() see every request.
VARIABLES = {
    "job": f"(llmwatch|{BATCH_JOB})",
    "model": f"({MODEL}|{UNPRICED_MODEL})",
    "instance": ".*",
    "__rate_interval": "1m",
    "__range": "10m",
}


@dataclass(frozen=True)
class Ask:
    """One /ask request to send and the HTTP status it should get."""

    prompt: str
    status: int
    model: str = MODEL
    stream: bool = False


# OPENAI_MAX_RETRIES=1, so the upstream_error, rate_limited and timeout
# faults fail on the retry too. "#times=1" limits the fault to the first
# try, so that request's retry succeeds.
ASKS = (
    Ask("Say hello.", 200),
    Ask("Name three colours.", 200),
    Ask("Count to five.", 200),
    Ask("Stream a short poem.", 200, stream=True),
    Ask("Fail upstream. #fault=server_error", 502),
    Ask("Hit the rate limit. #fault=rate_limit", 429),
    Ask("Hang until the timeout. #fault=hang", 504),
    Ask("Answer without usage. #fault=no_usage", 200),
    Ask("Fail once, then succeed. #fault=server_error #times=1", 200),
    Ask("An unpriced model.", 200, model=UNPRICED_MODEL),
)
# Sent and scraped before ASKS. A series that first appears with a value has
# no increase for rate() to see, and llmwatch creates histogram series only
# at their first observation.
WARMUP = (
    Ask("Warm up.", 200),
    Ask("Warm up, streamed.", 200, stream=True),
    Ask("Warm up an unpriced model.", 200, model=UNPRICED_MODEL),
)
COUNTED_REQUESTS = sum(1 for ask in ASKS if ask.model == MODEL)
EXPECTED_ERRORS = {"upstream_error": 1, "rate_limited": 1, "timeout": 1}


@dataclass(frozen=True)
class Stack:
    """URLs of the running processes and what the traffic phase recorded."""

    prometheus: str
    llmwatch_target: str
    # Millisecond timestamps of the last scrape before the counted requests
    # and of the first scrape that saw all of them.
    before_ms: int
    after_ms: int


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana's $name and ${name} variables, longest names first."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name])
        expr = expr.replace("$" + name, variables[name])
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


def api_get(base_url: str, path: str, params: dict[str, str]) -> Any:
    url = f"{base_url}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def query(base_url: str, promql: str, at: str | None = None) -> list[dict[str, Any]]:
    """Run an instant query and return its result vector."""
    params = {"query": promql}
    if at is not None:
        params["time"] = at
    data = api_get(base_url, "/api/v1/query", params)
    assert data["resultType"] == "vector", data
    result: list[dict[str, Any]] = data["result"]
    return result


def values_by(result: list[dict[str, Any]], label: str) -> dict[str, float]:
    return {
        sample["metric"].get(label, ""): float(sample["value"][1]) for sample in result
    }


def scalar(result: list[dict[str, Any]]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def wait_until(
    check: Callable[[], bool], description: str, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {description}"
            )
        time.sleep(0.2)


def rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def llmwatch_environment(workdir: Path) -> dict[str, str]:
    """Return the environment for llmwatch commands, with a price file in workdir."""
    spec = importlib.util.find_spec("llmwatch")
    assert spec is not None and spec.origin is not None
    package_parent = str(Path(spec.origin).parent.parent)

    prices = yaml.safe_load(default_prices_path().read_text(encoding="utf-8"))
    del prices["models"][UNPRICED_MODEL]
    prices_file = workdir / "prices.yaml"
    prices_file.write_text(yaml.safe_dump(prices), encoding="utf-8")

    env = {
        **os.environ,
        "PYTHONPATH": package_parent,
        # Set, even empty, these win over a .env file, so the simulated
        # upstream serves every request.
        "OPENAI_API_KEY": "",
        "OPENAI_BASE_URL": "",
        "OPENAI_MODEL": MODEL,
        "OPENAI_MAX_RETRIES": "1",
        "OPENAI_TIMEOUT": str(UPSTREAM_TIMEOUT_S),
        "LLMWATCH_PRICES_FILE": str(prices_file),
        "LLMWATCH_EXTRA_MODELS": UNPRICED_MODEL,
        "LLMWATCH_SIM_TTFT": "0",
        "LLMWATCH_SIM_TOKEN_DELAY": "0",
    }
    return env


@contextmanager
def llmwatch_service(workdir: Path) -> Iterator[str]:
    """Run llmwatch on its simulated upstream on a free port; yield its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "llmwatch", "serve", "--host", "127.0.0.1"]
    args += ["--port", str(port)]

    with (workdir / "llmwatch.log").open("wb") as log:
        # The working directory is the test's own, so no .env file is read.
        process = subprocess.Popen(
            args,
            cwd=workdir,
            env=llmwatch_environment(workdir),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_ready(f"{url}/healthz", process)
            yield url
        finally:
            stop_process(process)


def loopback_config(llmwatch_target: str, pushgateway_target: str) -> dict[str, Any]:
    """Return the shipped prometheus.yml with static loopback targets."""
    with (PROMETHEUS_DIR / "prometheus.yml").open(encoding="utf-8") as file:
        config: dict[str, Any] = yaml.safe_load(file)
    config["global"].update(
        scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s"
    )
    config["rule_files"] = [str(PROMETHEUS_DIR / path) for path in config["rule_files"]]
    targets = {"llmwatch": llmwatch_target, "pushgateway": pushgateway_target}
    jobs = []
    # The prometheus and node jobs scrape hosts that exist only in compose.
    for job in config["scrape_configs"]:
        if job["job_name"] not in targets:
            continue
        job = {key: value for key, value in job.items() if not key.endswith("_configs")}
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        jobs.append(job)
    config["scrape_configs"] = jobs
    for key in ("remote_write", "remote_read", "alerting"):
        config.pop(key, None)
    return config


def send_ask(base_url: str, ask: Ask) -> int:
    body = json.dumps({"model": ask.model, "prompt": ask.prompt, "stream": ask.stream})
    request = urllib.request.Request(
        f"{base_url}/ask",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            status: int = response.status
    except urllib.error.HTTPError as error:
        error.read()
        status = error.code
    return status


def send_all(base_url: str, asks: Sequence[Ask]) -> list[int]:
    """Send the requests concurrently and return their statuses in order."""
    with ThreadPoolExecutor(max_workers=len(asks)) as pool:
        return list(pool.map(lambda ask: send_ask(base_url, ask), asks))


def run_batch(
    pushgateway_url: str, workdir: Path, lines: Sequence[dict[str, object]]
) -> subprocess.CompletedProcess[str]:
    """Run `llmwatch batch` on the simulated upstream, pushing to the gateway."""
    input_file = workdir / "prompts.jsonl"
    input_file.write_text(
        "".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8"
    )
    args = [sys.executable, "-m", "llmwatch", "batch", str(input_file)]
    args += ["--output", str(workdir / "results.jsonl"), "--resume"]
    args += ["--pushgateway", pushgateway_url, "--job", BATCH_JOB]
    return subprocess.run(
        args,
        cwd=workdir,
        env=llmwatch_environment(workdir),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def samples_ms(base_url: str, selector: str) -> list[tuple[int, float]]:
    """Return the raw samples of one series over the last 10 minutes."""
    data = api_get(base_url, "/api/v1/query", {"query": f"{selector}[10m]"})
    assert len(data["result"]) == 1, data
    return [
        (round(float(ts) * 1000), float(v)) for ts, v in data["result"][0]["values"]
    ]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Start the processes, send the traffic and wait until it is scraped."""
    workdir = tmp_path_factory.mktemp("stack")
    with ExitStack() as processes:
        llmwatch_url = processes.enter_context(llmwatch_service(workdir))
        pushgateway_url = processes.enter_context(pushgateway(workdir))
        llmwatch_target = urllib.parse.urlsplit(llmwatch_url).netloc
        config = loopback_config(
            llmwatch_target, urllib.parse.urlsplit(pushgateway_url).netloc
        )
        for job in config["scrape_configs"]:
            for static in job["static_configs"]:
                for target in static["targets"]:
                    assert target.startswith("127.0.0.1:"), target
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
        prometheus_url = processes.enter_context(prometheus(config_file, workdir))

        selector = f'llm_requests_total{{job="llmwatch",model="{MODEL}"}}'

        # llmwatch creates the default model's counters at 0 on startup. With
        # a scrape of those zeros first, every counter of the model starts
        # from the same sample, so rate() extrapolates them all alike and
        # the error ratio comes out exact.
        def scraped_zero() -> bool:
            return bool(query(prometheus_url, f"{selector} == 0"))

        wait_until(scraped_zero, "the first scrape of llmwatch")
        assert send_all(llmwatch_url, WARMUP) == [ask.status for ask in WARMUP]
        warmup_count = sum(1 for ask in WARMUP if ask.model == MODEL)
        ttft = f'llm_time_to_first_token_seconds_count{{model="{MODEL}"}}'

        def scraped_before() -> bool:
            result = query(prometheus_url, f"{selector} == {warmup_count}")
            return bool(result) and bool(query(prometheus_url, ttft))

        wait_until(scraped_before, "the warm-up requests to be scraped")
        # The last scrape before the counted requests, where increase() in
        # the count check starts.
        before_ms, before_value = samples_ms(prometheus_url, selector)[-1]

        assert send_all(llmwatch_url, ASKS) == [ask.status for ask in ASKS]
        first = run_batch(pushgateway_url, workdir, FIRST_BATCH)
        assert first.returncode == 0, first.stderr
        # Exit status 1: the run finished, and some of its requests failed.
        second = run_batch(pushgateway_url, workdir, SECOND_BATCH)
        assert second.returncode == 1, second.stderr
        loadgen = subprocess.run(
            [
                sys.executable,
                str(LOADGEN),
                "--url",
                llmwatch_url,
                "--requests",
                str(LOADGEN_REQUESTS),
                "--rate",
                "20",
                "--models",
                LOADGEN_MODEL,
                "--seed",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert loadgen.returncode == 0, loadgen.stderr
        assert f"done: {LOADGEN_REQUESTS} requests" in loadgen.stderr

        expected = before_value + COUNTED_REQUESTS

        def scraped_after() -> bool:
            return samples_ms(prometheus_url, selector)[-1][1] == expected

        wait_until(scraped_after, f"{selector} to reach {expected}")
        after_ms = min(
            ts
            for ts, value in samples_ms(prometheus_url, selector)
            if value == expected
        )

        skipped = f'llm_batch_items_total{{job="{BATCH_JOB}",outcome="skipped"}}'

        def batch_scraped() -> bool:
            return bool(query(prometheus_url, f"{skipped} == {BATCH_ITEMS['skipped']}"))

        wait_until(batch_scraped, "the second batch run's push to be scraped")
        # A few more scrapes and rule evaluations, so that every rate() and
        # recording rule has samples after the traffic.
        time.sleep(3)
        yield Stack(
            prometheus=prometheus_url,
            llmwatch_target=llmwatch_target,
            before_ms=before_ms,
            after_ms=after_ms,
        )


def dashboard_panels() -> list[dict[str, Any]]:
    data = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    return [panel for panel in data["panels"] if panel["type"] != "row"]


def panel_expr(title: str, ref_id: str = "A") -> str:
    for panel in dashboard_panels():
        if panel["title"] == title:
            for target in panel["targets"]:
                if target["refId"] == ref_id:
                    expr: str = target["expr"]
                    return expr
    raise AssertionError(f"no panel {title!r} with query {ref_id}")


def recording_rule_names() -> list[str]:
    with (PROMETHEUS_DIR / "rules" / "recording.yml").open(encoding="utf-8") as file:
        groups = yaml.safe_load(file)["groups"]
    return [rule["record"] for group in groups for rule in group["rules"]]


def test_requests_panel_counts_every_request(stack: Stack) -> None:
    # The range runs from the scrape before the traffic to the first scrape
    # after it, so increase() needs no extrapolation and counts exactly.
    variables = {
        **VARIABLES,
        "job": "llmwatch",
        "model": MODEL,
        "__range": f"{stack.after_ms - stack.before_ms}ms",
    }
    expr = substitute(panel_expr("Requests"), variables)
    result = query(stack.prometheus, expr, at=rfc3339(stack.after_ms))
    assert scalar(result) == COUNTED_REQUESTS


def test_errors_counted_by_type(stack: Stack) -> None:
    result = query(
        stack.prometheus,
        f'sum by (type) (llm_errors_total{{job="llmwatch",model="{MODEL}"}}) > 0',
    )
    assert values_by(result, "type") == EXPECTED_ERRORS


def test_error_ratio_rule_matches_traffic(stack: Stack) -> None:
    result = query(
        stack.prometheus,
        f'job_model:llm_error_ratio:rate5m{{job="llmwatch",model="{MODEL}"}}',
    )
    requests = [ask for ask in WARMUP + ASKS if ask.model == MODEL]
    expected = sum(EXPECTED_ERRORS.values()) / len(requests)
    assert scalar(result) == pytest.approx(expected)


def test_streamed_request_has_ttft(stack: Stack) -> None:
    result = query(
        stack.prometheus,
        f'llm_time_to_first_token_seconds_count{{job="llmwatch",model="{MODEL}"}}',
    )
    streamed = [ask for ask in WARMUP + ASKS if ask.stream and ask.model == MODEL]
    assert scalar(result) == len(streamed)


def test_retry_and_data_gaps_counted(stack: Stack) -> None:
    # With OPENAI_MAX_RETRIES=1 the client retries each 5xx, 429 and timeout
    # once: the server_error, rate_limit and hang faults, and the
    # "#times=1" request whose retry succeeds. Retries of calls that failed
    # in the end are counted too.
    retries = query(
        stack.prometheus,
        f'llm_upstream_retries_total{{job="llmwatch",model="{MODEL}"}}',
    )
    assert scalar(retries) == 4
    usage_missing = query(
        stack.prometheus, f'llm_usage_missing_total{{model="{MODEL}"}}'
    )
    assert scalar(usage_missing) == 1
    unpriced = query(
        stack.prometheus, f'llm_unpriced_requests_total{{model="{UNPRICED_MODEL}"}}'
    )
    unpriced_asks = [ask for ask in WARMUP + ASKS if ask.model == UNPRICED_MODEL]
    assert scalar(unpriced) == len(unpriced_asks)


def test_loadgen_requests_counted(stack: Stack) -> None:
    result = query(
        stack.prometheus,
        f'llm_requests_total{{job="llmwatch",model="{LOADGEN_MODEL}"}}',
    )
    assert scalar(result) == LOADGEN_REQUESTS


def test_batch_push_scraped_with_its_job(stack: Stack) -> None:
    items = query(stack.prometheus, f'llm_batch_items_total{{job="{BATCH_JOB}"}}')
    assert values_by(items, "outcome") == BATCH_ITEMS
    duration = query(
        stack.prometheus, f'llm_batch_duration_seconds{{job="{BATCH_JOB}"}}'
    )
    assert 0 < scalar(duration) < 60
    age = query(
        stack.prometheus,
        f'time() - llm_batch_last_success_timestamp_seconds{{job="{BATCH_JOB}"}}',
    )
    assert 0 <= scalar(age) < 120


@pytest.mark.parametrize(
    "panel", dashboard_panels(), ids=lambda panel: str(panel["title"])
)
def test_panel_queries_return_data(stack: Stack, panel: dict[str, Any]) -> None:
    for target in panel["targets"]:
        expr = substitute(target["expr"], VARIABLES)
        result = query(stack.prometheus, expr)
        assert result, f"query {target['refId']} returned nothing: {expr}"
        values = [float(sample["value"][1]) for sample in result]
        assert any(math.isfinite(value) for value in values), f"{expr}: {values}"


def test_template_variables_list_values(stack: Stack) -> None:
    data = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    expected = {
        "job": {"llmwatch", BATCH_JOB},
        "model": {MODEL, UNPRICED_MODEL, LOADGEN_MODEL},
        "instance": {stack.llmwatch_target},
    }
    for variable in data["templating"]["list"]:
        if variable["type"] != "query":
            continue
        # label_values(selector, label) is Grafana's form of the label
        # values API call below.
        definition = substitute(variable["definition"], {"job": ".*"})
        inner = definition.removeprefix("label_values(").removesuffix(")")
        selector, _, label = inner.rpartition(",")
        values = api_get(
            stack.prometheus,
            f"/api/v1/label/{label.strip()}/values",
            {"match[]": selector.strip()},
        )
        assert expected[variable["name"]] <= set(values), variable["name"]


@pytest.mark.parametrize("name", recording_rule_names())
def test_recording_rule_has_data(stack: Stack, name: str) -> None:
    result = query(stack.prometheus, f'{name}{{job="llmwatch"}}')
    models = {sample["metric"]["model"] for sample in result}
    assert MODEL in models, f"{name}: {result}"
