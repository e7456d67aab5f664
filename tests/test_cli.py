"""The command line, run as ``python -m llmwatch`` on free loopback ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import parse_metrics, sample
from external import free_port, wait_ready

# Variables that would change the settings under test if inherited.
SETTING_PREFIXES = ("APP_", "OPENAI_", "LLMWATCH_")


def cli_env(**variables: str) -> dict[str, str]:
    """Return this process's environment without llmwatch settings, plus some."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
    # No simulated latency, unless a test sets it.
    env.update(LLMWATCH_SIM_TTFT="0", LLMWATCH_SIM_TOKEN_DELAY="0")
    env.update(variables)
    return env


@contextmanager
def running(
    args: list[str], env: dict[str, str], cwd: Path, ready_url: str
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python -m llmwatch ARGS`` until the block ends, then SIGTERM it.

    The process writes its stderr to ``cwd / "stderr.log"``.
    """
    with (cwd / "stderr.log").open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "llmwatch", *args],
            env=env,
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            wait_ready(ready_url, process, timeout=20)
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_in_flight(url: str, count: int, timeout: float = 10) -> None:
    """Poll the service's /metrics until ``count`` requests are in flight."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
            samples = parse_metrics(response.read().decode())
        if sample(samples, "llm_requests_in_flight") == count:
            return
        assert time.monotonic() < deadline
        time.sleep(0.02)


def stderr_lines(cwd: Path) -> list[str]:
    return (cwd / "stderr.log").read_text(encoding="utf-8").splitlines()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return json.load(response)


def post_json(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_serve_simulated_upstream(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    with running(
        ["serve", "--port", str(port)], cli_env(), tmp_path, f"{url}/healthz"
    ) as process:
        health = get_json(f"{url}/healthz")
        status, body = post_json(f"{url}/ask", {"prompt": "Hello"})
    lines = stderr_lines(tmp_path)

    assert process.returncode == 0
    assert health["status"] == "ok"
    assert health["upstream"] == "simulated"
    assert health["base_url"].startswith("http://127.0.0.1:")
    assert status == 200
    assert body["model"] == "gpt-4o-mini"
    assert body["prompt_tokens"] == 7
    # 7 x $0.15/1M + 20 x $0.60/1M = 0.00001305
    assert body["cost_usd"] == pytest.approx(0.00001305, rel=1e-9)
    warnings = [line for line in lines if " WARNING " in line]
    assert len(warnings) == 1
    assert "simulated upstream" in warnings[0]
    assert "OPENAI_API_KEY" in warnings[0]
    assert any(f"listening on http://127.0.0.1:{port}" in line for line in lines)


def test_serve_invalid_setting(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmwatch", "serve"],
        env=cli_env(APP_PORT="abc"),
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
    )
    lines = result.stderr.decode().splitlines()

    assert result.returncode != 0
    assert len(lines) == 1
    assert "APP_PORT" in lines[0]
    assert "'abc'" in lines[0]
    assert result.stdout == b""


def test_serve_invalid_port_flag(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmwatch", "serve", "--port", "70000"],
        env=cli_env(),
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
    )
    lines = result.stderr.decode().splitlines()

    assert result.returncode != 0
    assert len(lines) == 1
    assert "--port" in lines[0]
    assert "70000" in lines[0]


@pytest.mark.parametrize(
    ("flag", "value", "accepted"),
    [
        ("--timeout", "nan", "positive number of seconds"),
        ("--timeout", "inf", "positive number of seconds"),
        ("--base-url", "ftp://example.invalid", "http:// or https:// URL"),
        ("--base-url", "http://127.0.0.1:notaport", "http:// or https:// URL"),
        ("--base-url", "http://", "URL with a host"),
        ("--port", "٨٠٩١", "TCP port from 1 to 65535"),
        ("--max-retries", "11", "0 to 10"),
        ("--latency-buckets", "2,1", "ascending order"),
        ("--log-level", "loud", "DEBUG, INFO, WARNING, ERROR"),
        ("--port", "", "expected a value"),
        ("--latency-buckets", " ", "expected a value"),
    ],
)
def test_serve_invalid_flag_values(
    tmp_path: Path, flag: str, value: str, accepted: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmwatch", "serve", flag, value],
        env=cli_env(),
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
    )
    lines = result.stderr.decode().splitlines()

    assert result.returncode == 2
    assert len(lines) == 1
    assert f"invalid {flag} {value!r}" in lines[0]
    assert accepted in lines[0]


def test_serve_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "llmwatch", "serve", "--port", str(port)],
            env=cli_env(),
            cwd=tmp_path,
            capture_output=True,
            timeout=30,
        )
    errors = [
        line
        for line in result.stderr.decode().splitlines()
        if line.startswith("llmwatch: error:")
    ]

    assert result.returncode == 2
    assert len(errors) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in errors[0]
    assert "APP_PORT" in errors[0]
    assert "listening on" not in result.stderr.decode()


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--port", "-5"], "invalid --port '-5'"),
        (["--port", "99999"], "invalid --port '99999'"),
        (["--host", ""], "invalid --host ''"),
    ],
)
def test_simulate_invalid_address(
    tmp_path: Path, flags: list[str], fragment: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmwatch", "simulate", *flags],
        env=cli_env(),
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
    )
    lines = result.stderr.decode().splitlines()

    assert result.returncode == 2
    assert len(lines) == 1
    assert fragment in lines[0]
    assert "listening" not in result.stderr.decode()


def test_log_level_flag_any_case(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    with running(
        ["serve", "--port", str(port), "--log-level", "warning"],
        cli_env(),
        tmp_path,
        f"{url}/healthz",
    ):
        post_json(f"{url}/ask", {"prompt": "Hello"})

    output = "\n".join(stderr_lines(tmp_path))
    assert "WARNING" in output
    assert "llm call model=" not in output


def test_serve_port_flag_wins(tmp_path: Path) -> None:
    env_port = free_port()
    flag_port = free_port()
    env = cli_env(APP_PORT=str(env_port))
    url = f"http://127.0.0.1:{flag_port}"

    with running(["serve", "--port", str(flag_port)], env, tmp_path, f"{url}/healthz"):
        health = get_json(f"{url}/healthz")
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{env_port}/healthz", timeout=2)

    assert health["status"] == "ok"


def test_serve_drains_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    results: list[tuple[int, Any]] = []

    def ask_slowly() -> None:
        results.append(post_json(f"{url}/ask", {"prompt": "Hello #delay=1"}))

    with running(
        ["--port", str(port)], cli_env(), tmp_path, f"{url}/healthz"
    ) as process:
        client = threading.Thread(target=ask_slowly)
        client.start()
        wait_in_flight(url, 1)
        process.send_signal(signal.SIGTERM)
        client.join(timeout=20)
        exit_status = process.wait(timeout=20)

    assert exit_status == 0
    assert len(results) == 1
    status, body = results[0]
    assert status == 200
    # "Hello", "#", "delay", "=", "1": 5 tokens, + 3 + 3 = 11.
    assert body["prompt_tokens"] == 11
    assert body["completion_tokens"] == 20


def test_serve_second_signal_stops_at_once(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    results: list[BaseException | tuple[int, Any]] = []

    def ask_slowly() -> None:
        try:
            results.append(post_json(f"{url}/ask", {"prompt": "Hello #delay=20"}))
        except (OSError, urllib.error.URLError) as exc:
            results.append(exc)

    with running(
        ["--port", str(port)], cli_env(), tmp_path, f"{url}/healthz"
    ) as process:
        client = threading.Thread(target=ask_slowly)
        client.start()
        wait_in_flight(url, 1)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert process.poll() is None
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        exit_status = process.wait(timeout=10)
        waited = time.monotonic() - stopped_at
        client.join(timeout=20)

    assert exit_status == 1
    # Far less than the 20 s the request would take, or the 30 s drain.
    assert waited < 5
    assert len(results) == 1
    assert not isinstance(results[0], tuple)
    output = "\n".join(stderr_lines(tmp_path))
    assert "stopped at once on a second signal" in output


def test_simulate_serves_models(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/models"

    with running(["simulate", "--port", str(port)], cli_env(), tmp_path, url):
        models = get_json(url)

    ids = {model["id"] for model in models["data"]}
    assert models["object"] == "list"
    assert "gpt-4o-mini" in ids
    assert "gpt-4o-mini-2024-07-18" in ids


def test_dotenv_read_but_environment_wins(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (tmp_path / ".env").write_text(
        f"APP_PORT={port}\nOPENAI_MODEL=gpt-4o\n", encoding="utf-8"
    )
    env = cli_env(OPENAI_MODEL="gpt-4.1-mini")

    with running(["serve"], env, tmp_path, f"{url}/healthz"):
        status, body = post_json(f"{url}/ask", {"prompt": "Hello"})

    assert status == 200
    assert body["model"] == "gpt-4.1-mini"


def test_json_log_format(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = cli_env(LLMWATCH_LOG_FORMAT="json", OPENAI_MAX_RETRIES="0")

    with running(["serve", "--port", str(port)], env, tmp_path, f"{url}/healthz"):
        post_json(f"{url}/ask", {"prompt": "Hello"})
        post_json(f"{url}/ask", {"prompt": "Hello #fault=server_error"})
    lines = stderr_lines(tmp_path)
    entries = [json.loads(line) for line in lines]

    assert len(entries) >= 4
    for entry in entries:
        assert isinstance(entry, dict)
        assert set(entry) >= {"time", "level", "logger", "message"}
    messages = [entry["message"] for entry in entries]
    assert any("llm call model=gpt-4o-mini status=ok" in m for m in messages)
    assert any("status=502 error=upstream_error" in m for m in messages)
    assert [e["level"] for e in entries].count("WARNING") == 2
