"""Log lines, plain or JSON, each carrying the request id and trace id of the call it serves.

Library modules only call :mod:`logging`; the entrypoint calls :func:`configure` once. The
request id is a context variable: the gateway sets it for each REST request from ``x-request-id``
(or makes one), the typed clients pass it on in the same gRPC metadata key, and a service reads it
from there for the lines it logs about a failed call; the trace id is the current span's when
tracing is on.

    {"time": "2026-11-22T10:00:00.123Z", "level": "WARNING", "logger": "gateway.app",
     "message": "...", "request_id": "5f2c-000042", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}
"""

from __future__ import annotations

import contextvars
import logging
import time
from typing import Any

import orjson

from opea_grpc import telemetry
from opea_grpc.config import ConfigError

#: The request being served ("" outside a request).
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("opea_request_id", default="")

#: The gRPC metadata key (and HTTP header) that carries it.
REQUEST_ID_KEY = "x-request-id"

FORMATS = ("plain", "json")


def trace_ids() -> tuple[str, str]:
    """The current trace and span ids in hex, or empty strings without a recording span."""
    if telemetry.tracer is None:
        return "", ""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return "", ""
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


class _Context(logging.Filter):
    """Puts ``request_id`` and ``trace_id`` on every record (empty outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.trace_id, record.span_id = trace_ids()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; exceptions as a ``traceback`` string field."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "trace_id", "span_id"):
            value = getattr(record, key, "")
            if value:
                line[key] = value
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


class PlainFormatter(logging.Formatter):
    """``time LEVEL logger message [request_id=... trace_id=...]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        rid, tid = getattr(record, "request_id", ""), getattr(record, "trace_id", "")
        if rid:
            text += f" request_id={rid}"
        if tid:
            text += f" trace_id={tid}"
        return text


def configure(level: str = "INFO", fmt: str = "plain") -> None:
    """Send every log line to standard error, in ``fmt`` (plain or json), from ``level`` up."""
    if fmt not in FORMATS:
        raise ConfigError(
            f"OPEA_LOG_FORMAT: log format {fmt!r}: expected one of {', '.join(FORMATS)}"
        )
    handler = logging.StreamHandler()
    handler.addFilter(_Context())
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
