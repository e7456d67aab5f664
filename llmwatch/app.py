"""The app factory: settings in, a ready aiohttp application out."""

from __future__ import annotations

import logging
import warnings
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp_apigami import setup_aiohttp_apispec, validation_middleware

from llmwatch import __version__
from llmwatch.calls import CallTracker
from llmwatch.config import Settings
from llmwatch.metrics import Metrics
from llmwatch.pricing import PriceTable
from llmwatch.routes import setup_routes
from llmwatch.simulator import SimulatorConfig, create_simulator_app
from llmwatch.upstream import NO_API_KEY, SIMULATOR_API_KEY, UpstreamClient
from llmwatch.views import (
    METRICS,
    REQUEST_DATA,
    SETTINGS,
    TRACKER,
    UPSTREAM_URL,
    error_middleware,
    json_body_middleware,
    validation_error,
)

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> web.Application:
    """Build the service. Raises ConfigError for an invalid price table or model."""
    settings = settings or Settings()
    prices = PriceTable.load(settings.prices_file)
    metrics = Metrics(settings.latency_buckets)
    tracker = CallTracker(
        None,
        metrics,
        prices,
        default_model=settings.model,
        extra_models=settings.extra_models,
    )

    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[error_middleware, json_body_middleware, validation_middleware],
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[TRACKER] = tracker
    app.cleanup_ctx.append(upstream_ctx)
    setup_routes(app)
    # NOTE: aiohttp-apigami 0.x stores the spec under a plain string key, for
    # which aiohttp warns. Building the spec now, in place, keeps that warning
    # here, where it is silenced, instead of at every start-up.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", web.NotAppKeyWarning)
        setup_aiohttp_apispec(
            app,
            title="llmwatch",
            version=__version__,
            url="/api/docs/swagger.json",
            swagger_path="/api/docs",
            error_callback=validation_error,
            in_place=True,
            # aiohttp warns once for each plain string request key. apigami
            # only uses this name as a key, so a RequestKey works and the
            # first request prints no warning.
            request_data_name=REQUEST_DATA,  # type: ignore[arg-type]
        )
    return app


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the OpenAI client for the app's lifetime."""
    upstream, simulator = await open_upstream(app[SETTINGS])
    app[TRACKER].upstream = upstream
    app[UPSTREAM_URL] = upstream.base_url or "https://api.openai.com/v1"
    try:
        yield
    finally:
        await upstream.close()
        if simulator is not None:
            await simulator.cleanup()


async def open_upstream(
    settings: Settings,
) -> tuple[UpstreamClient, web.AppRunner | None]:
    """Open the OpenAI client, first starting the simulated upstream if needed.

    Without a key and a base URL the built-in simulator serves the requests.
    A base URL without a key (a local vLLM or Ollama) gets the placeholder
    key NO_API_KEY, since the OpenAI client requires one.
    Returns the client and the simulator's runner, which the caller cleans up.
    """
    simulator: web.AppRunner | None = None
    base_url = settings.base_url
    api_key = settings.api_key
    if settings.simulated:
        simulator, base_url = await start_simulator(settings)
        api_key = SIMULATOR_API_KEY
        logger.warning(
            "OPENAI_API_KEY is not set: answering from the built-in simulated "
            "upstream at %s; set OPENAI_API_KEY to call OpenAI",
            base_url,
        )
    elif api_key is None:
        api_key = NO_API_KEY
        logger.info("OPENAI_API_KEY is not set: calling %s without a key", base_url)
    try:
        upstream = UpstreamClient(
            api_key=api_key,
            base_url=base_url,
            timeout=settings.timeout,
            max_retries=settings.max_retries,
        )
    except BaseException:
        if simulator is not None:
            await simulator.cleanup()
        raise
    return upstream, simulator


async def start_simulator(settings: Settings) -> tuple[web.AppRunner, str]:
    """Serve the simulated upstream on a free loopback port."""
    config = SimulatorConfig(
        ttft_s=settings.sim_ttft, token_delay_s=settings.sim_token_delay
    )
    runner = web.AppRunner(create_simulator_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/v1"
