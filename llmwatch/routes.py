"""The URL map of the service."""

from aiohttp import web

from llmwatch import views


def setup_routes(app: web.Application) -> None:
    """Register the service's routes on ``app``."""
    app.router.add_post("/ask", views.ask)
    app.router.add_get("/metrics", views.metrics)
    app.router.add_get("/healthz", views.healthz)
