"""Settings, read from ``OPSPOLISH_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

import os
import sys
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "OPSPOLISH_"


class Settings(BaseSettings):
    """Everything opspolish reads from its environment. Unknown ``OPSPOLISH_*`` keys are rejected."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    database_url: SecretStr = SecretStr("postgresql+asyncpg://postgres@127.0.0.1:5432/opspolish")
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    queue_name: str = Field(default="opspolish:queue", min_length=1)
    dedupe_cooldown_s: float = Field(default=900.0, ge=0, allow_inf_nan=False)
    lease_ttl_s: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    reconcile_interval_min: int = Field(default=5, ge=1, le=60)
    reconcile_grace_s: float = Field(default=10.0, ge=0, allow_inf_nan=False)
    reconcile_max_queued_age_s: float = Field(default=86_400.0, gt=0, allow_inf_nan=False)
    job_timeout_s: float = Field(default=300.0, gt=0, allow_inf_nan=False)
    max_attempts: int = Field(default=5, ge=1)
    max_jobs: int = Field(default=10, ge=1)
    provider: str = "opspolish.provider:DirectoryProvider"
    #: Comma-separated modules whose ``@tracked_job`` functions the CLI and the worker register.
    job_modules: str = ""
    log_format: Literal["console", "json"] = Field(
        default_factory=lambda: "console" if sys.stderr.isatty() else "json"
    )

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
