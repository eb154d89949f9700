"""The per-process runtime: pools built from settings, the lease keeper and in-process metrics."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import structlog
from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, AuthorizationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from opspolish import db
from opspolish.batching import GateBatcher
from opspolish.errors import DbUnavailable, RedisUnavailable
from opspolish.ledger import Ledger
from opspolish.sanitize import describe_exception, sanitize_message
from opspolish.settings import Settings

log = structlog.get_logger("opspolish")


#: The longest pause between two tries of a command while Redis is away (a worker's, see ``redis_settings``).
REDIS_BACKOFF_CAP_S = 1.0
#: At most one ``redis_away`` line per this many seconds per process, however many commands are waiting.
REDIS_AWAY_LOG_EVERY_S = 10.0
_T = TypeVar("_T")


class RideOutRetry(RedisRetry):
    """redis-py's Retry bounded by time, not by a count of tries: a command is tried again, with a backoff capped at
    :data:`REDIS_BACKOFF_CAP_S`, until ``for_s`` have passed since its first failure. (Counted tries nest: a command
    retries its reconnects, which retry their connects, and a count of N tries waited up to N times N.) The first
    failure of an outage logs ``redis_away`` (warning), the first success after it ``redis_back``. Only while
    :attr:`armed`, and never for a refused password.

    One instance is one pool's outage state: redis-py copies a client's retry into each connection, and a copy here is
    the instance itself, so that every connection of the pool shares the outage's window. A worker installs an armed
    one of its own on its pool (:meth:`armed_for`): two workers in one process no longer share "armed" (one stopping
    disarmed the other, which then exited on the next blip) or an outage's window."""

    __slots__ = ("_away_logged", "_away_since", "_for_s", "armed")

    def __init__(self, for_s: float, *, armed: bool = False) -> None:
        # The errors it retries on are the client's retry_on_error (see redis_settings), which redis-py adds to it.
        super().__init__(ExponentialBackoff(cap=REDIS_BACKOFF_CAP_S, base=0.05), -1)
        self._for_s = for_s
        #: Set while a worker is up (from its start-up hook to its stop signal or shutdown): before, arq's own
        #: ``conn_retries`` decide how long a start waits for Redis; after, a stopping worker does not wait for it.
        self.armed = armed
        self._away_since: float | None = None
        self._away_logged = float("-inf")

    def __deepcopy__(self, memo: dict[int, Any]) -> RideOutRetry:
        return self

    @classmethod
    def armed_for(cls, redis: ArqRedis) -> RideOutRetry | None:
        """Install an armed ride-out of its own on ``redis``'s pool (existing connections included) and return it;
        None (nothing changed) when the pool has no ride-out (``OPSPOLISH_REDIS_RETRY_S=0``, a pool of the caller's)."""
        current = redis.get_retry()
        if not isinstance(current, cls):
            return None
        armed = cls(current._for_s, armed=True)
        armed._supported_errors = current._supported_errors  # set_retry does not hand the errors to existing ones
        redis.set_retry(armed)
        return armed

    async def call_with_retry(self, do: Callable[[], Awaitable[_T]], fail: Callable[[Any], Any]) -> _T:
        failures = 0  # the backoff is stateless: no reset
        while True:
            try:
                result = await do()
            except self._supported_errors as error:
                if not self.armed or isinstance(error, AuthenticationError | AuthorizationError):
                    await fail(error)  # a wrong password does not get better with time
                    raise
                failures += 1
                now = time.monotonic()
                if failures == 1:
                    self._note_away(now, error)
                await fail(error)
                backoff = self._backoff.compute(failures)
                # One window per outage, from its first failure: a command's retries nest its reconnect's, each with a
                # window of its own, and the worker gave up after twice the setting.
                started = self._away_since if self._away_since is not None else now
                if now + backoff > started + self._for_s:
                    raise
                await asyncio.sleep(backoff)
                continue
            if failures and self._away_since is not None:
                away_s = time.monotonic() - self._away_since
                self._away_since = None
                log.info("redis_back", away_s=round(away_s, 3))
            return result

    def _note_away(self, now: float, error: BaseException) -> None:
        if self._away_since is None:
            self._away_since = now
        if now - self._away_logged >= REDIS_AWAY_LOG_EVERY_S:
            self._away_logged = now
            log.warning("redis_away", reason_code="redis.unavailable", message=describe_exception(error),
                        retry_for_s=self._for_s)


#: How long a worker waits for a Redis reply once Redis has stopped answering (arq sets no read timeout): a Redis
#: that holds connections open and never replies (frozen, SIGSTOPped, a network that drops packets) held a worker for
#: ever, deaf to SIGTERM. Not set while Redis answers: redis-py then wraps every send in a task of its own and every
#: read in a timer, 160 us of a worker's CPU per job.
REDIS_READ_TIMEOUT_S = 10.0
#: How often the worker's watchdog pings Redis, on a connection of its own.
REDIS_WATCH_INTERVAL_S = 5.0


def _set_read_timeout(redis: ArqRedis, timeout_s: float | None) -> None:
    """The read timeout of the pool's connections, new and existing (redis-py keeps it on each connection)."""
    pool = redis.connection_pool
    pool.connection_kwargs["socket_timeout"] = timeout_s
    for conn in (*getattr(pool, "_available_connections", ()), *getattr(pool, "_in_use_connections", ())):
        conn.socket_timeout = timeout_s


async def watch_redis_replies(redis: ArqRedis, settings: Settings) -> None:
    """A worker's watchdog: while Redis accepts connections but does not reply, its pool's commands get a read
    timeout and those waiting are cut (their connections closed), so that the worker rides the silence out like an
    outage, and gives up past ``OPSPOLISH_REDIS_RETRY_S``; once Redis replies again, the timeout goes. Logs
    ``redis_not_answering`` (warning)."""
    from redis.asyncio import Redis

    probe = Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=REDIS_READ_TIMEOUT_S,
                           socket_connect_timeout=2)
    silent = False
    try:
        while True:
            await asyncio.sleep(REDIS_WATCH_INTERVAL_S)
            try:
                await probe.ping()
            except (RedisTimeoutError, TimeoutError) as exc:
                if not silent:
                    silent = True
                    log.warning("redis_not_answering", reason_code="redis.unavailable", message=describe_exception(exc),
                                timeout_s=REDIS_READ_TIMEOUT_S)
                    _set_read_timeout(redis, REDIS_READ_TIMEOUT_S)
                    for conn in list(getattr(redis.connection_pool, "_in_use_connections", ())):
                        with contextlib.suppress(Exception):
                            await conn.disconnect(nowait=True)
                continue
            except Exception as exc:  # away, refused...: the pool's own commands ride that out
                if not is_redis_error(exc):
                    raise
                continue
            if silent:
                silent = False
                _set_read_timeout(redis, None)
    finally:
        with contextlib.suppress(Exception):
            await probe.aclose()


def redis_settings(settings: Settings, *, conn_retries: int = 5, ride_out: bool = False) -> RedisSettings:
    """arq's Redis settings. ``ride_out`` (a worker's): each command is tried again while Redis is away, for
    ``settings.redis_retry_s`` from its first failure (see :class:`RideOutRetry`). arq's poll loop catches no Redis
    error: without it, half a second without Redis and every worker exited, the runs in its hands left running until
    reconcile called them orphaned."""
    rs = RedisSettings.from_dsn(settings.redis_url.get_secret_value())
    rs.conn_retries = conn_retries
    rs.conn_timeout = 2
    if ride_out and settings.redis_retry_s > 0:
        rs.retry = RideOutRetry(settings.redis_retry_s)
        # OSError: a connection refused while Redis is away is raised as such inside the retried connect.
        rs.retry_on_error = [RedisConnectionError, RedisTimeoutError, OSError]
        rs.retry_on_timeout = True
    return rs


def is_redis_error(exc: BaseException) -> bool:
    """Redis out of reach or refusing: a socket error, a timeout, or any of redis-py's own exceptions."""
    return isinstance(exc, OSError | ConnectionError | TimeoutError) or type(exc).__module__.startswith("redis")


#: How long a client's pool (the CLI's, ``opspolish.connect()``'s) waits for Redis to answer, at connect and then for
#: each reply: a Redis that accepts connections and never answers (frozen, SIGSTOPped, a dead peer behind a proxy) held
#: ``opspolish dispatch``, ``reconcile`` and ``doctor`` for ever, a dispatched run left queued with no job. A worker's
#: own pool has no such timeout: its watchdog sets one only while Redis is silent (see ``watch_redis_replies``).
REDIS_CLIENT_TIMEOUT_S = 10.0


async def connect_redis(settings: Settings, *, conn_retries: int = 0) -> ArqRedis:
    """An arq Redis pool whose commands wait at most :data:`REDIS_CLIENT_TIMEOUT_S` for a reply; an unreachable or
    silent server raises :class:`RedisUnavailable` (no password in it)."""
    timeout_s = REDIS_CLIENT_TIMEOUT_S
    try:
        async with asyncio.timeout(timeout_s * (conn_retries + 1) + 2 * conn_retries):
            redis = await create_pool(redis_settings(settings, conn_retries=conn_retries),
                                      default_queue_name=settings.queue_name)
    except TimeoutError as exc:
        raise RedisUnavailable(f"cannot connect to Redis: no answer within {timeout_s:g} s") from exc
    except Exception as exc:  # redis-py raises its own ConnectionError hierarchy
        if is_redis_error(exc):
            raise _unreachable(settings, exc) from exc
        raise
    _set_read_timeout(redis, timeout_s)
    return redis


def _unreachable(settings: Settings, exc: BaseException) -> RedisUnavailable:
    """What the client said (`Error 111 connecting to 127.0.0.1:6390. Connection refused.`, an authentication
    failure...), sanitized, with the URL's password redacted by value too."""
    password = urlsplit(settings.redis_url.get_secret_value()).password
    said = sanitize_message(describe_exception(exc), extra_secrets=(password,) if password else ())
    return RedisUnavailable(f"cannot connect to Redis: {said}")


@dataclass(eq=False)
class Lease:
    run_id: int
    owner: uuid.UUID
    task: asyncio.Task[Any] | None
    in_body: bool = False
    lost: bool = False
    #: The delivery's bound logger (run_id, type, tenant_id, job_id, job_try): its run_lease_lost line says whose.
    log: Any = None


class LeaseKeeper:
    """Refreshes every lease this process holds, in one statement per interval.

    A lease the database no longer confirms was taken over: its body is cancelled and the
    delivery writes nothing more (the completion write is fenced on ``lease_owner`` anyway).
    """

    def __init__(self, ledger: Ledger, interval_s: float) -> None:
        self.ledger = ledger
        self.interval_s = interval_s
        #: By run and owner: a process may hold a stale delivery of a run beside the one that took it over.
        self.leases: dict[tuple[int, uuid.UUID], Lease] = {}
        self._task: asyncio.Task[None] | None = None

    def hold(self, run_id: int, owner: uuid.UUID, bound_log: Any = None) -> Lease:
        lease = Lease(run_id, owner, asyncio.current_task(), log=bound_log)
        self.leases[(run_id, owner)] = lease
        return lease

    def drop(self, lease: Lease) -> None:
        if self.leases.get((lease.run_id, lease.owner)) is lease:
            del self.leases[(lease.run_id, lease.owner)]

    async def beat(self) -> None:
        held = list(self.leases.values())
        if not held:
            return
        alive = await self.ledger.heartbeat([(lease.run_id, lease.owner) for lease in held])
        for lease in held:
            key = (lease.run_id, lease.owner)
            if key not in alive and self.leases.get(key) is lease:
                lease.lost = True
                (lease.log or log.bind(run_id=lease.run_id)).warning("run_lease_lost", reason_code="dedupe.overlap")
                if lease.in_body and lease.task is not None:
                    lease.task.cancel()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            run_ids = sorted({lease.run_id for lease in self.leases.values()})
            try:
                await self.beat()
            except DbUnavailable as exc:  # one line for the beat: the runs whose leases it could not extend
                log.warning("heartbeat_failed", run_ids=run_ids, reason_code=exc.reason_code, message=exc.message)
            except Exception as exc:  # any other refusal (a statement_timeout, a trigger...): the next beat tries again
                # It ended the keeper: no beat ever again, and every lease of the worker went stale, silently.
                log.warning("heartbeat_failed", run_ids=run_ids, reason_code="internal.unexpected",
                            message=sanitize_message(describe_exception(exc)))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="opspolish-lease-keeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


@dataclass(eq=False)
class Runtime:
    """What tracked jobs, dispatch and reconcile need, built once per process from settings."""

    settings: Settings
    pool: asyncpg.Pool
    redis: ArqRedis | None
    provider: Any = None
    metrics: Counter[str] = field(default_factory=Counter)
    leases: LeaseKeeper = field(init=False)
    _owns_redis: bool = False
    #: Set when the worker is told to stop (SIGTERM/SIGINT): a delivery that starts after it goes back to the queue
    #: untouched (see ``opspolish.worker``).
    stopping: bool = False

    def __post_init__(self) -> None:
        self.ledger = Ledger(self.pool)
        # Claims and completions of concurrent jobs share statements, on the gate's own connection.
        self.gate = GateBatcher(lambda: db.connect_gate(self.settings), self.ledger)
        self.leases = LeaseKeeper(self.ledger, self.settings.heartbeat_interval_s)
        self.secrets = db.secrets_of(self.settings)

    @classmethod
    async def start(cls, settings: Settings, *, redis: ArqRedis | None = None, connect_to_redis: bool = True,
                    pool_size: int | None = None) -> Runtime:
        size = pool_size or max(4, settings.max_jobs + 2)
        pool = await db.create_pool(settings, min_size=1, max_size=size)
        owns = False
        if redis is None and connect_to_redis:
            try:
                redis = await connect_redis(settings)
            except BaseException:
                await pool.close()
                raise
            owns = True
        from opspolish.provider import load_provider

        rt = cls(settings=settings, pool=pool, redis=redis, _owns_redis=owns)
        rt.provider = load_provider(settings.provider, rt)
        rt.leases.start()
        return rt

    async def close(self) -> None:
        await self.leases.stop()
        await self.gate.close()
        if self._owns_redis and self.redis is not None:
            await self.redis.aclose()
        await self.pool.close()

    def require_redis(self) -> ArqRedis:
        if self.redis is None:
            raise RedisUnavailable("no Redis connection in this runtime")
        return self.redis


@contextlib.asynccontextmanager
async def connect(settings: Settings | None = None, **kwargs: Any) -> AsyncIterator[Runtime]:
    """``async with opspolish.connect() as rt:`` - a runtime for dispatching and reading the ledger."""
    rt = await Runtime.start(settings or Settings(), **kwargs)
    try:
        yield rt
    finally:
        await rt.close()
