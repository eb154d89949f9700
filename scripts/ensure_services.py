#!/usr/bin/env python3
"""Make sure PostgreSQL and Redis answer, for `make test` and `make demo` (stdlib only).

1. The configured ones (OPSPOLISH_DATABASE_URL / OPSPOLISH_REDIS_URL, else the defaults) answer: done.
2. Else, when the server binaries are installed, start throwaway ones on the configured port
   (data under $TMPDIR/opspolish-services, nothing persisted) and wait until they answer.
3. Else stop with one line naming what to install.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlsplit

BASE = os.path.join(tempfile.gettempdir(), "opspolish-services")


def endpoint(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url.replace("+asyncpg", ""))
    return parts.hostname or "127.0.0.1", parts.port or default_port


def answers(host: str, port: int, probe: bytes | None = None, expect: bytes | None = None) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            if probe is None:
                return True
            sock.sendall(probe)
            sock.settimeout(2.0)
            return expect is None or sock.recv(64).startswith(expect)
    except OSError:
        return False


def wait_for(check: object, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    sys.exit(f"opspolish: started a throwaway {what} but it did not answer within {seconds:.0f} s")


def postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def start_postgres(host: str, port: int) -> None:
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    if not initdb or not pg_ctl:
        sys.exit(f"opspolish: PostgreSQL does not answer on {host}:{port} and no server is installed "
                 "(apt-get install postgresql)")
    data = os.path.join(BASE, f"pg-{port}")
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        os.makedirs(BASE, exist_ok=True)
        os.chmod(BASE, 0o777)
    if not os.path.isdir(data):
        subprocess.run([*as_user, initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                       check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*as_user, pg_ctl, "-D", data, "-l", os.path.join(data, "server.log"), "-w", "start",
                    "-o", f"-h {host} -p {port} -k {data} -c fsync=off -c max_connections=300"],
                   check=True, stdout=subprocess.DEVNULL)
    wait_for(lambda: answers(host, port), "PostgreSQL")
    print(f"opspolish: started a throwaway PostgreSQL on {host}:{port} ({data})")


def start_redis(host: str, port: int) -> None:
    server = shutil.which("redis-server")
    if not server:
        sys.exit(f"opspolish: Redis does not answer on {host}:{port} and no server is installed "
                 "(apt-get install redis-server)")
    os.makedirs(BASE, exist_ok=True)
    subprocess.run([server, "--daemonize", "yes", "--bind", host, "--port", str(port), "--save", "",
                    "--appendonly", "no", "--dir", BASE, "--logfile", os.path.join(BASE, f"redis-{port}.log")],
                   check=True, stdout=subprocess.DEVNULL)
    wait_for(lambda: answers(host, port, b"PING\r\n", b"+PONG"), "Redis")
    print(f"opspolish: started a throwaway Redis on {host}:{port}")


def main() -> None:
    pg_host, pg_port = endpoint(os.environ.get("OPSPOLISH_DATABASE_URL", "postgresql://127.0.0.1:5432/x"), 5432)
    redis_host, redis_port = endpoint(os.environ.get("OPSPOLISH_REDIS_URL", "redis://127.0.0.1:6379/0"), 6379)
    if not answers(pg_host, pg_port):
        start_postgres(pg_host, pg_port)
    if not answers(redis_host, redis_port, b"PING\r\n", b"+PONG"):
        start_redis(redis_host, redis_port)


if __name__ == "__main__":
    main()
