"""The Flask app: ``create_app()`` builds it the same way for gunicorn, the CLI and tests.

Web validates, records, enqueues and answers; it never runs a job's work.
"""

from __future__ import annotations

from flask import Flask

from shared.logs import configure_logging
from shared.settings import Settings, load_settings
from shared.tracing import init_tracing, instrument_flask
from web import canaries, deployments, environments, features, health, imports, jobs, test_cases
from web.auth import check_api_protected
from web.catalog import CACHE_CONTROL, init_compression
from web.errors import register_error_handlers
from web.extension import init_conveyor
from web.fastpath import init_fast_path
from web.metrics import init_metrics
from web.request_ids import init_request_ids

# One blueprint per resource.
BLUEPRINTS = (
    health.bp,
    jobs.bp,
    canaries.bp,
    imports.bp,
    environments.bp,
    deployments.bp,
    features.bp,
    test_cases.bp,
)


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app from ``settings`` (default: read from the environment)."""
    settings = settings or load_settings()
    configure_logging(settings, "web")
    app = Flask(__name__)
    # Before the engines exist: SQLAlchemy is instrumented as engines are created.
    tracer_provider = init_tracing(settings, "web")
    conveyor_ext = init_conveyor(app, settings)
    init_request_ids(app)
    register_error_handlers(app)
    register_blueprints(app)
    init_compression(app, settings)
    init_metrics(app, settings)
    if tracer_provider is not None:
        instrument_flask(app, tracer_provider)
    elif settings.cache_fast_path:
        # Not with tracing: every request should have its server span.
        init_fast_path(
            app,
            conveyor_ext.cache,
            conveyor_ext.token_pepper,
            CACHE_CONTROL,
            metrics_enabled=settings.metrics_enabled,
            entries=settings.cache_local_max_entries,
        )
    check_api_protected(app)
    return app


def register_blueprints(app: Flask) -> None:
    """Mount every resource's routes."""
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
