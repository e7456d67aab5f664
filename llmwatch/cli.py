"""The llmwatch command line: serve, simulate, batch."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from dotenv import load_dotenv

from llmwatch import __version__
from llmwatch.batch import add_batch_options, run_batch
from llmwatch.config import (
    LOG_FORMATS,
    LOG_LEVELS,
    Settings,
    load_settings,
    parse_port,
)
from llmwatch.errors import ConfigError
from llmwatch.logs import setup_logging

logger = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace, Settings], int]
COMMANDS = ("serve", "simulate", "batch")


# Each settings flag and the environment variable it overrides. Flag values
# are checked by the same rules as the variables.
FLAG_VARIABLES = {
    "host": "APP_HOST",
    "port": "APP_PORT",
    "base_url": "OPENAI_BASE_URL",
    "model": "OPENAI_MODEL",
    "timeout": "OPENAI_TIMEOUT",
    "max_retries": "OPENAI_MAX_RETRIES",
    "prices_file": "LLMWATCH_PRICES_FILE",
    "latency_buckets": "LLMWATCH_LATENCY_BUCKETS",
    "max_body_bytes": "LLMWATCH_MAX_BODY_BYTES",
    "log_level": "LLMWATCH_LOG_LEVEL",
    "log_format": "LLMWATCH_LOG_FORMAT",
    "ttft": "LLMWATCH_SIM_TTFT",
    "token_delay": "LLMWATCH_SIM_TOKEN_DELAY",
}


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Add the flags that override the upstream and logging settings."""
    parser.add_argument(
        "--base-url", help="OpenAI-compatible API URL (OPENAI_BASE_URL)"
    )
    parser.add_argument("--model", help="default model (OPENAI_MODEL)")
    parser.add_argument(
        "--timeout", help="upstream timeout per attempt, seconds (OPENAI_TIMEOUT)"
    )
    parser.add_argument(
        "--max-retries", help="upstream retries, 0 to 10 (OPENAI_MAX_RETRIES)"
    )
    parser.add_argument("--prices-file", help="price table YAML (LLMWATCH_PRICES_FILE)")
    add_log_options(parser)


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """Add the flags that set the log level and format."""
    parser.add_argument(
        "--log-level",
        help=f"log level: {', '.join(LOG_LEVELS)} (LLMWATCH_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-format",
        help=f"log format: {', '.join(LOG_FORMATS)} (LLMWATCH_LOG_FORMAT)",
    )


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="llmwatch",
        description="Cost, latency and error metrics for OpenAI calls.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the service (the default command)")
    serve.add_argument("--host", help="address to listen on (APP_HOST)")
    serve.add_argument("--port", help="port to listen on (APP_PORT)")
    serve.add_argument(
        "--latency-buckets",
        help="latency histogram bounds, seconds, comma-separated "
        "(LLMWATCH_LATENCY_BUCKETS)",
    )
    serve.add_argument(
        "--max-body-bytes",
        help="largest accepted /ask body, bytes (LLMWATCH_MAX_BODY_BYTES)",
    )
    add_common_options(serve)
    serve.set_defaults(handler=run_serve)

    simulate = commands.add_parser(
        "simulate", help="run only the simulated OpenAI-compatible upstream"
    )
    simulate.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s)",
    )
    simulate.add_argument(
        "--port",
        type=int,
        default=8001,
        help="port to listen on (default: %(default)s)",
    )
    simulate.add_argument(
        "--ttft", help="seconds before the first token (LLMWATCH_SIM_TTFT)"
    )
    simulate.add_argument(
        "--token-delay",
        help="seconds between streamed tokens (LLMWATCH_SIM_TOKEN_DELAY)",
    )
    add_log_options(simulate)
    simulate.set_defaults(handler=run_simulate)

    batch = commands.add_parser(
        "batch",
        help="send the requests of a JSON Lines file and push the metrics",
        description="Send each request of a JSON Lines file upstream, write one "
        "result line per request, and push the metrics to a Prometheus "
        "Pushgateway. Exit status: 0 if every request succeeded, 1 if any failed, "
        "2 for a usage or configuration error, 128 plus the signal number after "
        "SIGINT or SIGTERM. See docs/push-mode.md.",
    )
    add_batch_options(batch)
    add_common_options(batch)
    batch.set_defaults(handler=run_batch)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """Apply the flags given on the command line over the environment."""
    flags = {}
    for attribute, variable in FLAG_VARIABLES.items():
        value = getattr(args, attribute, None)
        # simulate's --host and --port are its own, not the service's.
        own_address = args.command == "simulate" and variable.startswith("APP_")
        if value is None or own_address:
            continue
        flag = "--" + attribute.replace("_", "-")
        if not str(value).strip():
            raise ConfigError(
                f"invalid {flag} {value!r}: expected a value; leave the flag out "
                "to use the default"
            )
        flags[variable] = (flag, str(value))
    return load_settings(flags=flags)


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run the service until SIGINT or SIGTERM, then drain in-flight requests."""
    from llmwatch.app import create_app

    app = create_app(settings)
    address = Address(settings.host, settings.port, "APP_HOST and APP_PORT")
    return asyncio.run(
        serve(app, address, settings.shutdown_timeout, f"llmwatch {__version__}")
    )


def run_simulate(args: argparse.Namespace, settings: Settings) -> int:
    """Run the simulated upstream on its own."""
    from llmwatch.simulator import SimulatorConfig, create_simulator_app

    port = parse_port("--port", str(args.port))
    if not args.host.strip():
        raise ConfigError("invalid --host '': expected an address such as 127.0.0.1")
    config = SimulatorConfig(
        ttft_s=settings.sim_ttft, token_delay_s=settings.sim_token_delay
    )
    app = create_simulator_app(config)
    address = Address(args.host, port, "--host and --port", path="/v1")
    return asyncio.run(
        serve(app, address, settings.shutdown_timeout, "simulated OpenAI upstream")
    )


@dataclass(frozen=True)
class Address:
    """Listening address, with the names of the settings that set it."""

    host: str
    port: int
    settings: str
    path: str = ""


async def serve(
    app: web.Application, address: Address, shutdown_timeout: float, name: str
) -> int:
    """Serve ``app`` until a stop signal, then wait for in-flight requests.

    After SIGINT or SIGTERM the listening socket closes at once, and the
    requests already being handled get up to ``shutdown_timeout`` seconds. A
    second signal stops without waiting, and the exit status is then 1.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    runner = web.AppRunner(
        app,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, address.host, address.port)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        reason = exc.strerror or str(exc)
        raise ConfigError(
            f"cannot listen on {address.host}:{address.port}: {reason}; set "
            f"{address.settings} to a free local address"
        ) from exc
    host = f"[{address.host}]" if ":" in address.host else address.host
    logger.info(
        "%s listening on http://%s:%d%s", name, host, address.port, address.path
    )
    await stop.wait()

    logger.info(
        "stopping: waiting up to %.0f s for in-flight requests; signal again to "
        "stop at once",
        shutdown_timeout,
    )
    cleanup = asyncio.ensure_future(runner.cleanup())
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, cleanup.cancel)
    try:
        await cleanup
    except asyncio.CancelledError:
        logger.warning("stopped at once on a second signal; in-flight requests cut")
        return 1
    logger.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    # A bare 'llmwatch' or 'llmwatch --port 9000' means 'llmwatch serve ...'.
    if not arguments or arguments[0] not in (*COMMANDS, "-h", "--help", "--version"):
        arguments.insert(0, "serve")
    args = parser.parse_args(arguments)
    # Variables already in the environment win over the .env file.
    load_dotenv(Path.cwd() / ".env", override=False)
    try:
        settings = settings_from(args)
        setup_logging(settings.log_level, settings.log_format)
        handler: Command = args.handler
        return handler(args, settings)
    except ConfigError as exc:
        print(f"llmwatch: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"llmwatch: error: {exc}", file=sys.stderr)
        return 1
