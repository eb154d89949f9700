"""Alembic environment (async). The URL comes from opspolish settings, never from alembic.ini."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from opspolish.db import MIGRATION_LOCK_KEY, create_engine
from opspolish.models import Base
from opspolish.settings import Settings

target_metadata = Base.metadata


def _settings() -> Settings:
    settings = context.config.attributes.get("opspolish_settings")
    return settings if isinstance(settings, Settings) else Settings()


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        # Before alembic reads alembic_version: a second process waits here for the first to commit, then
        # reads the version it left (READ COMMITTED: a fresh snapshot per statement) and has nothing to do.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()


async def _run_async() -> None:
    engine = create_engine(_settings())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("opspolish migrations run online only (opspolish db upgrade)")
asyncio.run(_run_async())
