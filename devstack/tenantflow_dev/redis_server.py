"""The `ha` topology's Redis (Debian's `redis-server`): Prefect's messaging, event ordering,
concurrency leases and docket, shared by every Prefect process of the stack.

It is the stack's own: its port (`TENANTFLOW_REDIS_PORT`) and folder, bound to 127.0.0.1
and password-protected, never the machine's Redis on 6379. Its data is kept in an
append-only file synced on every write, so a restart (or a crash) loses no lease of a
running flow's concurrency slots.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from tenantflow_dev.config import StackConfig
from tenantflow_dev.errors import StackError
from tenantflow_dev.health import Health
from tenantflow_dev.service import HttpProcessService

__all__ = ["RedisServer", "redis_answers"]


class RedisServer(HttpProcessService):
    """`redis-server` with a config file of ours (its password inside, 0600)."""

    name = "redis"
    what = "Redis"
    folder = "redis"
    port_variable = "TENANTFLOW_REDIS_PORT"
    ready_timeout = 30
    umask = 0o077

    def __init__(self, config: StackConfig) -> None:
        super().__init__(config)
        self.conf = self.root / "redis.conf"

    @property
    def port(self) -> int:
        return self.config.redis_port

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        text = "\n".join(
            [
                f"bind {self.config.host}",
                f"port {self.port}",
                "protected-mode yes",
                # NOTE: in this file only (0600), never on the command line where `ps`
                # shows it; Prefect's processes get it in their environment.
                f"requirepass {self.config.secrets.redis_password}",
                f"dir {self.root}",
                "daemonize no",
                "supervised no",
                'logfile ""',
                "loglevel warning",
                # NOTE: the leases of running flows' concurrency slots live here: a restart
                # that forgot them would leave the slots taken until the leases' expiry.
                "appendonly yes",
                "appendfsync always",
                'save ""',
                "databases 1",
                "",
            ]
        )
        self.conf.touch(mode=0o600)
        self.conf.chmod(0o600)
        self.conf.write_text(text)

    def argv(self) -> list[str]:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise StackError(
                "the ha topology needs Redis: install Debian's redis-server "
                "(`apt-get install redis-server`, or `TENANTFLOW_WITH_HA=1 make env`)"
            )
        return [binary, str(self.conf)]

    def answers(self) -> bool:
        return redis_answers(self.config)

    def health(self) -> Health:
        found = super().health()
        if found.healthy:
            return Health(
                self.name, self.address, True, True, found.pid, "password, append-only file"
            )
        return found


def redis_answers(config: StackConfig) -> bool:
    """Whether the stack's Redis answers PING after AUTH with the stack's password.

    NOTE: plain RESP over a socket: the dev stack's health checks need no client library.
    """
    password = config.secrets.redis_password.encode()
    request = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n*1\r\n$4\r\nPING\r\n" % (len(password), password)
    try:
        with socket.create_connection((config.host, config.redis_port), timeout=2) as sock:
            sock.sendall(request)
            reply = b""
            while reply.count(b"\r\n") < 2:
                chunk = sock.recv(256)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    return reply == b"+OK\r\n+PONG\r\n"
