"""Structured logs: every line about a request carries its id, partition and offset.

Call sites pass context as ``extra={"request_id": ..., "partition": ..., "offset": ...}``; the
text format appends it as ``key=value``, the JSON format (SVD_LOG_JSON=true) as fields.

aiokafka logs every reconnect attempt at ERROR, dozens a second while a broker is down. Its
records still reach the "aiokafka" logger's own handlers from WARNING up, where
consumer/broker_events.py turns them into one line per outage; the service's handler prints
them only at SVD_LOG_LEVEL=DEBUG (all of aiokafka's lines then) or when CRITICAL.
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


class QuietAiokafka(logging.Filter):
    """On the service's handler: drops aiokafka's records below CRITICAL (its per-retry lines);
    consumer/broker_events.py reports what they mean, once per event."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_aiokafka = record.name == "aiokafka" or record.name.startswith("aiokafka.")
        return not from_aiokafka or record.levelno >= logging.CRITICAL


def configure(level: str = "INFO", *, json: bool = False) -> None:
    debug = level.upper() == "DEBUG"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    if not debug:
        handler.addFilter(QuietAiokafka())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # WARNING, not CRITICAL: the broker event watcher reads aiokafka's failure records (WARNING
    # and ERROR) on this logger; the filter above keeps them out of the service's log.
    logging.getLogger("aiokafka").setLevel(logging.DEBUG if debug else logging.WARNING)
