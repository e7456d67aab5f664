"""The batch command, in process and as ``python -m llmwatch batch``.

Token counts follow the simulator's rule (see tests/test_session.py): "Say
hello" and "Second one" are 8 prompt tokens each, and answers 20 tokens,
plus 40 reasoning tokens on gpt-5-mini. Prices are config/prices.yaml's.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_API_KEY, MakeSimulator, Samples, sample
from gateways import hanging_server, memory_pushgateway, read_gateway, status_server

from llmwatch.batch import BatchOptions, BatchReport, BatchRunner, percentile
from llmwatch.config import Settings
from llmwatch.errors import ConfigError
from llmwatch.push import LAST_SUCCESS_METRIC

MakeSettings = Callable[..., Settings]
Line = str | dict[str, Any]

# gpt-4o-mini at $0.15 and $0.60 per 1M prompt and completion tokens.
SAY_HELLO_COST = (8 * 0.15 + 20 * 0.60) / 1e6
# "Be brief." is 3 tokens and "Say hello" 2: 3 + 3 + 2 + 3 + 3 = 14 tokens.
BRIEF_HELLO_COST = (14 * 0.15 + 20 * 0.60) / 1e6
# gpt-5-mini at $0.25 and $2.00, with 60 completion tokens, 40 of them reasoning.
SECOND_ONE_COST = (8 * 0.25 + 60 * 2.00) / 1e6


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Pushgateway shared by this module; each test uses its own job."""
    with memory_pushgateway(tmp_path_factory.mktemp("pushgateway")) as url:
        yield url


def write_input(path: Path, lines: Sequence[Line]) -> Path:
    text = "".join(
        (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines
    )
    path.write_text(text, encoding="utf-8")
    return path


def make_options(tmp_path: Path, lines: Sequence[Line], **values: Any) -> BatchOptions:
    input_path = write_input(tmp_path / "prompts.jsonl", lines)
    return BatchOptions(
        input_path=input_path, output_path=tmp_path / "results.jsonl", **values
    )


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def answered(records: list[dict[str, Any]]) -> list[Any]:
    """Ids of the successful records, in file order."""
    return [record["id"] for record in records if "error" not in record]


async def run_batch(
    options: BatchOptions, settings: Settings, stderr: io.StringIO | None = None
) -> tuple[BatchReport, str]:
    stream = stderr if stderr is not None else io.StringIO()
    report = await BatchRunner(options, settings, stderr=stream).run()
    return report, stream.getvalue()


async def read_async(url: str) -> Samples:
    return await asyncio.to_thread(read_gateway, url)


async def test_batch_writes_results_and_pushes(
    tmp_path: Path, gateway_url: str, make_settings: MakeSettings
) -> None:
    job = "batch-results"
    lines: list[Line] = [
        {"id": "greet", "prompt": "Say hello"},
        {"prompt": "Second one", "model": "gpt-5-mini"},
        {
            "id": 3,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Say hello"},
            ],
            "temperature": 0.2,
        },
    ]
    options = make_options(
        tmp_path, lines, job=job, pushgateway=gateway_url, grouping_key={"shard": "a"}
    )
    started = time.time()

    report, stderr = await run_batch(options, make_settings())

    finished = time.time()
    assert report.exit_status == 0
    records = {record["id"]: record for record in read_output(options.output_path)}
    assert set(records) == {"greet", 2, 3}
    assert records["greet"]["line"] == 1
    assert records["greet"]["cost_usd"] == pytest.approx(SAY_HELLO_COST)
    assert records[2]["model"] == "gpt-5-mini"
    assert records[2]["reasoning_tokens"] == 40
    assert records[2]["cost_usd"] == pytest.approx(SECOND_ONE_COST)
    assert records[3]["prompt_tokens"] == 14
    assert records[3]["cost_usd"] == pytest.approx(BRIEF_HELLO_COST)
    assert "succeeded 3, failed 0, skipped 0" in stderr
    assert "p50" in stderr
    assert "gpt-4o-mini: requests 2, prompt tokens 22, completion tokens 40" in stderr

    samples = await read_async(gateway_url)
    group = {"job": job, "instance": "", "shard": "a"}
    assert sample(samples, "llm_requests_total", model="gpt-4o-mini", **group) == 2
    assert sample(samples, "llm_requests_total", model="gpt-5-mini", **group) == 1
    tokens = "llm_tokens_total"
    assert sample(samples, tokens, model="gpt-4o-mini", type="prompt", **group) == 22
    assert sample(samples, tokens, model="gpt-5-mini", type="completion", **group) == 60
    cost = "llm_cost_usd_total"
    assert sample(samples, cost, model="gpt-4o-mini", **group) == pytest.approx(
        SAY_HELLO_COST + BRIEF_HELLO_COST
    )
    assert sample(samples, cost, model="gpt-5-mini", **group) == pytest.approx(
        SECOND_ONE_COST
    )
    assert sample(samples, "llm_batch_items_total", outcome="succeeded", **group) == 3
    assert started <= sample(samples, LAST_SUCCESS_METRIC, **group) <= finished
    assert 0 < sample(samples, "llm_batch_duration_seconds", **group) < 10


async def test_batch_bad_lines_reported(
    tmp_path: Path, gateway_url: str, make_settings: MakeSettings
) -> None:
    job = "batch-bad-lines"
    lines: list[Line] = [
        {"id": "ok", "prompt": "Say hello"},
        "not json",
        "[1, 2]",
        {"id": True, "prompt": "Say hello"},
        {"id": "ok", "prompt": "Say hello again"},
        {"id": "s", "prompt": "Say hello", "stream": True},
        {"id": "u", "prompt": "Say hello", "colour": "red"},
        {"id": "m", "prompt": "Say hello", "model": "gpt-3"},
        "   ",
        {"prompt": "Say hello #fault=server_error"},
    ]
    options = make_options(tmp_path, lines, job=job, pushgateway=gateway_url)
    with options.input_path.open("ab") as extra:
        extra.write(b'{"prompt": "caf\xe9"}\n')
        extra.write(b'{"prompt": "Hi", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}\n")
        extra.write(b'{"prompt": "Hi", "max_tokens": ' + b"9" * 5000 + b"}\n")

    report, _ = await run_batch(options, make_settings())

    assert report.exit_status == 1
    records = read_output(options.output_path)
    assert answered(records) == ["ok"]
    errors = {record["line"]: record for record in records if "error" in record}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13]
    assert errors[2]["id"] == 2
    assert "not valid JSON" in errors[2]["error"]["message"]
    assert "must be a JSON object" in errors[3]["error"]["message"]
    assert errors[4]["id"] == 4
    assert "Invalid id" in errors[4]["error"]["message"]
    assert errors[4]["error"]["field"] == "id"
    assert errors[5]["id"] == "ok"
    assert errors[5]["error"]["field"] == "id"
    assert "line 1 uses it already" in errors[5]["error"]["message"]
    assert errors[6]["error"]["field"] == "stream"
    assert errors[6]["error"]["status"] == 422
    assert "Not supported in batch input" in errors[6]["error"]["message"]
    assert errors[7]["error"]["field"] == "colour"
    assert errors[8]["error"]["status"] == 400
    assert errors[8]["error"]["field"] == "model"
    assert errors[10]["error"]["type"] == "upstream_error"
    assert errors[10]["error"]["status"] == 502
    assert "not UTF-8" in errors[11]["error"]["message"]
    assert "nested too deeply" in errors[12]["error"]["message"]
    assert "number that cannot be read" in errors[13]["error"]["message"]
    assert report.errors == {"invalid_request": 10, "upstream_error": 1}

    samples = await read_async(gateway_url)
    group = {"job": job, "instance": ""}
    errors_total = "llm_errors_total"
    assert (
        sample(samples, errors_total, model="unknown", type="invalid_request", **group)
        == 10
    )
    assert (
        sample(
            samples, errors_total, model="gpt-4o-mini", type="upstream_error", **group
        )
        == 1
    )
    assert sample(samples, "llm_requests_total", model="gpt-4o-mini", **group) == 2
    assert sample(samples, "llm_batch_items_total", outcome="failed", **group) == 11
    assert sample(samples, "llm_batch_items_total", outcome="succeeded", **group) == 1
    assert (LAST_SUCCESS_METRIC, frozenset(group.items())) not in samples


async def test_batch_rejects_non_empty_output(
    tmp_path: Path, make_settings: MakeSettings
) -> None:
    options = make_options(tmp_path, [{"prompt": "Say hello"}])
    options.output_path.write_text('{"id": 1, "answer": "kept"}\n')

    with pytest.raises(ConfigError, match=r"--resume .* --overwrite"):
        await run_batch(options, make_settings())
    assert options.output_path.read_text() == '{"id": 1, "answer": "kept"}\n'

    overwrite = make_options(tmp_path, [{"prompt": "Say hello"}], overwrite=True)
    report, _ = await run_batch(overwrite, make_settings())
    assert report.exit_status == 0
    assert answered(read_output(options.output_path)) == [1]
    assert "kept" not in options.output_path.read_text()


async def test_batch_resume_skips_answered_ids(
    tmp_path: Path, make_simulator: MakeSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []
    settings = Settings(
        api_key=TEST_API_KEY, base_url=await make_simulator(calls=calls), max_retries=0
    )
    lines: list[Line] = [
        {"id": "a", "prompt": "Say hello"},
        {"id": "b", "prompt": "Say hello"},
        {"id": "c", "prompt": "Say hello"},
        {"prompt": "Second one"},
    ]
    options = make_options(tmp_path, lines, resume=True)
    previous = (
        '{"id": "a", "line": 1, "answer": "from the first run"}\n'
        '{"id": "b", "line": 2, "error": {"type": "timeout"}}\n'
        '{"id": "c", "line": 3, "answ'
    )
    options.output_path.write_text(previous)

    report, stderr = await run_batch(options, settings)

    assert report.exit_status == 0
    assert len(calls) == 3
    assert (report.succeeded, report.skipped) == (3, 1)
    text = options.output_path.read_text()
    assert text.startswith(previous + "\n")
    new_records = [json.loads(line) for line in text.splitlines()[3:]]
    assert sorted(map(str, answered(new_records))) == ["4", "b", "c"]
    assert "skipped 1" in stderr
    assert any("1 lines of" in record.getMessage() for record in caplog.records)


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def wait_for_lines(path: Path, count: int, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(count_lines, path) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} did not reach {count} lines in {limit_s} s")


async def test_batch_interrupt_then_resume(
    tmp_path: Path, gateway_url: str, make_settings: MakeSettings
) -> None:
    job = "batch-interrupt"
    lines: list[Line] = [
        {"id": "fast-1", "prompt": "Say hello"},
        {"id": "slow", "prompt": "Say hello #fault=hang #times=1"},
        {"id": "fast-2", "prompt": "Second one"},
    ]
    options = make_options(
        tmp_path, lines, concurrency=3, job=job, pushgateway=gateway_url
    )
    runner = BatchRunner(options, make_settings(), stderr=io.StringIO())
    run = asyncio.create_task(runner.run())
    await wait_for_lines(options.output_path, 2)

    runner.interrupt(signal.SIGTERM)
    report = await run

    assert report.exit_status == 128 + signal.SIGTERM
    records = read_output(options.output_path)
    assert sorted(answered(records)) == ["fast-1", "fast-2"]
    (cancelled,) = [record for record in records if "error" in record]
    assert cancelled["id"] == "slow"
    assert cancelled["error"]["type"] == "client_disconnected"
    assert cancelled["error"]["status"] == 499
    samples = await read_async(gateway_url)
    group = {"job": job, "instance": ""}
    assert (
        sample(
            samples,
            "llm_errors_total",
            model="gpt-4o-mini",
            type="client_disconnected",
            **group,
        )
        == 1
    )
    assert sample(samples, "llm_batch_items_total", outcome="failed", **group) == 1
    assert (LAST_SUCCESS_METRIC, frozenset(group.items())) not in samples

    resumed = make_options(
        tmp_path, lines, resume=True, job=job, pushgateway=gateway_url
    )
    report, _ = await run_batch(resumed, make_settings())

    assert report.exit_status == 0
    assert (report.succeeded, report.skipped) == (1, 2)
    assert sorted(answered(read_output(options.output_path))) == [
        "fast-1",
        "fast-2",
        "slow",
    ]
    samples = await read_async(gateway_url)
    assert sample(samples, "llm_requests_total", model="gpt-4o-mini", **group) == 1
    assert sample(samples, "llm_batch_items_total", outcome="skipped", **group) == 2
    assert sample(samples, LAST_SUCCESS_METRIC, **group) > 0


async def test_batch_hanging_gateway_finishes(
    tmp_path: Path, make_settings: MakeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    lines: list[Line] = [{"prompt": "Say hello"}, {"prompt": "Second one"}]
    output = tmp_path / "results.jsonl"
    written_at_push: list[int] = []

    def count_written() -> None:
        written_at_push.append(len(output.read_text().splitlines()))

    with hanging_server(on_connect=count_written) as url:
        options = make_options(
            tmp_path, lines, job="batch-hang", pushgateway=url, push_timeout=1.0
        )
        started = time.monotonic()
        report, stderr = await run_batch(options, make_settings())
        elapsed = time.monotonic() - started

    assert report.exit_status == 0
    assert elapsed < 1.0 + 1.0
    assert written_at_push
    assert written_at_push[0] == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert url in warnings[0].getMessage()
    assert "1 of 1 pushes" in stderr


async def test_batch_gateway_error_exit_zero(
    tmp_path: Path, make_settings: MakeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    requests: list[str] = []
    with status_server(503, requests) as url:
        options = make_options(
            tmp_path,
            [{"prompt": "Say hello"}],
            job="batch-503",
            pushgateway=url,
            push_retries=1,
            push_interval=0.05,
            concurrency=1,
        )
        report, stderr = await run_batch(options, make_settings())

    assert report.exit_status == 0
    assert requests
    assert all(request.startswith("PUT /metrics/job/batch-503") for request in requests)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "HTTP 503" in warnings[0]
    assert "failed; see the warning above" in stderr


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_progress_bar_on_terminal(
    tmp_path: Path, make_settings: MakeSettings
) -> None:
    options = make_options(tmp_path, [{"prompt": "Say hello"}] * 3)
    terminal = FakeTerminal()

    await run_batch(options, make_settings(), stderr=terminal)

    text = terminal.getvalue()
    assert "\r\x1b[K[" in text
    assert "/3" in text
    # The bar is erased before the summary is written.
    assert "\r\x1b[Kbatch: requests 3" in text


async def test_progress_lines_without_terminal(
    tmp_path: Path, make_settings: MakeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmwatch.batch")
    lines = [{"prompt": f"Say hello {n} #delay=0.05"} for n in range(4)]
    options = make_options(tmp_path, lines, concurrency=1, progress_interval=0.04)

    _, stderr = await run_batch(options, make_settings())

    progress = [r.getMessage() for r in caplog.records if r.name == "llmwatch.batch"]
    assert len(progress) >= 2
    assert all(message.startswith("progress: ") for message in progress)
    assert "of 4 done" in progress[-1]
    assert "\r" not in stderr


def test_percentile_nearest_rank() -> None:
    values = [float(n) for n in range(20, 0, -1)]
    assert percentile(values, 0.50) == 10.0
    assert percentile(values, 0.95) == 19.0
    assert percentile([0.3], 0.95) == 0.3


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"concurrency": 0}, "invalid --concurrency 0"),
        ({"concurrency": 257}, "invalid --concurrency 257"),
        ({"resume": True, "overwrite": True}, "exclude each other"),
        ({"output_path": Path("prompts.jsonl")}, "is the input file"),
    ],
)
def test_options_reject_invalid_values(values: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {
        "input_path": Path("prompts.jsonl"),
        "output_path": Path("results.jsonl"),
    }
    arguments.update(values)
    with pytest.raises(ConfigError, match=message):
        BatchOptions(**arguments)


def command_env(**values: str) -> dict[str, str]:
    """The environment for a subprocess, without any OpenAI or llmwatch setting."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OPENAI_", "LLMWATCH_"))
    }
    env.update(values)
    return env


async def run_command(
    args: Sequence[str], cwd: Path, env: dict[str, str]
) -> tuple[int, str]:
    """Run ``python -m llmwatch batch ARGS``; return the status and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmwatch",
        "batch",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stderr.decode()


async def test_command_exit_statuses(
    tmp_path: Path, simulator_url: str, gateway_url: str
) -> None:
    write_input(tmp_path / "ok.jsonl", [{"prompt": "Say hello"}, {"prompt": "Hi"}])
    write_input(
        tmp_path / "mixed.jsonl",
        [{"prompt": "Say hello"}, {"prompt": "Say hello #fault=server_error"}],
    )
    (tmp_path / "full.jsonl").write_text('{"id": 1, "answer": "kept"}\n')
    with_key = command_env(
        OPENAI_API_KEY=TEST_API_KEY,
        OPENAI_BASE_URL=simulator_url,
        OPENAI_MAX_RETRIES="0",
        LLMWATCH_PUSHGATEWAY_PASSWORD="do-not-log-me",
    )
    debug = {**with_key, "LLMWATCH_LOG_LEVEL": "DEBUG"}
    simulated = command_env(
        LLMWATCH_SIM_TTFT="0",
        LLMWATCH_SIM_TOKEN_DELAY="0",
        LLMWATCH_PUSHGATEWAY_URL=gateway_url,
    )
    with status_server(401) as unauthorized:
        auth = ["--job", "cli-auth", "--pushgateway", unauthorized]
        cases: list[tuple[list[str], dict[str, str]]] = [
            (["missing.jsonl", "-o", "a.jsonl", "--push-user", "u"], with_key),
            (["ok.jsonl", "-o", "full.jsonl", "--push-user", "u"], with_key),
            (["ok.jsonl", "-o", "b.jsonl", "--concurrency", "0"], simulated),
            (["ok.jsonl", "-o", "c.jsonl", "--push-interval", "5"], simulated),
            (["ok.jsonl", "-o", "d.jsonl", "--job", "cli-ok"], simulated),
            (["mixed.jsonl", "-o", "e.jsonl", *auth, "--push-user", "u"], debug),
            (["ok.jsonl", "-o", "f.jsonl"], with_key),
            (["ok.jsonl", "-o", "g.jsonl", "--push-retries", "11"], simulated),
        ]
        results = await asyncio.gather(
            *(run_command(args, tmp_path, env) for args, env in cases)
        )

    assert [status for status, _ in results] == [2, 2, 2, 2, 0, 1, 2, 2]
    for _, stderr in [*results[:4], *results[6:]]:
        assert len(stderr.splitlines()) == 1, stderr
        assert stderr.startswith("llmwatch: error: ")
    assert "cannot read the input file missing.jsonl" in results[0][1]
    assert "No such file or directory" in results[0][1]
    assert "pass --resume" in results[1][1]
    assert "invalid --concurrency 0" in results[2][1]
    assert "needs a job name" in results[3][1]
    assert (tmp_path / "full.jsonl").read_text() == '{"id": 1, "answer": "kept"}\n'

    simulated_stderr = results[4][1]
    assert "built-in simulated upstream" in simulated_stderr
    assert "succeeded 2, failed 0" in simulated_stderr
    samples = await read_async(gateway_url)
    group = {"job": "cli-ok", "instance": ""}
    assert sample(samples, "llm_batch_items_total", outcome="succeeded", **group) == 2
    mixed_stderr = results[5][1]
    assert "errors: upstream_error 1" in mixed_stderr
    assert "HTTP 401" in mixed_stderr
    assert "do-not-log-me" not in mixed_stderr
    assert "PASSWORD is set but no Pushgateway user" in results[6][1]
    assert "invalid --push-retries 11: expected 0 to 10" in results[7][1]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_command_interrupted_then_resumed(
    tmp_path: Path, simulator_url: str, signum: signal.Signals
) -> None:
    lines: list[Line] = [
        {"id": "fast", "prompt": "Say hello"},
        {"id": "slow", "prompt": f"Wait {signum.name} #fault=hang #times=1"},
    ]
    write_input(tmp_path / "prompts.jsonl", lines)
    output = tmp_path / "results.jsonl"
    env = command_env(
        OPENAI_API_KEY=TEST_API_KEY,
        OPENAI_BASE_URL=simulator_url,
        OPENAI_MAX_RETRIES="0",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmwatch",
        "batch",
        "prompts.jsonl",
        "-o",
        str(output),
        cwd=tmp_path,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    await wait_for_lines(output, 1)

    process.send_signal(signum)
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)

    assert process.returncode == 128 + signum
    assert f"{signum.name} received" in stderr.decode()
    records = read_output(output)
    assert answered(records) == ["fast"]
    assert [record["id"] for record in records if "error" in record] == ["slow"]

    status, resumed = await run_command(
        ["prompts.jsonl", "-o", str(output), "--resume"], tmp_path, env
    )

    assert status == 0
    assert "succeeded 1, failed 0, skipped 1" in resumed
    assert sorted(answered(read_output(output))) == ["fast", "slow"]
