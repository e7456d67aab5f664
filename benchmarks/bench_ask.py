"""Measure what POST /ask adds over calling the upstream directly.

Starts the simulated OpenAI-compatible upstream and llmwatch as two
subprocesses on free loopback ports, then sends the same non-streamed chat
completion from this process over three paths:

- ``sdk-direct``: the ``openai`` SDK's async client with ``DefaultAioHttpClient``
  straight to the simulator, as an application without llmwatch would call it.
- ``http-direct``: a plain aiohttp ``ClientSession`` posting
  ``/v1/chat/completions`` to the simulator.
- ``http-ask``: the same ``ClientSession`` posting the same messages to
  llmwatch's ``/ask``, which calls the simulator through the SDK.

Comparing ``http-ask`` with ``http-direct`` keeps the load generator's own
client cost equal on both sides, so the difference is what llmwatch adds: one
more HTTP hop, its validation, the SDK call, metrics and its log line.

Run ``python benchmarks/bench_ask.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import aiohttp
import openai
from openai.types.chat import ChatCompletionMessageParam

MODEL = "gpt-4o-mini"
PROMPT = "Name one reason to measure the latency of a call."
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
API_KEY = "benchmark"
PATHS = ("sdk-direct", "http-direct", "http-ask")
CPU_COLUMNS = ("generator", "llmwatch", "simulator")
PACKAGES = (
    "aiohttp",
    "openai",
    "httpx2",
    "pydantic",
    "prometheus-client",
    "aiohttp-apigami",
    "marshmallow",
    "llmwatch",
)
REQUEST_TIMEOUT_S = 30.0
WARMUP_MAX_S = 2.0
STARTUP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
# Above this share of all CPUs used by other programs, a row is marked as
# disturbed.
BUSY_MACHINE_PERCENT = 10.0
# Goals for /ask: the p50 latency it adds at concurrency 1, and its throughput
# as a share of the direct path's at concurrency 64.
GOAL_OVERHEAD_MS = 1.0
GOAL_THROUGHPUT_SHARE = 0.8
# The simulator's default window admits 10,000 requests per minute, which the
# zero-latency scenario passes within seconds. The benchmark never reaches these.
SIMULATOR_REQUESTS_PER_MINUTE = 1_000_000_000
SIMULATOR_TOKENS_PER_MINUTE = 1_000_000_000_000


@dataclass(frozen=True)
class Scenario:
    """One latency model of the simulated upstream."""

    name: str
    ttft_s: float
    token_delay_s: float


# Zero latency measures pure overhead, which on a small machine is CPU
# contention between the three processes. In the realistic one the simulator
# waits 0.2 s before each response, so the processes are mostly idle.
DEFAULT_SCENARIOS = (
    Scenario("zero-latency", 0.0, 0.0),
    Scenario("realistic", 0.2, 0.0),
)


@dataclass
class Measurement:
    """The figures of one path at one concurrency level."""

    path: str
    concurrency: int
    requests_planned: int
    requests_ok: int
    requests_failed: int
    elapsed_s: float
    throughput_rps: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    stopped_by_time: bool
    failures: dict[str, int] = field(default_factory=dict)
    # User plus system CPU time of each process during the measurement, in
    # milliseconds per successful request.
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)
    # CPU time spent outside these processes, as a percentage of all CPUs over
    # the measurement: other programs, steal, and kernel work such as softirq
    # on the loopback traffic.
    other_cpu_percent: float | None = None

    @property
    def disturbed(self) -> bool:
        """True when other programs used BUSY_MACHINE_PERCENT or more of the CPUs."""
        share = self.other_cpu_percent
        return share is not None and share >= BUSY_MACHINE_PERCENT


@dataclass(frozen=True)
class Endpoints:
    """Base URLs and process ids of the two servers under test."""

    simulator: str
    llmwatch: str
    simulator_pid: int
    llmwatch_pid: int


class BenchmarkError(Exception):
    """A server failed to start, or a response carried no answer text."""


Send = Callable[[], Awaitable[None]]


# --- load generation -------------------------------------------------------


async def run_load(
    send: Send, path: str, concurrency: int, count: int, max_seconds: float
) -> Measurement:
    """Send up to ``count`` requests from ``concurrency`` workers.

    Workers stop taking new requests after ``max_seconds`` and wait for those
    in flight, each bounded by REQUEST_TIMEOUT_S.
    """
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    issued = 0
    deadline = loop.time() + max_seconds

    async def worker() -> None:
        nonlocal issued
        while issued < count and loop.time() < deadline:
            issued += 1
            started = time.perf_counter()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    await send()
            except Exception as exc:
                failures[f"{type(exc).__name__}: {exc}"[:200]] += 1
            else:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return summarize(
        path, concurrency, count, latencies, failures, elapsed, issued < count
    )


def summarize(
    path: str,
    concurrency: int,
    count: int,
    latencies: list[float],
    failures: Counter[str],
    elapsed_s: float,
    stopped_by_time: bool,
) -> Measurement:
    """Compute throughput and latency percentiles from latencies in seconds."""
    p50 = p99 = mean = maximum = None
    if len(latencies) >= 2:
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        p50, p99 = cuts[49] * 1000, cuts[98] * 1000
    elif latencies:
        p50 = p99 = latencies[0] * 1000
    if latencies:
        mean = statistics.fmean(latencies) * 1000
        maximum = max(latencies) * 1000
    return Measurement(
        path=path,
        concurrency=concurrency,
        requests_planned=count,
        requests_ok=len(latencies),
        requests_failed=sum(failures.values()),
        elapsed_s=elapsed_s,
        throughput_rps=len(latencies) / elapsed_s if elapsed_s > 0 else 0.0,
        p50_ms=p50,
        p99_ms=p99,
        mean_ms=mean,
        max_ms=maximum,
        stopped_by_time=stopped_by_time,
        failures=dict(failures),
    )


def sdk_sender(client: openai.AsyncOpenAI) -> Send:
    """Return a sender that calls chat.completions.create through the SDK."""

    async def send() -> None:
        completion = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES
        )
        if not completion.choices or not completion.choices[0].message.content:
            raise BenchmarkError("the completion has no message content")

    return send


def http_sender(
    session: aiohttp.ClientSession,
    url: str,
    payload: dict[str, Any],
    check: Callable[[Any], bool],
) -> Send:
    """Return a sender that posts ``payload`` as JSON and checks the response."""
    body = json.dumps(payload).encode()
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {API_KEY}",
    }

    async def send() -> None:
        async with session.post(url, data=body, headers=headers) as response:
            content = await response.read()
            if response.status != 200:
                raise BenchmarkError(f"HTTP {response.status}: {content[:200]!r}")
        if not check(json.loads(content)):
            raise BenchmarkError(f"the response has no answer text: {content[:200]!r}")

    return send


def completion_has_text(answer: Any) -> bool:
    """Check that an OpenAI chat.completion body carries answer text."""
    try:
        return bool(answer["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError):
        return False


def ask_has_text(answer: Any) -> bool:
    """Check that an /ask body carries answer text."""
    return isinstance(answer, dict) and bool(answer.get("answer"))


async def measure_scenario(
    endpoints: Endpoints, levels: Sequence[int], args: argparse.Namespace
) -> list[Measurement]:
    """Measure every path at every level, warming each up first."""
    connector = aiohttp.TCPConnector(limit=max(100, *levels))
    async with aiohttp.ClientSession(connector=connector) as session:
        client = openai.AsyncOpenAI(
            api_key=API_KEY,
            base_url=endpoints.simulator,
            # trust_env=False keeps a proxy set in the environment from
            # receiving the load. The ClientSession ignores it by default.
            http_client=openai.DefaultAioHttpClient(trust_env=False),
            max_retries=0,
        )
        senders = {
            "sdk-direct": sdk_sender(client),
            "http-direct": http_sender(
                session,
                f"{endpoints.simulator}/chat/completions",
                {"model": MODEL, "messages": MESSAGES},
                completion_has_text,
            ),
            "http-ask": http_sender(
                session,
                f"{endpoints.llmwatch}/ask",
                {"model": MODEL, "messages": MESSAGES},
                ask_has_text,
            ),
        }
        processes = {
            "simulator": endpoints.simulator_pid,
            "llmwatch": endpoints.llmwatch_pid,
        }
        results = []
        try:
            for level in levels:
                for path in PATHS:
                    measurement = await measure_path(
                        senders[path], path, level, args, processes
                    )
                    print_row(measurement)
                    results.append(measurement)
        finally:
            await client.close()
    return results


async def measure_path(
    send: Send,
    path: str,
    level: int,
    args: argparse.Namespace,
    processes: dict[str, int],
) -> Measurement:
    """Warm ``path`` up, then measure it and the CPU time each process spends."""
    warmup = max(args.warmup, 2 * level)
    await run_load(send, path, level, warmup, WARMUP_MAX_S)
    busy_before, cpu_before = machine_busy_seconds(), cpu_seconds(processes)
    measurement = await run_load(send, path, level, args.requests, args.max_seconds)
    busy_after, cpu_after = machine_busy_seconds(), cpu_seconds(processes)

    spent = {name: cpu_after[name] - cpu_before[name] for name in cpu_before}
    if measurement.requests_ok:
        measurement.cpu_ms_per_request = {
            name: seconds * 1000 / measurement.requests_ok
            for name, seconds in spent.items()
        }
    other = busy_after - busy_before - sum(spent.values())
    capacity = measurement.elapsed_s * (os.cpu_count() or 1)
    measurement.other_cpu_percent = max(0.0, other) / capacity * 100
    return measurement


def machine_busy_seconds() -> float:
    """Return the CPU seconds of all CPUs outside idle and iowait since boot."""
    first_line = Path("/proc/stat").read_text(encoding="ascii").split("\n", 1)[0]
    # The fields are user, nice, system, idle, iowait, irq, softirq and steal.
    # Guest time is already counted in user.
    ticks = [int(value) for value in first_line.split()[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def cpu_seconds(processes: dict[str, int]) -> dict[str, float]:
    """Return the user plus system CPU seconds of this process and ``processes``.

    Child figures come from /proc/PID/stat, which counts in clock ticks
    (usually 10 ms).
    """
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    times = {"generator": time.process_time()}
    for name, pid in processes.items():
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
        # The command name in brackets may contain spaces, so the fields are
        # split after its closing bracket.
        fields = stat.rsplit(")", 1)[1].split()
        utime, stime = int(fields[11]), int(fields[12])
        times[name] = (utime + stime) / ticks_per_second
    return times


# --- servers ----------------------------------------------------------------

# Readiness checks go straight to loopback, whatever proxy the environment sets.
LOOPBACK_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct loopback TCP ports that were free a moment ago."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            probe = stack.enter_context(socket.socket())
            probe.bind(("127.0.0.1", 0))
            ports.append(int(probe.getsockname()[1]))
        return ports


def child_environment(extra: dict[str, str]) -> dict[str, str]:
    """Copy the environment without llmwatch, OpenAI and proxy settings.

    Settings from the caller's shell would otherwise change what is measured,
    and a proxy would take the loopback traffic elsewhere. ``extra`` is added.
    """
    prefixes = ("OPENAI_", "LLMWATCH_", "APP_")
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(prefixes) and not name.lower().endswith("_proxy")
    }
    env.update(extra)
    return env


@contextmanager
def started_process(
    command: list[str], env: dict[str, str], log: IO[bytes], workdir: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` until the block ends, then stop it with SIGTERM."""
    process = subprocess.Popen(
        command, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    """Poll ``url`` until it responds with 200, or raise BenchmarkError."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(
                f"{process.args!r} exited with status {process.returncode} before "
                f"{url} responded. Its output:\n{log_tail(log_path)}"
            )
        try:
            with LOOPBACK_OPENER.open(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    raise BenchmarkError(
        f"{url} did not respond within {STARTUP_TIMEOUT_S:.0f} s. The server's "
        f"output:\n{log_tail(log_path)}"
    )


def log_tail(path: Path, lines: int = 20) -> str:
    """Return the last ``lines`` lines of a log file."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


@contextmanager
def running_servers(scenario: Scenario, workdir: Path) -> Iterator[Endpoints]:
    """Start the simulator and llmwatch for ``scenario``, and stop both on exit."""
    script = str(Path(__file__).resolve())
    simulator_port, llmwatch_port = free_ports(2)
    simulator_url = f"http://127.0.0.1:{simulator_port}/v1"
    llmwatch_url = f"http://127.0.0.1:{llmwatch_port}"
    simulator_log = workdir / f"{scenario.name}-simulator.log"
    llmwatch_log = workdir / f"{scenario.name}-llmwatch.log"

    with ExitStack() as stack:
        simulator = stack.enter_context(
            started_process(
                [
                    sys.executable,
                    script,
                    "simulator",
                    "--port",
                    str(simulator_port),
                    "--ttft",
                    str(scenario.ttft_s),
                    "--token-delay",
                    str(scenario.token_delay_s),
                ],
                child_environment({}),
                stack.enter_context(simulator_log.open("wb")),
                workdir,
            )
        )
        wait_ready(f"{simulator_url}/models", simulator, simulator_log)

        llmwatch = stack.enter_context(
            started_process(
                [
                    sys.executable,
                    "-m",
                    "llmwatch",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(llmwatch_port),
                ],
                child_environment(
                    {"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": simulator_url}
                ),
                stack.enter_context(llmwatch_log.open("wb")),
                workdir,
            )
        )
        wait_ready(f"{llmwatch_url}/healthz", llmwatch, llmwatch_log)
        yield Endpoints(simulator_url, llmwatch_url, simulator.pid, llmwatch.pid)


def serve_simulator(argv: Sequence[str]) -> int:
    """Serve the simulated upstream with rate limits the benchmark cannot reach."""
    from aiohttp import web

    from llmwatch.simulator import SimulatorConfig, create_simulator_app

    parser = argparse.ArgumentParser(prog="bench_ask.py simulator")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft", type=float, required=True)
    parser.add_argument("--token-delay", type=float, required=True)
    args = parser.parse_args(argv)
    config = SimulatorConfig(
        ttft_s=args.ttft,
        token_delay_s=args.token_delay,
        requests_per_minute=SIMULATOR_REQUESTS_PER_MINUTE,
        tokens_per_minute=SIMULATOR_TOKENS_PER_MINUTE,
    )
    web.run_app(
        create_simulator_app(config),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
    )
    return 0


# --- report -----------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Describe the CPU, memory, OS, Python and package versions."""
    cpu_model = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory_mb = None
    with open("/proc/meminfo", encoding="utf-8") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory_mb = int(line.split()[1]) // 1024
                break
    os_name = platform.platform()
    with suppress(OSError, KeyError):
        os_name = f"{platform.freedesktop_os_release()['PRETTY_NAME']}, {os_name}"
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "llmwatch_commit": source_commit(),
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_total_mb": memory_mb,
        "os": os_name,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": versions,
        "load_average_at_start": os.getloadavg(),
    }


def source_commit() -> str | None:
    """Return the git commit of the llmwatch checkout, marked if it has changes."""
    package_dir = Path(__file__).resolve().parent.parent / "llmwatch"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=package_dir,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--", "."],
            cwd=package_dir,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit} with uncommitted changes" if changes else commit


def find(results: Sequence[Measurement], path: str, level: int) -> Measurement | None:
    """Return the measurement of ``path`` at ``level``, if it was made."""
    for measurement in results:
        if measurement.path == path and measurement.concurrency == level:
            return measurement
    return None


def compare(results: Sequence[Measurement]) -> dict[str, float | None]:
    """Compute /ask's p50 overhead at concurrency 1 and throughput share at 64.

    Each figure is taken against both direct paths. A figure is None when a
    level was not measured or had no successful request.
    """
    figures: dict[str, float | None] = {}
    ask_1, ask_64 = find(results, "http-ask", 1), find(results, "http-ask", 64)
    for baseline in ("http-direct", "sdk-direct"):
        direct_1, direct_64 = find(results, baseline, 1), find(results, baseline, 64)
        ask_p50 = ask_1.p50_ms if ask_1 else None
        direct_p50 = direct_1.p50_ms if direct_1 else None
        overhead = None
        if ask_p50 is not None and direct_p50 is not None:
            overhead = ask_p50 - direct_p50
        share = None
        if ask_64 and direct_64 and direct_64.throughput_rps > 0:
            share = ask_64.throughput_rps / direct_64.throughput_rps
        figures[f"p50_overhead_ms_c1_vs_{baseline}"] = overhead
        figures[f"throughput_share_c64_vs_{baseline}"] = share
    return figures


def format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_header() -> None:
    print(f"{'':<53}CPU ms per request  other")
    print(
        f"{'path':<12} {'conc':>4} {'ok':>6} {'failed':>6} {'req/s':>7} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'gen':>5} {'llmw':>5} {'sim':>5} "
        f"{'CPU %':>6}"
    )


def print_row(m: Measurement) -> None:
    cpu = [m.cpu_ms_per_request.get(name) for name in CPU_COLUMNS]
    cpu_text = " ".join("    -" if v is None else f"{v:>5.2f}" for v in cpu)
    other = "-" if m.other_cpu_percent is None else f"{m.other_cpu_percent:.0f}"
    notes = []
    if m.stopped_by_time:
        notes.append("stopped by --max-seconds")
    if m.disturbed:
        notes.append("disturbed by other load")
    note = "".join(f"  {text}" for text in notes)
    print(
        f"{m.path:<12} {m.concurrency:>4} {m.requests_ok:>6} "
        f"{m.requests_failed:>6} {m.throughput_rps:>7.1f} "
        f"{format_ms(m.p50_ms):>7} {format_ms(m.p99_ms):>7} {cpu_text} "
        f"{other:>6}{note}",
        flush=True,
    )


def print_goals(figures: dict[str, float | None]) -> None:
    """Print the two ratios against each baseline and whether the goals hold."""
    for baseline in ("http-direct", "sdk-direct"):
        overhead = figures[f"p50_overhead_ms_c1_vs_{baseline}"]
        share = figures[f"throughput_share_c64_vs_{baseline}"]
        print(f"/ask against {baseline}:")
        if overhead is None:
            print("  p50 overhead at concurrency 1: not measured")
        else:
            verdict = "met"
            if overhead >= GOAL_OVERHEAD_MS:
                verdict = f"missed by {overhead - GOAL_OVERHEAD_MS:.2f} ms"
            print(
                f"  p50 overhead at concurrency 1: {overhead:+.2f} ms "
                f"(goal under {GOAL_OVERHEAD_MS:g} ms: {verdict})"
            )
        if share is None:
            print("  throughput at concurrency 64: not measured")
        else:
            verdict = "met"
            if share < GOAL_THROUGHPUT_SHARE:
                missing = (GOAL_THROUGHPUT_SHARE - share) * 100
                verdict = f"missed by {missing:.1f} points"
            print(
                f"  throughput at concurrency 64: {share:.1%} of direct "
                f"(goal at least {GOAL_THROUGHPUT_SHARE:.0%}: {verdict})"
            )


# --- command line -----------------------------------------------------------


def parse_levels(raw: str) -> list[int]:
    try:
        levels = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid --levels {raw!r}: expected positive integers separated by "
            "commas, such as 1,16,64"
        ) from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(
            f"invalid --levels {raw!r}: every level must be at least 1"
        )
    return levels


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Compare POST /ask with calling the simulated upstream directly."
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=2000,
        help="requests per path and concurrency level (default 2000)",
    )
    parser.add_argument(
        "--levels",
        type=parse_levels,
        default=[1, 16, 64],
        help="concurrency levels, comma-separated (default 1,16,64)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=50,
        help="unmeasured requests before each measurement, at least twice the "
        f"level, stopped after {WARMUP_MAX_S:.0f} s (default 50)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=8.0,
        help="stop sending new requests in a measurement after this many "
        "seconds (default 8)",
    )
    parser.add_argument(
        "--ttft",
        type=float,
        help="simulated seconds before the response. --ttft or --token-delay runs "
        "this one scenario in place of the defaults (0 s, and 0.2 s)",
    )
    parser.add_argument(
        "--token-delay",
        type=float,
        help="simulated seconds per generated token, 20 tokens per response "
        "(default 0)",
    )
    parser.add_argument(
        "--json", type=Path, help="also write the figures and machine to this file"
    )
    return parser


def scenarios_from(args: argparse.Namespace) -> tuple[Scenario, ...]:
    """Return the default scenarios, or the one that --ttft and --token-delay set."""
    if args.ttft is None and args.token_delay is None:
        return DEFAULT_SCENARIOS
    ttft = args.ttft or 0.0
    token_delay = args.token_delay or 0.0
    if not (math.isfinite(ttft) and math.isfinite(token_delay)):
        raise BenchmarkError("invalid --ttft or --token-delay: expected a number")
    if ttft < 0 or token_delay < 0:
        raise BenchmarkError("invalid --ttft or --token-delay: expected 0 or more")
    return (Scenario("custom", ttft, token_delay),)


def check_arguments(args: argparse.Namespace) -> None:
    """Raise BenchmarkError for a count or duration out of range."""
    if args.requests < 1:
        raise BenchmarkError(f"invalid --requests {args.requests}: expected 1 or more")
    if args.warmup < 0:
        raise BenchmarkError(f"invalid --warmup {args.warmup}: expected 0 or more")
    if not (math.isfinite(args.max_seconds) and args.max_seconds > 0):
        raise BenchmarkError(
            f"invalid --max-seconds {args.max_seconds}: expected a number above 0"
        )


def run_scenario(
    scenario: Scenario, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """Start the servers for ``scenario``, measure, print and return the figures."""
    print(
        f"\nScenario {scenario.name}: simulated ttft {scenario.ttft_s} s, "
        f"token delay {scenario.token_delay_s} s"
    )
    print_header()
    with running_servers(scenario, workdir) as endpoints:
        results = asyncio.run(measure_scenario(endpoints, args.levels, args))
    disturbed = [m for m in results if m.disturbed]
    if disturbed:
        print(
            f"NOTE: other programs used {BUSY_MACHINE_PERCENT:.0f}% or more of the "
            f"CPUs during {len(disturbed)} of {len(results)} measurements; rerun "
            "on a quiet machine for figures that compare."
        )
    figures = compare(results)
    print_goals(figures)
    return {
        **asdict(scenario),
        "results": [asdict(m) for m in results],
        "comparisons": figures,
    }


def print_failures(report: dict[str, Any]) -> int:
    """Print every failure message with its count, and return how many failed."""
    failed = 0
    for scenario in report["scenarios"]:
        for m in scenario["results"]:
            failed += m["requests_failed"]
            for message, count in m["failures"].items():
                print(f"  {scenario['name']} {m['path']}: {count} x {message}")
    if failed:
        print(f"{failed} requests failed; the figures above exclude them.")
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and return the exit status, 1 if any request failed."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["simulator"]:
        return serve_simulator(arguments[1:])
    parser = build_parser()
    args = parser.parse_args(arguments)
    try:
        check_arguments(args)
        scenarios = scenarios_from(args)
    except BenchmarkError as exc:
        parser.error(str(exc))

    machine = machine_info()
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *arguments],
        "settings": {
            "requests": args.requests,
            "levels": args.levels,
            "warmup": args.warmup,
            "max_seconds": args.max_seconds,
            "model": MODEL,
            "messages": MESSAGES,
        },
        "machine": machine,
        "scenarios": [],
    }
    print(
        f"{machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, "
        f"{machine['python']}, aiohttp {machine['packages']['aiohttp']}, "
        f"openai {machine['packages']['openai']}"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="bench_ask-") as workdir:
            for scenario in scenarios:
                report["scenarios"].append(run_scenario(scenario, args, Path(workdir)))
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except (BenchmarkError, OSError) as exc:
        print(f"bench_ask.py: error: {exc}", file=sys.stderr)
        return 1
    return 1 if print_failures(report) else 0


if __name__ == "__main__":
    sys.exit(main())
