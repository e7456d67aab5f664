"""Send a steady mix of requests to llmwatch so that the dashboard fills.

It is meant for llmwatch's simulated upstream (no OPENAI_API_KEY). A share
of the prompts carry fault directives (``#fault=server_error``,
``#fault=rate_limit``, ``#fault=hang``) so that the error panels fill too.
A share of the requests are streamed so that time to first token has data.
Against the real API every request costs money, so the script exits when
llmwatch's /healthz reports a real upstream, unless --allow-real-upstream
is given.

Example::

    python monitoring/demo/loadgen.py --url http://127.0.0.1:8000 --rate 5

It runs until --duration seconds have passed or --requests requests were
sent (0 means no limit for either), or until SIGINT or SIGTERM, then waits
for the requests still open and logs a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Sequence

import aiohttp

logger = logging.getLogger("loadgen")

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-nano")
# Fault directive and the share of requests that carry it.
FAULT_SHARES = (("server_error", 0.04), ("rate_limit", 0.03), ("hang", 0.005))
STREAM_SHARE = 0.3
PROMPTS = (
    "Summarise the plot of Hamlet in two sentences.",
    "List three uses of a Prometheus histogram.",
    "Explain what a token bucket rate limiter does.",
    "Write a haiku about latency.",
    "Translate 'good morning' into French, German and Spanish.",
)
SUMMARY_INTERVAL_S = 10.0
# Seconds to wait for open requests after SIGINT or SIGTERM; Docker sends
# SIGKILL 10 s after SIGTERM by default.
STOP_GRACE_S = 5.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; the LOADGEN_* variables set the defaults."""
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=env.get("LOADGEN_URL", "http://127.0.0.1:8000"),
        help="llmwatch base URL (LOADGEN_URL; default %(default)s)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=float(env.get("LOADGEN_RATE", "2")),
        help="requests started per second (LOADGEN_RATE; default %(default)s)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=float(env.get("LOADGEN_DURATION", "0")),
        help="stop after this many seconds, 0 for no limit "
        "(LOADGEN_DURATION; default %(default)s)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=int(env.get("LOADGEN_REQUESTS", "0")),
        help="stop after this many requests, 0 for no limit "
        "(LOADGEN_REQUESTS; default %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=50,
        help="most requests open at once; the rate drops when it is reached "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--models",
        default=env.get("LOADGEN_MODELS", ",".join(DEFAULT_MODELS)),
        help="comma-separated models to pick from (LOADGEN_MODELS; "
        "default %(default)s)",
    )
    parser.add_argument(
        "--no-faults",
        action="store_true",
        help="send no fault directives, only requests that should succeed",
    )
    parser.add_argument("--seed", type=int, help="random seed, for a repeatable mix")
    parser.add_argument(
        "--allow-real-upstream",
        action="store_true",
        help="run even when llmwatch calls the real OpenAI API, which costs money",
    )

    args = parser.parse_args(argv)
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    if args.rate <= 0:
        parser.error(f"invalid --rate {args.rate}: expected a positive number")
    if args.duration < 0 or args.requests < 0:
        parser.error("invalid --duration or --requests: expected 0 or more")
    if args.concurrency < 1:
        parser.error(f"invalid --concurrency {args.concurrency}: expected 1 or more")
    if not args.models:
        parser.error("invalid --models: expected at least one model name")
    return args


def build_request(
    rng: random.Random, models: Sequence[str], faults: bool
) -> dict[str, object]:
    """Pick a model, a prompt, maybe a fault directive and maybe streaming."""
    prompt = rng.choice(PROMPTS)
    if faults:
        draw = rng.random()
        for fault, share in FAULT_SHARES:
            if draw < share:
                prompt = f"{prompt} #fault={fault}"
                break
            draw -= share
    return {
        "model": rng.choice(models),
        "prompt": prompt,
        "stream": rng.random() < STREAM_SHARE,
    }


async def send(
    session: aiohttp.ClientSession, url: str, body: dict[str, object]
) -> str:
    """POST one /ask request, read the whole response and return its outcome."""
    try:
        async with session.post(f"{url}/ask", json=body) as response:
            await response.read()
            return str(response.status)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__


async def check_upstream(session: aiohttp.ClientSession, url: str) -> str:
    """Return the upstream that llmwatch's /healthz reports: simulated or openai."""
    async with session.get(f"{url}/healthz") as response:
        response.raise_for_status()
        health = await response.json()
    return str(health.get("upstream", "unknown"))


async def run(args: argparse.Namespace) -> collections.Counter[str]:
    """Send requests at the configured rate until a limit or a signal stops it."""
    rng = random.Random(args.seed)
    outcomes: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    slots = asyncio.Semaphore(args.concurrency)
    tasks: set[asyncio.Task[None]] = set()
    # Longer than llmwatch's own upstream timeout and retries, so that a
    # hung request is reported by llmwatch rather than cut off here.
    timeout = aiohttp.ClientTimeout(total=330)

    async def one(body: dict[str, object]) -> None:
        try:
            outcomes[await send(session, args.url, body)] += 1
        finally:
            slots.release()

    async with aiohttp.ClientSession(timeout=timeout) as session:
        upstream = await check_upstream(session, args.url)
        if upstream != "simulated" and not args.allow_real_upstream:
            raise SystemExit(
                f"loadgen: llmwatch at {args.url} calls the {upstream} upstream, "
                "where requests cost money; pass --allow-real-upstream to run anyway"
            )
        logger.info(
            "sending %.1f requests/s to %s (%s upstream)", args.rate, args.url, upstream
        )
        started = time.monotonic()
        next_summary = started + SUMMARY_INTERVAL_S
        sent = 0
        while not stop.is_set():
            if args.requests and sent >= args.requests:
                break
            now = time.monotonic()
            if args.duration and now - started >= args.duration:
                break
            if now >= next_summary:
                logger.info(
                    "sent %d requests; outcomes so far: %s", sent, dict(outcomes)
                )
                next_summary += SUMMARY_INTERVAL_S
            await slots.acquire()
            body = build_request(rng, args.models, faults=not args.no_faults)
            task = asyncio.create_task(one(body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
            # Start times follow the schedule, not the responses, so slow
            # responses do not lower the rate until --concurrency is reached.
            delay = started + sent / args.rate - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
        if tasks:
            # After a signal, wait only briefly: a "#fault=hang" request
            # takes llmwatch's whole upstream timeout to finish.
            grace = STOP_GRACE_S if stop.is_set() else None
            logger.info("waiting for %d open requests", len(tasks))
            _, pending = await asyncio.wait(set(tasks), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if pending:
                outcomes["cancelled"] += len(pending)
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load generator; return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        outcomes = asyncio.run(run(args))
    except aiohttp.ClientError as exc:
        print(f"loadgen: cannot reach llmwatch at {args.url}: {exc}", file=sys.stderr)
        return 1
    total = sum(outcomes.values())
    logger.info(
        "done: %d requests; outcomes: %s", total, dict(sorted(outcomes.items()))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
