"""scripts/ensure_services.py, which `make test` and `make demo` run first: configured services that answer are used
as they are; otherwise throwaway ones start on this machine's loopback, or one line says why not."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from opspolish.settings import Settings
from tests.conftest import ROOT
from tests.reliability.faults import RedisServer, free_port

pytestmark = pytest.mark.timeout(120)
SCRIPT = ROOT / "scripts" / "ensure_services.py"


def ensure(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPSPOLISH_")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env={**clean, **env}, capture_output=True,
                          text=True, timeout=90)


@pytest.fixture
def services_dir() -> Iterator[Path]:
    # Under /tmp itself, not pytest's private tmp_path: as root, PostgreSQL runs as the postgres account, which must
    # reach the directory.
    path = Path("/tmp") / f"opspolish-services-test-{uuid.uuid4().hex[:8]}"
    yield path
    ensure("--dir", str(path), "--stop")
    shutil.rmtree(path, ignore_errors=True)


async def test_a_redis_that_wants_a_password_answers_and_nothing_is_started(
    settings: Settings, tmp_path: Path, services_dir: Path
) -> None:
    # The probe wanted +PONG: a Redis answering -NOAUTH was "down", and the throwaway one could not bind its port.
    server = RedisServer(tmp_path, password="s3cret")
    await server.start()
    try:
        out = await asyncio.to_thread(
            ensure, "--dir", str(services_dir), OPSPOLISH_DATABASE_URL=settings.database_url.get_secret_value(),
            OPSPOLISH_REDIS_URL=server.url)
    finally:
        server.stop()
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
    assert not services_dir.exists()


def test_an_address_elsewhere_that_does_not_answer_is_one_line_and_nothing_is_started(services_dir: Path) -> None:
    out = ensure("--dir", str(services_dir), OPSPOLISH_DATABASE_URL="postgresql://postgres@192.0.2.1:5432/x")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "opspolish: PostgreSQL does not answer at 192.0.2.1:5432; throwaway servers are started only on this "
        "machine's loopback (127.0.0.1), so start it or point OPSPOLISH_DATABASE_URL elsewhere"]
    assert not services_dir.exists()


def test_both_services_that_cannot_be_started_are_named_in_one_line(services_dir: Path) -> None:
    # The PostgreSQL line came alone, and once PostgreSQL was mended the Redis one came next.
    out = ensure("--dir", str(services_dir), OPSPOLISH_DATABASE_URL="postgresql://postgres@192.0.2.1:5432/x",
                 OPSPOLISH_REDIS_URL="redis://192.0.2.1:6379/0")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "opspolish: PostgreSQL does not answer at 192.0.2.1:5432; throwaway servers are started only on this "
        "machine's loopback (127.0.0.1), so start it or point OPSPOLISH_DATABASE_URL elsewhere; and Redis does not "
        "answer at 192.0.2.1:6379; throwaway servers are started only on this machine's loopback (127.0.0.1), so "
        "start it or point OPSPOLISH_REDIS_URL elsewhere"]
    assert not services_dir.exists()


def test_a_throwaway_postgres_that_cannot_start_says_why_in_one_line() -> None:
    if not (shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))):
        pytest.skip("the PostgreSQL server binaries are not installed")
    # A directory the server's account cannot reach: as root, PostgreSQL runs as the postgres account, which a
    # root-only parent keeps out; as anyone else, a parent they cannot write. The line said "runuser failed:
    # CalledProcessError; see .../pg-N.log", a log that did not exist (initdb's output went nowhere).
    parent = Path("/tmp") / f"opspolish-services-closed-{uuid.uuid4().hex[:8]}"
    parent.mkdir(mode=0o700 if os.geteuid() == 0 else 0o500)
    try:
        out = ensure("--dir", str(parent / "svc"),
                     OPSPOLISH_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/x",
                     OPSPOLISH_REDIS_URL="redis://127.0.0.1:6379/0")
    finally:
        os.chmod(parent, 0o700)
        shutil.rmtree(parent, ignore_errors=True)
    assert out.returncode == 1 and out.stdout == "", out
    [line] = out.stderr.strip().splitlines()
    assert "Permission denied" in line and "Traceback" not in line and ".log" not in line, line
    assert line.startswith("opspolish: could not"), line


async def test_throwaway_servers_start_with_the_urls_user_and_stop(services_dir: Path) -> None:
    if shutil.which("redis-server") is None or not (
            shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))):
        pytest.skip("the PostgreSQL and Redis server binaries are not installed")
    pg_port, redis_port = free_port(), free_port()
    dsn = f"postgresql://app@127.0.0.1:{pg_port}/postgres"
    out = await asyncio.to_thread(ensure, "--dir", str(services_dir), OPSPOLISH_DATABASE_URL=dsn,
                                  OPSPOLISH_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0")
    assert out.returncode == 0, out.stderr
    assert [line.split(" at ")[0] for line in out.stdout.splitlines()] == [
        "opspolish: started a throwaway PostgreSQL", "opspolish: started a throwaway Redis"]
    # The URL's user, not a hard-coded postgres: `db upgrade` then failed with 'role "app" does not exist'.
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT current_user") == "app"
    finally:
        await conn.close()
    redis: Redis = Redis.from_url(f"redis://127.0.0.1:{redis_port}/0")
    try:
        assert await redis.ping()
    finally:
        await redis.aclose()
    stopped = await asyncio.to_thread(ensure, "--dir", str(services_dir), "--stop")
    assert stopped.returncode == 0 and len(stopped.stdout.splitlines()) == 2, stopped
    assert not services_dir.exists()
    with pytest.raises(OSError):
        await asyncpg.connect(dsn, timeout=2)
