"""Fault injection for the reliability suite: a private Redis server, backend termination, the CLI as a
subprocess, worker log parsing and ledger invariants.

Nothing here touches the shared services beyond the test's own database and queue: Redis faults use a
private ``redis-server`` on a free port, and backends are terminated only in the test's own database.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import SecretStr
from redis.asyncio import Redis
from sqlalchemy.engine import make_url

from opspolish.settings import Settings
from tests.conftest import ROOT, wait_until, worker_env


def free_port() -> int:
    """A TCP port nobody listens on right now (bound, read, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def closed_port() -> int:
    """A loopback port with no server: connections to it are refused at once."""
    return free_port()


class RedisServer:
    """A throwaway ``redis-server`` of this test only: restart or flush it without disturbing anyone."""

    def __init__(self, directory: Path, *, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:  # pragma: no cover - the suite's environment installs it
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.directory = directory
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def settings_for(self, settings: Settings) -> Settings:
        return settings.model_copy(update={"redis_url": SecretStr(self.url)})

    def client(self) -> Redis:
        client: Redis = Redis.from_url(self.url)
        return client

    async def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        async def answers() -> bool:
            client = self.client()
            try:
                return bool(await client.ping())
            except Exception:
                return False
            finally:
                await client.aclose()

        await wait_until(answers, timeout_s=10, interval_s=0.05)

    def stop(self) -> None:
        """Kill the server: everything it held is gone (no persistence)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    async def job_ids(self, queue_name: str) -> set[str]:
        client = self.client()
        try:
            return await queued_job_ids(client, queue_name)
        finally:
            await client.aclose()

    async def restart(self) -> None:
        self.stop()
        await self.start()


class ReplyCutter:
    """A TCP proxy in front of the test's PostgreSQL that can cut a connection right after the server answered a
    statement: the statement committed, and the client never heard so (``cut_reply_containing``). What a network
    blip, a failover or a killed pooler does to a statement in flight, which ``pg_terminate_backend`` (which kills
    the backend before it answers, rolling back) cannot."""

    def __init__(self, settings: Settings) -> None:
        url = make_url(settings.database_url.get_secret_value())
        self.upstream = (url.host or "127.0.0.1", url.port or 5432)
        self.settings = settings
        self.marker: bytes | None = None
        self.cuts = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Settings:
        """Start listening; returns ``settings`` with the database URL through the proxy."""
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        url = make_url(self.settings.database_url.get_secret_value()).set(host="127.0.0.1", port=self.port)
        return self.settings.model_copy(update={"database_url": SecretStr(url.render_as_string(hide_password=False))})

    def cut_reply_containing(self, marker: bytes) -> None:
        """Cut the next server reply that contains ``marker`` (once): neither it nor anything after it arrives."""
        self.marker = marker

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.transport.abort()
            return

        def cut() -> None:
            client_w.transport.abort()
            server_w.transport.abort()

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, replies: bool) -> None:
            try:
                while data := await src.read(65536):
                    if replies and self.marker is not None and self.marker in data:
                        self.marker = None
                        self.cuts += 1
                        cut()
                        return
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort() if dst.transport.is_closing() else dst.close()

        await asyncio.gather(pipe(client_r, server_w, False), pipe(server_r, client_w, True))


async def terminate_backends(conn: asyncpg.Connection, *, query_like: str | None = None,
                             waiting_on_lock: bool = False) -> list[int]:
    """``pg_terminate_backend`` every other backend of *this connection's own database* (optionally only those
    running a statement like ``query_like``, or only those waiting on a lock). Returns their pids."""
    # Inside a transaction pg_stat_activity is a snapshot taken at first access: take a fresh one.
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = await conn.fetch(
        """SELECT pid FROM pg_stat_activity
           WHERE datname = current_database() AND pid <> pg_backend_pid()
             AND ($1::text IS NULL OR query LIKE $1)
             AND (NOT $2 OR (wait_event_type = 'Lock' AND state = 'active'))""",
        query_like, waiting_on_lock,
    )
    pids = [r["pid"] for r in rows]
    for pid in pids:
        await conn.execute("SELECT pg_terminate_backend($1)", pid)
    return pids


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        """Non-empty stderr lines that are not structured log events."""
        return [line for line in self.stderr.splitlines() if line.strip() and not line.startswith("{")]


async def run_cli(settings: Settings, *args: str | bytes, timeout_s: float = 60.0, **env: str) -> CliResult:
    """``python -m opspolish ARGS`` with the test's database, Redis and queue in its environment."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "opspolish", *args, cwd=ROOT, env=worker_env(settings, **{
            "OPSPOLISH_RECONCILE_GRACE_S": str(settings.reconcile_grace_s),
            "OPSPOLISH_MAX_ATTEMPTS": str(settings.max_attempts), **env}),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


async def run_rows(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch("SELECT * FROM operation_runs ORDER BY id")]


async def effects(conn: asyncpg.Connection, tag: str | None = None) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(
        "SELECT * FROM test_effects WHERE $1::text IS NULL OR tag = $1 ORDER BY id", tag)]


def assert_never_concurrent(executions: Sequence[dict[str, Any]]) -> None:
    """No two executions of one run overlap in time (an unfinished one counts as running until the next)."""
    by_run: dict[int, list[dict[str, Any]]] = {}
    for e in executions:
        by_run.setdefault(e["run_id"], []).append(e)
    for run_id, runs in by_run.items():
        ordered = sorted(runs, key=lambda e: e["started_at"])
        for earlier, later in itertools.pairwise(ordered):
            assert earlier["finished_at"] is None or earlier["finished_at"] <= later["started_at"], (
                f"run {run_id}: attempts {earlier['attempt']} and {later['attempt']} overlapped")
            assert earlier["attempt"] < later["attempt"], f"run {run_id}: attempt numbers not increasing"


async def assert_ledger_settled(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """Every run is terminal, and a terminal run is fully written (counts, timestamps, reason when not ok)."""
    rows = await run_rows(conn)
    for r in rows:
        assert r["status"] == "completed", f"run {r['id']} left {r['status']}"
        assert r["summary_counts"] is not None and r["completed_at"] is not None
        if r["outcome"] in ("failed", "skipped", "cancelled", "partially_succeeded"):
            assert r["reason_code"], f"run {r['id']} ended {r['outcome']} without a reason"
            assert r["reason_message"] and "\n" not in r["reason_message"]
    return rows


async def queued_job_ids(redis: Redis, queue_name: str) -> set[str]:
    return {m.decode() for m in await redis.zrange(queue_name, 0, -1)}

