"""JSON logs with structlog: one JSON object per line on stderr, for our loggers, the
libraries' (uvicorn, APScheduler, eventsourcing) and structlog's alike.

Each line has `timestamp` (UTC ISO 8601), `level`, `logger`, `event` and the bound context
(`request_id` inside a request). Configured secrets (API keys, provider credentials, the
database password) are replaced by `***` wherever they would appear.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Iterable

import structlog

_HANDLER_MARK = "_ledger_json_handler"
# A line per job run or per client call would drown the service's own lines.
QUIET_LOGGERS = {"apscheduler": logging.WARNING, "httpx": logging.WARNING,
                 "httpx2": logging.WARNING, "httpcore": logging.WARNING}


def configure_logging(level: str = "info", fmt: str = "json", secrets: Iterable[str] = ()) -> None:
    """Send every log record to stderr as JSON (`fmt="json"`) or for a terminal ("console").
    Idempotent: a second call replaces the handler of the first (tests build many apps)."""
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    shared: list[Any] = [structlog.contextvars.merge_contextvars, structlog.stdlib.add_log_level,
                         structlog.stdlib.add_logger_name, timestamper]
    structlog.configure(
        processors=[*shared, structlog.stdlib.PositionalArgumentsFormatter(),
                    structlog.processors.StackInfoRenderer(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True)
    renderer = (structlog.processors.JSONRenderer(default=str) if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _drop_color,
                    structlog.processors.format_exc_info, Redactor(secrets), renderer])
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name, quiet in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(quiet)


def _drop_color(logger: Any, method: str, event_dict: dict) -> dict:
    """uvicorn passes a terminal-coloured copy of its message as an extra: not for JSON."""
    event_dict.pop("color_message", None)
    return event_dict


class Redactor:
    """A structlog processor replacing each configured secret in string values by `***`."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, logger: Any, method: str, event_dict: dict) -> dict:
        if self.secrets:
            for key, value in event_dict.items():
                event_dict[key] = self._clean(value)
        return event_dict

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self.secrets:
                if secret in value:
                    value = value.replace(secret, "***")
            return value
        if isinstance(value, (list, tuple)):
            return [self._clean(v) for v in value]
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        return value
