"""Settings, read from ``OPSPOLISH_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

import os
import sys
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "OPSPOLISH_"
#: Ten years: longer cooldowns, leases and timeouts are typos, and past ~290,000 years PostgreSQL's interval
#: arithmetic overflows inside the gate (every claim would fail).
MAX_SECONDS = 10 * 365 * 86_400
_DATABASE_SCHEMES = ("postgresql", "postgresql+asyncpg", "postgres")
_REDIS_SCHEMES = ("redis", "rediss", "unix")
#: libpq connection parameters asyncpg does not take: it sends any query parameter it does not know to the server as
#: a setting, and the server refuses the connection ("unrecognized configuration parameter"), for every command.
_LIBPQ_ONLY_PARAMETERS = frozenset({
    "connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout",
    "gssencmode", "gssdelegation", "channel_binding", "requiressl", "sslcompression", "sslsni", "sslcertmode",
    "requirepeer", "require_auth", "load_balance_hosts", "fallback_application_name", "hostaddr", "replication",
    "options",
})


def _check_url(value: SecretStr, schemes: tuple[str, ...]) -> SecretStr:
    """A URL opspolish can connect with: one of ``schemes`` and a port in range (never echoes the URL: it may hold a
    password)."""
    try:
        parts = urlsplit(value.get_secret_value())
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({str(exc).split(':')[0]})") from None
    if parts.scheme.lower() not in schemes:
        raise ValueError(f"scheme must be one of {', '.join(s + '://' for s in schemes)}, got {parts.scheme!r}")
    return value


class Settings(BaseSettings):
    """Everything opspolish reads from its environment. Unknown ``OPSPOLISH_*`` keys are rejected."""

    # hide_input_in_errors: a refused URL is not quoted back (input_value=...) with its password in the text of the
    # ValidationError that arq's CLI and library callers print whole.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True, hide_input_in_errors=True)

    database_url: SecretStr = SecretStr("postgresql+asyncpg://postgres@127.0.0.1:5432/opspolish")
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    queue_name: str = Field(default="opspolish:queue", min_length=1)
    dedupe_cooldown_s: float = Field(default=900.0, ge=0, le=MAX_SECONDS, allow_inf_nan=False)
    lease_ttl_s: float = Field(default=60.0, ge=0.1, le=MAX_SECONDS, allow_inf_nan=False)
    reconcile_interval_min: int = Field(default=5, ge=1, le=60)
    #: How often a worker refreshes its health key in Redis (arq's ``health_check_interval``). The key lives one
    #: second longer, so ``doctor`` sees a worker that died as gone within that; arq's default is an hour.
    worker_health_s: float = Field(default=60.0, ge=1, le=3_600, allow_inf_nan=False)
    #: How long a worker keeps retrying Redis while it is away (each command, with a backoff capped at 1 s) before it
    #: gives up and exits; 0: at the first error, as arq alone does. The CLI and dispatch never wait: they fail at once.
    redis_retry_s: float = Field(default=60.0, ge=0, le=3_600, allow_inf_nan=False)
    reconcile_grace_s: float = Field(default=10.0, ge=0, le=MAX_SECONDS, allow_inf_nan=False)
    reconcile_max_queued_age_s: float = Field(default=86_400.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    job_timeout_s: float = Field(default=300.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    max_attempts: int = Field(default=5, ge=1, le=1_000)
    max_jobs: int = Field(default=10, ge=1, le=10_000)
    provider: str = "opspolish.provider:DirectoryProvider"
    #: Comma-separated modules whose ``@tracked_job`` functions the CLI, the worker and dispatch register.
    job_modules: str = ""
    log_format: Literal["console", "json"] = Field(
        default_factory=lambda: "console" if sys.stderr.isatty() else "json"
    )

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: SecretStr) -> SecretStr:
        value = _check_url(value, _DATABASE_SCHEMES)
        # Without one, `db upgrade` has nothing to create and every other command lands in whatever database the
        # server picks (named after the user), far from the ledger.
        if not urlsplit(value.get_secret_value()).path.strip("/"):
            raise ValueError("names no database (end it with /DBNAME, e.g. .../opspolish)")
        query = parse_qs(urlsplit(value.get_secret_value()).query, keep_blank_values=True)
        unsupported = sorted(set(query) & _LIBPQ_ONLY_PARAMETERS)
        if unsupported:
            raise ValueError(f"?{unsupported[0]}= is a libpq parameter the asyncpg driver does not take (the server "
                             "would refuse every connection); remove it (connecting is bounded at 10 s already)")
        return value

    @field_validator("reconcile_interval_min")
    @classmethod
    def _divides_the_hour(cls, value: int) -> int:
        # arq's cron runs at fixed minutes of the hour: with 7, passes would come at :56 and again at :00.
        if 60 % value:
            raise ValueError(f"must divide 60 (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30 or 60), got {value}: the reconcile "
                             "cron runs at fixed minutes of each hour, so another value gives uneven gaps")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr) -> SecretStr:
        value = _check_url(value, _REDIS_SCHEMES)
        parts = urlsplit(value.get_secret_value())
        database = parts.path.strip("/")
        if parts.scheme.lower() in ("redis", "rediss") and database and not database.isdigit():
            # arq reads it with int() when it connects: a ValueError then, at exit 1, naming nothing
            raise ValueError("the database after the host must be a number (redis://host:6379/0)")
        for db in parse_qs(parts.query).get("db", []):  # read before the path, with int() too
            if not db.isdigit():
                raise ValueError(f"?db= must be a database number, got {db!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_env_keys(cls, data: Any) -> Any:
        known = {ENV_PREFIX + name.upper() for name in cls.model_fields}
        unknown = sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return data

    @property
    def heartbeat_interval_s(self) -> float:
        """A lease is refreshed three times per TTL, so one late beat never makes it stale."""
        return self.lease_ttl_s / 3

    def with_database(self, name: str) -> Settings:
        """The same settings pointed at another database on the same server (tests, tools)."""
        from sqlalchemy.engine import make_url

        url = make_url(self.database_url.get_secret_value()).set(database=name)
        return self.model_copy(update={"database_url": SecretStr(url.render_as_string(hide_password=False))})
