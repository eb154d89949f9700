"""structlog configuration. Only entry points (CLI, worker) call :func:`configure_logging`."""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import structlog
from arq.utils import truncate

from opspolish.fingerprint import is_secret_key
from opspolish.sanitize import REDACTED, redact_secrets, sanitize_message

_PLAIN = (int, float, bool, type(None))


@functools.lru_cache(maxsize=4096)
def _sanitized(text: str) -> str:
    return sanitize_message(text)


#: Containers nested deeper than this in a logged value are logged as ``TOO_DEEP``. A value that contains itself (a
#: dict holding itself, a list appended to itself) used to recurse until RecursionError, raised out of the logging
#: call: a job body's log line then failed the run.
MAX_LOG_DEPTH = 32
TOO_DEEP = "[nested too deep]"


def _scrub_value(value: Any, secret: bool, depth: int = 0) -> Any:
    if type(value) in _PLAIN:  # numbers, flags and None carry no secret text (only a secret key redacts them)
        return REDACTED if secret and value is not None and type(value) is not bool else value
    if secret:
        return REDACTED
    if isinstance(value, str):
        # The same short values (job types, outcomes, tenant ids) recur on every line: sanitize each once.
        return _sanitized(value) if len(value) <= 200 else sanitize_message(value)
    if isinstance(value, dict | Mapping | list | tuple | set | frozenset) and depth >= MAX_LOG_DEPTH:
        return TOO_DEEP
    if isinstance(value, dict | Mapping):  # nested values too: a body logging its inputs logs their secrets
        return {_scrub_key(k): _scrub_value(v, isinstance(k, str) and is_secret_key(k), depth + 1)
                for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub_value(v, False, depth + 1) for v in value]
    # Anything else (an exception, a pydantic model, bytes, a UUID) reached the renderer as its repr, unsanitized:
    # an exception's text or a model's fields carried DSN passwords and tokens into the line. Its repr, sanitized.
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not take the log line down
        return f"<{type(value).__name__}>"
    return sanitize_message(text)


def _scrub_key(key: Any) -> Any:
    if isinstance(key, str):  # keys of logged mappings are text from anywhere too (a URL as a dict key)
        return _sanitized(key) if len(key) <= 200 else sanitize_message(key)
    return key if type(key) in _PLAIN else _scrub_value(key, False)


def _scrub(_: Any, __: str, event_dict: structlog.types.EventDict) -> structlog.types.EventDict:
    """Last line of defence: values in log events are sanitized like reason messages, at any depth, and
    values under secret-named keys are redacted. So is the event itself, which a body may build from its inputs
    (``run.log.warning(f"retrying {url}")`` printed the URL's password). An ``exception`` text is left as
    :func:`_redacted_exception` made it (redacted, its lines kept)."""
    for key, value in event_dict.items():
        if key in _UNSCRUBBED or (key == "exception" and isinstance(value, str)):
            continue
        if key == "event" and isinstance(value, str):
            event_dict[key] = _sanitized(value) if len(value) <= 200 else sanitize_message(value)
            continue
        event_dict[key] = _scrub_value(value, is_secret_key(key))
    return event_dict


_UNSCRUBBED = frozenset({"timestamp", "level"})
_format_exc_info = structlog.processors.ExceptionRenderer()


def _redacted_exception(logger: Any, method_name: str, event_dict: structlog.types.EventDict,
                        ) -> structlog.types.EventDict:
    """``exc_info`` (``log.exception(...)``) as an ``exception`` text, redacted with its lines kept: the console
    format printed the traceback raw, secrets in its message included, and the JSON format printed
    ``"exc_info": true`` and no exception at all."""
    if "exc_info" in event_dict:
        event_dict = _format_exc_info(logger, method_name, event_dict)
    exception = event_dict.get("exception")
    if isinstance(exception, str):
        event_dict["exception"] = redact_secrets(exception)
    return event_dict


class _RedactRecords(logging.Filter):
    """stdlib records get the same redaction: arq logs every job's arguments, secret inputs included."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
            # Formatted once here: the handler's formatter then reuses the (redacted) text instead of
            # interpolating the arguments a second time.
            record.msg, record.args = redact_secrets(message), None
            if record.exc_info and not record.exc_text:
                record.exc_text = redact_secrets(logging.Formatter().formatException(record.exc_info))
        except Exception:  # a malformed record is the logging module's to report, not ours to raise
            pass
        return True


#: arq's line for a job that returned (arq.worker.Worker.run_job). Matched exactly: if arq ever words it
#: differently, the filter below simply stops matching and arq's line is printed again.
ARQ_DONE_FORMAT = "%6.2fs \u2190 %s \u25cf %s"


class _OneLinePerRun(logging.Filter):
    """Drops arq's "← job ●" line for tracked job types: their ``run_completed`` (or ``run_skipped`` ...) event
    already says the same once, as structured data with the run id, outcome, counts and duration. arq's start
    line and all its retry, failure and warning lines stay. A log line cost ~60 us of a busy worker's loop on an
    earlier VM, a tenth of a tracked no-op job there (README, Logs): printing each run's end twice was the dearest
    line we had."""

    def __init__(self, job_types: Iterable[str]) -> None:
        super().__init__()
        self.suffixes = tuple(f":{t}" for t in job_types)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != ARQ_DONE_FORMAT or not self.suffixes:
            return True
        args = record.args
        ref = args[1] if isinstance(args, tuple) and len(args) == 3 else None
        return not (isinstance(ref, str) and ref.endswith(self.suffixes))


#: How much of a job's arguments is redacted for arq's start line, which shows 80 characters of them: the whole of a
#: large input (1,500 policy ids and a URL) took 48 ms of the worker's loop per job.
ARQ_ARGS_REDACTED_CHARS = 4096


def _redacted_job_arguments(args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    """arq's ``args_to_string`` (its start line's ``job(arguments)``), redacted before it is cut to arq's 80
    characters."""
    parts = [repr(arg) for arg in args] + [f"{key}={value!r}" for key, value in sorted(kwargs.items())]
    return truncate(redact_secrets(", ".join(parts)[:ARQ_ARGS_REDACTED_CHARS]))


def redact_job_arguments_before_arq_cuts_them() -> None:
    """arq cuts a job's arguments to 80 characters for its start line before any log filter sees the line: a
    credential cut short no longer had the shape redaction knows (a URL's password cut before its ``@``), and its
    first characters were printed. arq's worker gets the arguments redacted whole, then cut. Idempotent."""
    import arq.worker

    arq.worker.args_to_string = _redacted_job_arguments  # type: ignore[attr-defined]


def log_runs_once(job_types: Iterable[str]) -> None:
    """For a worker entry point: arq's completion line of ``job_types`` gives way to opspolish's own event."""
    arq_worker = logging.getLogger("arq.worker")
    for old in [f for f in arq_worker.filters if isinstance(f, _OneLinePerRun)]:
        arq_worker.removeFilter(old)
    arq_worker.addFilter(_OneLinePerRun(job_types))


class _JsonLine:
    """The JSON format's steps after ``merge_contextvars`` in one processor: ``level`` (as ``add_log_level``),
    ``timestamp`` (ISO 8601 in UTC with microseconds, ``2026-12-03T19:56:05.123456Z``), :func:`_scrub`, then the text
    from one prepared encoder. A worker writes a line per run, and in the benchmark's drains that line cost more than
    its warm timing says (docs/performance.md): as four processors (TimeStamper's datetime, a new JSONEncoder per
    line) the ``run_completed`` line took 35 us warm, and 23 us this way."""

    def __init__(self) -> None:
        self.encode = json.JSONEncoder(default=_json_fallback).encode
        self._second = -1
        self._prefix = ""

    def timestamp(self) -> str:
        second, ns = divmod(time.time_ns(), 1_000_000_000)
        if second != self._second:  # the date and time change once a second: formatted once a second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{ns // 1000:06d}Z"

    def __call__(self, logger: Any, method_name: str, event_dict: structlog.types.EventDict) -> str:
        event_dict = structlog.processors.add_log_level(logger, method_name, event_dict)
        event_dict["timestamp"] = self.timestamp()
        if "exc_info" in event_dict or "exception" in event_dict:
            event_dict = _redacted_exception(logger, method_name, event_dict)
        return self.encode(_scrub(logger, method_name, event_dict))


class _JsonRecords(logging.Formatter):
    """stdlib records (arq's lines: a job's start, retries, failures, cron) as JSON lines in the JSON format, so that
    a log pipeline reading the worker's output gets one JSON object per line: ``event`` (the record's message, already
    redacted by :class:`_RedactRecords`, with its redacted traceback after a newline when it has one), ``logger``,
    ``level`` and ``timestamp``."""

    def __init__(self) -> None:
        super().__init__()
        self._line = _JsonLine()

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_secrets(self.formatException(record.exc_info))
        if record.exc_text:  # in the event, which is not cut to one line: a traceback is what a failure line is for
            text = f"{text}\n{record.exc_text}"
        # Already redacted by _RedactRecords, lines kept: the traceback is what a failure line is for (sanitized as
        # an event, it was cut off).
        return self._line.encode({"event": text, "logger": record.name, "level": record.levelname.lower(),
                                  "timestamp": self._line.timestamp()})


def _json_fallback(value: Any) -> Any:
    # _scrub leaves only JSON types; a key that is not text (a bound tuple key, say) still renders, as its repr.
    return sanitize_message(repr(value))


def configure_logging(log_format: str, *, verbose: bool = False) -> None:
    """Configure structlog (and stdlib logging, which arq uses) for a process entry point."""
    level = logging.DEBUG if verbose else logging.INFO
    steps: list[Any] = (
        [structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True),
         _redacted_exception, _scrub, structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
        if log_format == "console"
        else [_JsonLine()]
    )
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *steps],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),  # PrintLogger's output, without print()
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    arq_logger = logging.getLogger("arq")
    if arq_logger.handlers:  # arq's CLI gave it its own handler: do not print each line a second time via root
        arq_logger.propagate = False
    for handler in (*logging.getLogger().handlers, *arq_logger.handlers):
        if not any(isinstance(f, _RedactRecords) for f in handler.filters):
            handler.addFilter(_RedactRecords())
        if log_format == "json":  # arq's lines too: one JSON object per line, none in plain text between them
            handler.setFormatter(_JsonRecords())
    if not verbose:
        logging.getLogger("alembic").setLevel(logging.WARNING)
