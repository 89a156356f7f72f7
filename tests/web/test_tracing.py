"""Opt-in traces: one trace spans the HTTP request, the publish and the task in a worker.

The web side runs in this process with the SDK's in-memory exporter; the worker is a
real ``celery worker`` process exporting over OTLP/HTTP to a small receiver started here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from shared import tracing
from shared.settings import Settings
from tests.conftest import WorkerProcess, wait_until
from tests.web.catalog_helpers import clear_cache
from tests.web.conftest import Tokens, build_app, close_app, queued_message
from tests.web.test_metrics import metrics_settings  # noqa: F401 - a Redis database of its own

pytestmark = pytest.mark.worker


class _Receiver(BaseHTTPRequestHandler):
    spans: list[Any]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.server.spans.extend(scope.spans)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[Any]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.spans = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", server.spans  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


@pytest.fixture
def traced_settings(
    metrics_settings: Settings,  # noqa: F811
    otlp_receiver: tuple[str, list[Any]],
) -> Settings:
    return metrics_settings.model_copy(update={"otel_exporter_otlp_endpoint": otlp_receiver[0]})


def test_unset_endpoint_loads_nothing(settings: Settings) -> None:
    assert tracing.init_tracing(settings, "web") is None


def test_every_cached_read_has_its_span(
    traced_settings: Settings, tokens: Tokens, redis_url: str
) -> None:
    """With tracing on, L1 hits go through Flask (web.fastpath is not installed), so each
    request still has its server span."""
    clear_cache(redis_url)
    memory = InMemorySpanExporter()
    tracing.init_tracing(traced_settings, "web", exporter=memory)
    app = build_app(traced_settings)
    try:
        client = app.test_client()
        for _ in range(3):
            assert client.get("/api/v1/features", headers=tokens.read.headers).status_code == 200
    finally:
        close_app(app)
        spans = memory.get_finished_spans()
        tracing.shutdown_tracing()
    served = [s.name for s in spans if s.kind == SpanKind.SERVER]
    assert served == ["GET /api/v1/features"] * 3


def test_one_trace_from_request_through_publish_to_task(
    traced_settings: Settings,
    tokens: Tokens,
    otlp_receiver: tuple[str, list[Any]],
    tmp_path: Path,
) -> None:
    memory = InMemorySpanExporter()
    tracing.init_tracing(traced_settings, "web", exporter=memory)
    app = build_app(traced_settings)
    try:
        response = app.test_client().post("/api/v1/canaries", json={}, headers=tokens.write.headers)
        assert response.status_code == 202
        job_id = response.get_json()["id"]
    finally:
        close_app(app)
        spans = memory.get_finished_spans()
        tracing.shutdown_tracing()

    (server,) = [s for s in spans if s.kind == SpanKind.SERVER]
    assert server.name == "POST /api/v1/canaries"
    trace_id = server.context.trace_id
    assert all(s.context.trace_id == trace_id for s in spans)
    (publish,) = [s for s in spans if s.kind == SpanKind.PRODUCER]
    assert publish.parent is not None
    queries = [
        s for s in spans if s.kind == SpanKind.CLIENT and "db.system" in (s.attributes or {})
    ]
    assert queries, [s.name for s in spans]
    assert {s.parent.span_id for s in queries if s.parent} == {server.context.span_id}
    # The trace context rides in the message headers.
    broker = redis.Redis.from_url(traced_settings.redis_url or "")
    traceparent = queued_message(broker, job_id)["headers"]["traceparent"]
    broker.close()
    assert traceparent.split("-")[1] == f"{trace_id:032x}"

    # A real worker continues the trace: its task span is the publish span's child.
    endpoint, received = otlp_receiver
    worker = WorkerProcess(
        traced_settings,
        tmp_path / "worker.log",
        extra_env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint},
    )
    try:
        worker.wait_ready()

        def task_span() -> Any:
            return next(
                (
                    s
                    for s in received
                    if s.kind == s.SPAN_KIND_CONSUMER and s.trace_id == trace_id.to_bytes(16, "big")
                ),
                None,
            )

        run = wait_until(task_span, timeout=60, interval=0.5)
    finally:
        worker.stop()
    assert run.parent_span_id == publish.context.span_id.to_bytes(8, "big")
    assert "conveyor.canary.run" in run.name
