#!/usr/bin/env python3
"""Make sure PostgreSQL and Redis answer, for `make test` and `make demo` (stdlib only).

1. The configured ones (OPSPOLISH_DATABASE_URL / OPSPOLISH_REDIS_URL, else the defaults) answer: done. Any reply
   counts: a Redis that wants a password (NOAUTH) answers too.
2. Else, when the server binaries are installed and the address is on this machine (loopback TCP), start throwaway
   ones on the configured port (data under $TMPDIR/opspolish-services, fsync off, nothing kept from run to run), with
   the URL's user as PostgreSQL's superuser, and wait until they answer. They keep running for the next command;
   `--stop` (`make services-stop`) stops them.
3. Else stop with one line: what to install, or why nothing was started (an address elsewhere, a server that would
   not start and its log).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

BASE = os.path.join(tempfile.gettempdir(), "opspolish-services")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Endpoint:
    host: str  # a TCP host, or "" for a Unix socket
    port: int
    socket_path: str = ""
    user: str = ""

    def __str__(self) -> str:
        return self.socket_path or f"{self.host}:{self.port}"

    @property
    def local_tcp(self) -> bool:
        return not self.socket_path and self.host in LOOPBACK


def postgres_endpoint(url: str) -> Endpoint:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    port = parts.port or int((query.get("port") or ["5432"])[0])
    user = unquote(parts.username or "") or "postgres"
    host = parts.hostname or (query.get("host") or [""])[0]
    if host.startswith("/"):  # libpq's socket directory
        return Endpoint("", port, os.path.join(host, f".s.PGSQL.{port}"), user)
    return Endpoint(host or "127.0.0.1", port, user=user)


def redis_endpoint(url: str) -> Endpoint:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return Endpoint("", 0, parts.path)
    return Endpoint(parts.hostname or "127.0.0.1", parts.port or 6379)


def answers(at: Endpoint, probe: bytes | None = None, replies: tuple[bytes, ...] = ()) -> bool:
    """Whether something listens at ``at`` (and, with ``probe``, replies with one of ``replies``)."""
    try:
        if at.socket_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(1.0)
            sock.connect(at.socket_path)
        else:
            sock = socket.create_connection((at.host, at.port), timeout=1.0)
        with sock:
            if probe is None:
                return True
            sock.sendall(probe)
            sock.settimeout(2.0)
            return sock.recv(64).startswith(replies)
    except OSError:
        return False


def redis_answers(at: Endpoint) -> bool:
    # "+PONG", or an error such as "-NOAUTH Authentication required": either way a Redis is there.
    return answers(at, b"PING\r\n", (b"+", b"-"))


def wait_for(check: object, what: str, log: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    sys.exit(f"opspolish: started a throwaway {what} but it did not answer within {seconds:.0f} s (see {log})")


def run(args: list[str], what: str, log: str) -> None:
    """Run a server tool; on failure stop with one line that gives the tool's own last word. Only pg_ctl writes the
    log: initdb's reason (its output went nowhere) was lost behind 'see <a log that does not exist>'."""
    tool = os.path.basename(args[args.index("--") + 1] if "--" in args else args[0])
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: a daemon that kept the pipe open would hang us
        try:
            subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=errors)
            return
        except OSError as exc:
            said = f"{type(exc).__name__}: {exc.strerror or exc}"
        except subprocess.CalledProcessError as exc:
            errors.seek(0)
            lines = [line.strip() for line in errors.read().decode(errors="replace").splitlines() if line.strip()]
            said = lines[-1] if lines else f"exit status {exc.returncode}"
    see = f"; see {log}" if os.path.isfile(log) else ""
    sys.exit(f"opspolish: could not start a throwaway {what} ({tool} failed: {said}{see})")


def make_base() -> None:
    try:
        os.makedirs(BASE, exist_ok=True)
    except OSError as exc:
        sys.exit(f"opspolish: could not create {BASE} for throwaway servers ({exc.strerror or exc}); "
                 "give make another TMPDIR")


def not_here(what: str, at: Endpoint, variable: str) -> str:
    return (f"{what} does not answer at {at}; throwaway servers are started only on this machine's loopback "
            f"(127.0.0.1), so start it or point {variable} elsewhere")


def postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def as_postgres_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    # PostgreSQL refuses to run as root: run it as the postgres account, in a directory it may write.
    make_base()
    os.chmod(BASE, 0o777)
    return ["runuser", "-u", "postgres", "--"]


def postgres_cannot_start(at: Endpoint) -> str | None:
    if not at.local_tcp:
        return not_here("PostgreSQL", at, "OPSPOLISH_DATABASE_URL")
    if not postgres_bin("initdb") or not postgres_bin("pg_ctl"):
        return f"PostgreSQL does not answer at {at} and no server is installed (apt-get install postgresql)"
    return None


def redis_cannot_start(at: Endpoint) -> str | None:
    if not at.local_tcp:
        return not_here("Redis", at, "OPSPOLISH_REDIS_URL")
    if not shutil.which("redis-server"):
        return f"Redis does not answer at {at} and no server is installed (apt-get install redis-server)"
    return None


def start_postgres(at: Endpoint) -> None:
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    assert initdb and pg_ctl  # postgres_cannot_start said so
    as_user = as_postgres_user()
    make_base()
    data = os.path.join(BASE, f"pg-{at.port}")
    log = os.path.join(BASE, f"pg-{at.port}.log")
    if not os.path.isfile(os.path.join(data, "PG_VERSION")):  # none, or an initdb that did not finish
        shutil.rmtree(data, ignore_errors=True)
        run([*as_user, initdb, "-D", data, "-U", at.user, "--auth=trust", "-E", "UTF8"], "PostgreSQL", log)
    run([*as_user, pg_ctl, "-D", data, "-l", log, "-w", "start",
         "-o", f"-h {at.host} -p {at.port} -k {data} -c fsync=off -c max_connections=300"], "PostgreSQL", log)
    wait_for(lambda: answers(at), "PostgreSQL", log)
    print(f"opspolish: started a throwaway PostgreSQL at {at} (user {at.user}, data {data}; make services-stop "
          "stops it)")


def start_redis(at: Endpoint) -> None:
    server = shutil.which("redis-server")
    assert server  # redis_cannot_start said so
    make_base()
    log = os.path.join(BASE, f"redis-{at.port}.log")
    run([server, "--daemonize", "yes", "--bind", at.host, "--port", str(at.port), "--save", "", "--appendonly", "no",
         "--dir", BASE, "--logfile", log, "--pidfile", os.path.join(BASE, f"redis-{at.port}.pid")], "Redis", log)
    wait_for(lambda: redis_answers(at), "Redis", log)
    print(f"opspolish: started a throwaway Redis at {at} (make services-stop stops it)")


def stop() -> None:
    """Stop the throwaway servers this script started, and remove their data."""
    pg_ctl = postgres_bin("pg_ctl")
    for data in glob.glob(os.path.join(BASE, "pg-*")):
        if os.path.isdir(data) and pg_ctl:
            subprocess.run([*as_postgres_user(), pg_ctl, "-D", data, "-m", "fast", "stop"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(f"opspolish: stopped the throwaway PostgreSQL of {data}")
    for pidfile in glob.glob(os.path.join(BASE, "redis-*.pid")):
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip())
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            continue
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # gone before its data goes: it logs its last lines into BASE
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.05)
        print(f"opspolish: stopped the throwaway Redis of {pidfile}")
    shutil.rmtree(BASE, ignore_errors=True)


def main() -> None:
    global BASE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stop", action="store_true", help="stop the throwaway servers and remove their data")
    parser.add_argument("--dir", default=BASE, help=f"where throwaway servers keep their data (default {BASE})")
    args = parser.parse_args()
    BASE = os.path.abspath(args.dir)
    if args.stop:
        stop()
        return
    pg = postgres_endpoint(os.environ.get("OPSPOLISH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/x"))
    redis = redis_endpoint(os.environ.get("OPSPOLISH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    pg_down, redis_down = not answers(pg), not redis_answers(redis)
    # Both reasons in one line, before anything starts: neither is left half-done, and neither hides the other.
    reasons = [why for why in (postgres_cannot_start(pg) if pg_down else None,
                               redis_cannot_start(redis) if redis_down else None) if why]
    if reasons:
        sys.exit("opspolish: " + "; and ".join(reasons))
    if pg_down:
        start_postgres(pg)
    if redis_down:
        start_redis(redis)


if __name__ == "__main__":
    main()
