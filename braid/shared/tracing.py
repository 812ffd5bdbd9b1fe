"""OpenTelemetry traces across services: a join is one trace from signal through router to media.

The context travels in gRPC metadata (W3C `traceparent`). Off by default; `telemetry.otel_exporter`
turns it on with the console or an OTLP/HTTP exporter.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

tracer = trace.get_tracer("braid")
_provider = None


def setup_tracing(exporter: str, endpoint: str = "", service_name: str = "braid", node_id: str = "") -> None:
    """Install a tracer provider for this process; a no-op when `exporter` is empty."""
    global _provider
    if not exporter or _provider is not None:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": service_name, "braid.node_id": node_id}))
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    _provider = provider


def shutdown_tracing() -> None:
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def outgoing_metadata() -> list[tuple[str, str]]:
    """gRPC metadata carrying the current span's context to the callee."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


def incoming_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> otel_context.Context:
    """The caller's trace context from gRPC invocation metadata."""
    carrier = {}
    for key, value in metadata or ():
        if isinstance(value, str):
            carrier[key.lower()] = value
    return propagate.extract(carrier)


def metadata_of(grpc_context) -> Sequence[tuple[str, str]]:
    try:
        return grpc_context.invocation_metadata() or ()
    except Exception:  # not every test double has metadata
        return ()
