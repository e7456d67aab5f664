"""The llmwatch command line: serve, simulate, batch."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
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
    parse_buckets,
)
from llmwatch.errors import ConfigError
from llmwatch.logs import setup_logging

logger = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace, Settings], int]
COMMANDS = ("serve", "simulate", "batch")


def _buckets(raw: str) -> tuple[float, ...]:
    try:
        return parse_buckets("--latency-buckets", raw)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Add the flags that override the upstream and logging settings."""
    parser.add_argument(
        "--base-url", help="OpenAI-compatible API URL (OPENAI_BASE_URL)"
    )
    parser.add_argument("--model", help="default model (OPENAI_MODEL)")
    parser.add_argument(
        "--timeout", type=float, help="upstream timeout, seconds (OPENAI_TIMEOUT)"
    )
    parser.add_argument(
        "--max-retries", type=int, help="upstream retries (OPENAI_MAX_RETRIES)"
    )
    parser.add_argument(
        "--prices-file", type=Path, help="price table YAML (LLMWATCH_PRICES_FILE)"
    )
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, help="log level (LLMWATCH_LOG_LEVEL)"
    )
    parser.add_argument(
        "--log-format", choices=LOG_FORMATS, help="log format (LLMWATCH_LOG_FORMAT)"
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
    serve.add_argument("--port", type=int, help="port to listen on (APP_PORT)")
    serve.add_argument(
        "--latency-buckets",
        type=_buckets,
        help="latency histogram bounds, seconds, comma-separated "
        "(LLMWATCH_LATENCY_BUCKETS)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        help="largest accepted /ask body, bytes (LLMWATCH_MAX_BODY_BYTES)",
    )
    add_common_options(serve)
    serve.set_defaults(handler=run_serve)

    simulate = commands.add_parser(
        "simulate", help="run only the simulated OpenAI-compatible upstream"
    )
    simulate.add_argument("--host", default="127.0.0.1", help="address to listen on")
    simulate.add_argument("--port", type=int, default=8001, help="port to listen on")
    simulate.add_argument(
        "--ttft", type=float, help="seconds before the first token (LLMWATCH_SIM_TTFT)"
    )
    simulate.add_argument(
        "--token-delay",
        type=float,
        help="seconds between streamed tokens (LLMWATCH_SIM_TOKEN_DELAY)",
    )
    simulate.add_argument(
        "--log-level", choices=LOG_LEVELS, help="log level (LLMWATCH_LOG_LEVEL)"
    )
    simulate.add_argument(
        "--log-format", choices=LOG_FORMATS, help="log format (LLMWATCH_LOG_FORMAT)"
    )
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
    overrides = {
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "base_url": getattr(args, "base_url", None),
        "model": getattr(args, "model", None),
        "timeout": getattr(args, "timeout", None),
        "max_retries": getattr(args, "max_retries", None),
        "prices_file": getattr(args, "prices_file", None),
        "latency_buckets": getattr(args, "latency_buckets", None),
        "max_body_bytes": getattr(args, "max_body_bytes", None),
        "log_level": getattr(args, "log_level", None),
        "log_format": getattr(args, "log_format", None),
        "sim_ttft": getattr(args, "ttft", None),
        "sim_token_delay": getattr(args, "token_delay", None),
    }
    settings = load_settings().with_overrides(**overrides)
    _check_flags(settings)
    return settings


def _check_flags(settings: Settings) -> None:
    if not 1 <= settings.port <= 65535:
        raise ConfigError(f"invalid --port {settings.port}: expected 1 to 65535")
    if settings.timeout <= 0:
        raise ConfigError(f"invalid --timeout {settings.timeout}: expected > 0")
    if not 0 <= settings.max_retries <= 10:
        raise ConfigError(
            f"invalid --max-retries {settings.max_retries}: expected 0 to 10"
        )
    if settings.max_body_bytes <= 0:
        raise ConfigError(
            f"invalid --max-body-bytes {settings.max_body_bytes}: expected > 0"
        )
    if settings.sim_ttft < 0 or settings.sim_token_delay < 0:
        raise ConfigError("invalid --ttft or --token-delay: expected 0 or more")


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run the service until SIGINT or SIGTERM, then drain in-flight requests."""
    from llmwatch.app import create_app

    app = create_app(settings)

    async def announce(app: web.Application) -> None:
        logger.info(
            "llmwatch %s listening on http://%s:%d",
            __version__,
            settings.host,
            settings.port,
        )

    app.on_startup.append(announce)
    # run_app stops on SIGTERM as on SIGINT and waits up to shutdown_timeout
    # for in-flight requests before it closes their connections.
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        shutdown_timeout=settings.shutdown_timeout,
        access_log=None,
        handler_cancellation=True,
        print=None,
    )
    return 0


def run_simulate(args: argparse.Namespace, settings: Settings) -> int:
    """Run the simulated upstream on its own."""
    from llmwatch.simulator import SimulatorConfig, create_simulator_app

    config = SimulatorConfig(
        ttft_s=settings.sim_ttft, token_delay_s=settings.sim_token_delay
    )
    logger.info(
        "simulated OpenAI upstream listening on http://%s:%d/v1",
        args.host,
        args.port,
    )
    web.run_app(
        create_simulator_app(config),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
    )
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
