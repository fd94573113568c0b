"""Structured logs: every line about a request carries its id, partition and offset.

Call sites pass context as ``extra={"request_id": ..., "partition": ..., "offset": ...}``; the
text format appends it as ``key=value``, the JSON format (SVD_LOG_JSON=true) as fields.
"""

from __future__ import annotations

import logging
import sys

import orjson

_CONTEXT_KEYS = ("request_id", "topic", "partition", "offset", "attempt", "code", "worker_pid")


def _context(record: logging.LogRecord) -> dict[str, object]:
    return {k: getattr(record, k) for k in _CONTEXT_KEYS if getattr(record, k, None) is not None}


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = _context(record)
        if context:
            line += " " + " ".join(f"{k}={v}" for k, v in context.items())
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def configure(level: str = "INFO", *, json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka logs every reconnect attempt at ERROR; the service reports what matters itself.
    logging.getLogger("aiokafka").setLevel(
        logging.CRITICAL if level.upper() != "DEBUG" else "DEBUG"
    )
