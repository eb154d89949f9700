"""structlog configuration. Only entry points (CLI, worker) call :func:`configure_logging`."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from opspolish.sanitize import sanitize_message


def _scrub(_: Any, __: str, event_dict: structlog.types.EventDict) -> structlog.types.EventDict:
    """Last line of defence: string values in log events are sanitized like reason messages."""
    for key, value in event_dict.items():
        if isinstance(value, str) and key not in {"event", "timestamp", "level"}:
            event_dict[key] = sanitize_message(value)
    return event_dict


def configure_logging(log_format: str, *, verbose: bool = False) -> None:
    """Configure structlog (and stdlib logging, which arq uses) for a process entry point."""
    level = logging.DEBUG if verbose else logging.INFO
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if log_format == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _scrub,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not verbose:
        logging.getLogger("alembic").setLevel(logging.WARNING)
