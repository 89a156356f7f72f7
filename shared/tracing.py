"""Opt-in OpenTelemetry traces: one trace from the HTTP request through the publish to the task.

Nothing here imports OpenTelemetry unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (the
``otel`` extra installs it): unset, tracing costs an ``if``. Set, ``init_tracing``
installs a tracer provider exporting over OTLP/HTTP and instruments SQLAlchemy (engines
created afterwards) and Celery (publish in web, run in workers; the trace context rides
in the message headers); ``instrument_flask`` adds the server span of each request.

A Celery prefork child must set up its own provider: the exporting thread of a provider
made before the fork does not survive it (``worker.celery_app`` calls ``init_tracing``
from ``worker_process_init``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared.settings import Settings

if TYPE_CHECKING:
    from flask import Flask


def tracing_enabled(settings: Settings) -> bool:
    return bool(settings.otel_exporter_otlp_endpoint)


_provider: Any = None  # this process's TracerProvider, once set up


def init_tracing(settings: Settings, process: str, *, exporter: Any = None) -> Any:
    """Install the provider, instrument SQLAlchemy and Celery; the provider, or None.

    Once per process: a later call returns the provider already installed. ``exporter``
    replaces the OTLP exporter (tests pass the SDK's in-memory one, fed synchronously).
    """
    global _provider  # noqa: PLW0603 - OpenTelemetry's provider is process-wide too
    if _provider is not None:
        return _provider
    if not tracing_enabled(settings) and exporter is None:
        return None
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": settings.otel_service_name, "service.namespace": "conveyor"}
            | {"conveyor.process": process}
        )
    )
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = str(settings.otel_exporter_otlp_endpoint).rstrip("/")
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"))
        )
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    # Its declared range stops below SQLAlchemy 2.1, which it instruments through the same
    # engine events (tests/web/test_tracing.py checks the query spans).
    SQLAlchemyInstrumentor().instrument(tracer_provider=provider, skip_dep_check=True)
    CeleryInstrumentor().instrument(  # type: ignore[no-untyped-call]
        tracer_provider=provider
    )
    _provider = provider
    return provider


def instrument_flask(app: Flask, provider: Any) -> None:
    """The server span of every request of ``app`` (probes and /metrics excluded)."""
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    FlaskInstrumentor().instrument_app(  # type: ignore[no-untyped-call]
        app, tracer_provider=provider, excluded_urls="healthz,readyz,metrics"
    )


def shutdown_tracing() -> None:
    """Flush buffered spans and undo the instrumentation (a test ending, a child exiting)."""
    global _provider  # noqa: PLW0603 - see init_tracing
    if _provider is None:
        return
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    SQLAlchemyInstrumentor().uninstrument()
    CeleryInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
    _provider.shutdown()
    _provider = None
