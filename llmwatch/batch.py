"""The batch command: send a JSON Lines file of requests and push the metrics."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TextIO

from llmwatch.batchfiles import (
    InputLine,
    check_output,
    count_input,
    error_record,
    open_output,
    read_answered,
    read_input,
)
from llmwatch.config import Settings
from llmwatch.errors import ApiError, ConfigError
from llmwatch.push import (
    DEFAULT_PUSH_RETRIES,
    DEFAULT_PUSH_TIMEOUT_S,
    MAX_PUSH_RETRIES,
    check_push_options,
    parse_grouping,
)

if TYPE_CHECKING:
    from llmwatch.calls import AskResult
    from llmwatch.session import BatchSession

logger = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 4
MAX_CONCURRENCY = 256
DEFAULT_PROGRESS_INTERVAL_S = 10.0
# A terminal's progress bar is redrawn at most this often.
_REDRAW_INTERVAL_S = 0.1
_BAR_WIDTH = 30

WriteRecord = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class BatchOptions:
    """The checked options of one batch run."""

    input_path: Path
    output_path: Path
    resume: bool = False
    overwrite: bool = False
    concurrency: int = DEFAULT_CONCURRENCY
    job: str | None = None
    pushgateway: str | None = None
    grouping_key: Mapping[str, str] = field(default_factory=dict)
    push_interval: float | None = None
    push_timeout: float = DEFAULT_PUSH_TIMEOUT_S
    push_retries: int = DEFAULT_PUSH_RETRIES
    push_user: str | None = None
    push_password: str | None = field(default=None, repr=False)
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL_S

    def __post_init__(self) -> None:
        # Checked here and not only with a Pushgateway, so that a wrong value
        # shows before the day a gateway is added.
        if not 0 <= self.push_retries <= MAX_PUSH_RETRIES:
            raise ConfigError(
                f"invalid --push-retries {self.push_retries}: expected 0 to "
                f"{MAX_PUSH_RETRIES}"
            )
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ConfigError(
                f"invalid --concurrency {self.concurrency}: expected 1 to "
                f"{MAX_CONCURRENCY}"
            )
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if not math.isfinite(self.progress_interval) or self.progress_interval <= 0:
            raise ConfigError(
                f"invalid --progress-interval {self.progress_interval}: expected a "
                "positive number of seconds"
            )
        check_push_options(self.job, self.pushgateway, self.push_interval)
        if self.input_path.resolve() == self.output_path.resolve():
            raise ConfigError(
                f"the output file {self.output_path} is the input file; choose "
                "another --output"
            )

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None
    ) -> BatchOptions:
        """Combine the flags with the LLMWATCH_PUSHGATEWAY_* variables."""
        env = os.environ if environ is None else environ
        push_user = args.push_user or env.get("LLMWATCH_PUSHGATEWAY_USER") or None
        push_password = env.get("LLMWATCH_PUSHGATEWAY_PASSWORD") or None
        if push_password is not None and push_user is None:
            raise ConfigError(
                "LLMWATCH_PUSHGATEWAY_PASSWORD is set but no Pushgateway user; set "
                "--push-user or LLMWATCH_PUSHGATEWAY_USER, or unset the password"
            )
        return cls(
            input_path=args.input,
            output_path=args.output,
            resume=args.resume,
            overwrite=args.overwrite,
            concurrency=args.concurrency,
            job=args.job,
            pushgateway=args.pushgateway or env.get("LLMWATCH_PUSHGATEWAY_URL") or None,
            grouping_key=parse_grouping(args.grouping),
            push_interval=args.push_interval,
            push_timeout=args.push_timeout,
            push_retries=args.push_retries,
            push_user=push_user,
            push_password=push_password,
            progress_interval=args.progress_interval,
        )


@dataclass
class ModelTotals:
    """Requests, tokens and cost of one model in this run."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: int = 0


@dataclass
class BatchReport:
    """The counts, latencies and costs of one run, for the summary and exit status."""

    total: int
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    models: dict[str, ModelTotals] = field(default_factory=dict)
    interrupted_by: int | None = None
    elapsed_s: float = 0.0
    push_status: str = "no Pushgateway set"

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.skipped

    @property
    def exit_status(self) -> int:
        """128 plus the signal after an interrupt, 1 if any item failed, else 0."""
        if self.interrupted_by is not None:
            return 128 + self.interrupted_by
        return 1 if self.failed else 0

    def add_result(self, result: AskResult) -> None:
        self.succeeded += 1
        self.latencies.append(result.latency_s)
        totals = self.models.setdefault(result.model, ModelTotals())
        totals.requests += 1
        totals.prompt_tokens += result.prompt_tokens
        totals.completion_tokens += result.completion_tokens
        if result.cost_usd is None:
            totals.unpriced += 1
        else:
            totals.cost_usd += result.cost_usd

    def add_error(self, error_type: str) -> None:
        self.failed += 1
        self.errors[error_type] += 1

    def summary(self) -> str:
        """Describe the run in a few lines of plain text."""
        lines = [
            f"batch: requests {self.succeeded + self.failed} in "
            f"{self.elapsed_s:.1f} s: succeeded {self.succeeded}, failed "
            f"{self.failed}, skipped {self.skipped} (answered before)"
        ]
        if self.interrupted_by is not None:
            name = signal.Signals(self.interrupted_by).name
            lines.append(f"interrupted by {name}: {self.total - self.done} not sent")
        if self.errors:
            counts = ", ".join(f"{t} {n}" for t, n in sorted(self.errors.items()))
            lines.append(f"errors: {counts}")
        if self.latencies:
            p50 = percentile(self.latencies, 0.50)
            p95 = percentile(self.latencies, 0.95)
            lines.append(f"latency: p50 {p50:.3f} s, p95 {p95:.3f} s")
        for model, totals in sorted(self.models.items()):
            cost = f"${totals.cost_usd:.6f}"
            if totals.unpriced:
                cost += f" (+{totals.unpriced} requests with no price)"
            lines.append(
                f"{model}: requests {totals.requests}, prompt tokens "
                f"{totals.prompt_tokens}, completion tokens "
                f"{totals.completion_tokens}, cost {cost}"
            )
        lines.append(f"push: {self.push_status}")
        return "\n".join(lines)


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of ``values``, which must not be empty."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


class Progress:
    """A progress bar on a terminal, or a plain log line every few seconds."""

    def __init__(self, stream: TextIO, interval_s: float) -> None:
        self.stream = stream
        self.is_terminal = stream.isatty()
        self.interval_s = interval_s if not self.is_terminal else _REDRAW_INTERVAL_S
        # A terminal shows the bar from the first result on.
        self._last = 0.0 if self.is_terminal else time.monotonic()
        self._drawn = False

    def update(self, report: BatchReport) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        if not self.is_terminal:
            logger.info(
                "progress: %d of %d done (%d failed, %d skipped) in %.0f s",
                report.done,
                report.total,
                report.failed,
                report.skipped,
                report.elapsed_s,
            )
            return
        share = report.done / report.total if report.total else 1.0
        filled = round(share * _BAR_WIDTH)
        bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
        self.stream.write(
            f"\r\x1b[K[{bar}] {report.done}/{report.total} {share:4.0%} "
            f"failed {report.failed} {report.elapsed_s:.0f} s"
        )
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        """Erase the bar, so that a log line or the summary starts on a clean line."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


class _ClearProgress(logging.Filter):
    """Erase the progress bar before a log record is written under it."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.clear()
        return True


class BatchRunner:
    """Send every input line upstream, with at most ``concurrency`` calls in flight."""

    def __init__(
        self, options: BatchOptions, settings: Settings, *, stderr: TextIO | None = None
    ) -> None:
        self.options = options
        self.settings = settings
        self.stderr = stderr if stderr is not None else sys.stderr
        self.report = BatchReport(total=0)
        self.session: BatchSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight = 0
        self._started = time.monotonic()

    async def run(self) -> BatchReport:
        """Run the batch. Raises ConfigError for an unusable input or output file."""
        options = self.options
        self.report.total = count_input(options.input_path)
        answered = read_answered(options.output_path) if options.resume else set()
        check_output(
            options.output_path, resume=options.resume, overwrite=options.overwrite
        )
        # Imported only now, so that a usage error is reported without first
        # loading the OpenAI client.
        from llmwatch.session import BatchSession

        session = BatchSession(
            job=options.job,
            pushgateway=options.pushgateway,
            grouping_key=options.grouping_key,
            settings=self.settings,
            push_interval=options.push_interval,
            push_timeout=options.push_timeout,
            push_retries=options.push_retries,
            push_user=options.push_user,
            push_password=options.push_password,
        )
        self.session = session
        progress = Progress(self.stderr, options.progress_interval)
        log_filter = _ClearProgress(progress)
        handlers = logging.getLogger().handlers if progress.is_terminal else []
        for handler in handlers:
            handler.addFilter(log_filter)
        self._started = time.monotonic()
        try:
            with open_output(options.output_path, resume=options.resume) as output:
                async with session:
                    await self._send_all(session, output, answered, progress)
                    if self.report.failed or self.report.interrupted_by is not None:
                        session.mark_failed()
                    progress.clear()
        finally:
            for handler in handlers:
                handler.removeFilter(log_filter)
        self.report.elapsed_s = time.monotonic() - self._started
        self.report.push_status = _push_status(session)
        self.stderr.write(self.report.summary() + "\n")
        self.stderr.flush()
        return self.report

    def interrupt(self, signum: int) -> None:
        """Cancel the calls in flight and send no more. The final push still runs."""
        if self.report.interrupted_by is not None:
            return
        self.report.interrupted_by = signum
        logger.warning(
            "%s received: cancelling %d requests in flight; the results written so "
            "far stay in %s",
            signal.Signals(signum).name,
            self._in_flight,
            self.options.output_path,
        )
        for task in self._tasks:
            task.cancel()

    async def _send_all(
        self,
        session: BatchSession,
        output: IO[str],
        answered: set[str],
        progress: Progress,
    ) -> None:
        if self.report.interrupted_by is not None:
            return
        queue: asyncio.Queue[InputLine | None] = asyncio.Queue(
            maxsize=self.options.concurrency
        )

        def write(record: dict[str, Any]) -> None:
            output.write(json.dumps(record, ensure_ascii=False) + "\n")
            output.flush()
            self.report.elapsed_s = time.monotonic() - self._started
            progress.update(self.report)

        async def feed() -> None:
            for item in read_input(self.options.input_path, answered):
                # Lines that need no call never wait on the queue, so yield now
                # and then to keep signals and interval pushes going.
                if item.line % 1000 == 0:
                    await asyncio.sleep(0)
                if item.answered_before:
                    session.skip()
                    self.report.skipped += 1
                elif item.error is not None:
                    session.record_failure(
                        None,
                        item.error.error_type,
                        message=f"line {item.line}: {item.error.message}",
                    )
                    self.report.add_error(item.error.error_type)
                    write(error_record(item, item.error))
                else:
                    await queue.put(item)
            for _ in range(self.options.concurrency):
                await queue.put(None)

        async def work() -> None:
            while (item := await queue.get()) is not None:
                await self._send_one(session, item, write)

        self._tasks = [asyncio.create_task(feed())]
        for _ in range(self.options.concurrency):
            self._tasks.append(asyncio.create_task(work()))
        for task in self._tasks:
            task.add_done_callback(self._stop_on_error)
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                raise result

    async def _send_one(
        self, session: BatchSession, item: InputLine, write: WriteRecord
    ) -> None:
        assert item.fields is not None
        self._in_flight += 1
        try:
            result = await session.ask(**item.fields)
        except ApiError as exc:
            self.report.add_error(exc.error_type)
            write(error_record(item, exc))
            return
        except asyncio.CancelledError:
            error = ApiError(
                499,
                "client_disconnected",
                "Cancelled: the run was interrupted before the answer arrived.",
            )
            self.report.add_error(error.error_type)
            write(error_record(item, error))
            raise
        finally:
            self._in_flight -= 1
        self.report.add_result(result)
        write({"id": item.id, "line": item.line, **result.to_dict()})

    def _stop_on_error(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            for other in self._tasks:
                other.cancel()


def _push_status(session: BatchSession) -> str:
    pusher = session.pusher
    if pusher is None:
        return "no Pushgateway set"
    where = pusher.target.describe()
    if pusher.failed == 0:
        return f"{pusher.attempted} pushes to {where}"
    return (
        f"{pusher.failed} of {pusher.attempted} pushes to {where} failed; see the "
        "warning above"
    )


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number above 0, got {raw}")
    return value


def add_batch_options(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``llmwatch batch`` other than the upstream ones."""
    parser.add_argument("input", type=Path, help="JSON Lines file, one request a line")
    parser.add_argument(
        "--output",
        "-o",
        type=Path,
        required=True,
        metavar="FILE",
        help="JSON Lines file for the results, one line per request",
    )

    existing = parser.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume",
        action="store_true",
        help="append to the output and skip the ids it answered successfully",
    )
    existing.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty output file"
    )

    parser.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        default=DEFAULT_CONCURRENCY,
        help=f"maximum number of requests in flight, 1 to {MAX_CONCURRENCY} "
        f"(default {DEFAULT_CONCURRENCY})",
    )
    parser.add_argument(
        "--progress-interval",
        type=_positive_float,
        metavar="SECONDS",
        default=DEFAULT_PROGRESS_INTERVAL_S,
        help="seconds between progress lines when stderr is not a terminal "
        f"(default {DEFAULT_PROGRESS_INTERVAL_S:g})",
    )

    push = parser.add_argument_group("push mode")
    push.add_argument(
        "--pushgateway",
        metavar="URL",
        help="Pushgateway to push the metrics to (LLMWATCH_PUSHGATEWAY_URL); "
        "nothing is pushed without it",
    )
    push.add_argument(
        "--job",
        metavar="NAME",
        help="job label of the pushed group, such as nightly-eval",
    )
    push.add_argument(
        "--grouping",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another label of the pushed group, such as instance=worker-1; repeatable",
    )

    push.add_argument(
        "--push-interval",
        type=_positive_float,
        metavar="SECONDS",
        help="also push every SECONDS while the run goes on",
    )
    push.add_argument(
        "--push-timeout",
        type=_positive_float,
        default=DEFAULT_PUSH_TIMEOUT_S,
        metavar="SECONDS",
        help="maximum time of one push, in seconds, retries included "
        f"(default {DEFAULT_PUSH_TIMEOUT_S:g})",
    )
    push.add_argument(
        "--push-retries",
        type=int,
        metavar="N",
        default=DEFAULT_PUSH_RETRIES,
        help=f"retries of a failed push, 0 to {MAX_PUSH_RETRIES} "
        f"(default {DEFAULT_PUSH_RETRIES})",
    )
    push.add_argument(
        "--push-user",
        metavar="USER",
        help="basic auth user for the Pushgateway (LLMWATCH_PUSHGATEWAY_USER); the "
        "password comes from LLMWATCH_PUSHGATEWAY_PASSWORD",
    )


def run_batch(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``llmwatch batch`` and return 0, 1 if any request failed, or 128 + signal."""
    runner = BatchRunner(BatchOptions.from_args(args), settings)
    try:
        return asyncio.run(_run_until_signal(runner))
    except KeyboardInterrupt:
        print("llmwatch: stopped by a second interrupt", file=sys.stderr)
        return 128 + signal.SIGINT


async def _run_until_signal(runner: BatchRunner) -> int:
    """Run the batch. The first SIGINT or SIGTERM ends it early but cleanly."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal(signum: int) -> None:
        # A second signal gets the default action: stop at once.
        for each in signals:
            loop.remove_signal_handler(each)
        runner.interrupt(signum)

    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        report = await runner.run()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
    return report.exit_status
