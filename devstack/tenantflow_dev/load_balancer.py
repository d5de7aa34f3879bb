"""The `ha` topology's load balancer (Debian's `haproxy`): the stack's Prefect address.

It listens on the stack's Prefect port, so every client (the workers, the CLI, the UI,
the tests) reaches the API replicas through it unchanged, and sends each request to a
replica that passes its health check (`/api/health`, every second). A replica that
dies is out within two failed checks; a request that could not even connect to it is
sent to the other one (`retry-on conn-failure`, `option redispatch`), and Prefect's
client retries the 502 of a request that was in flight on it.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from tenantflow_dev.config import StackConfig
from tenantflow_dev.errors import StackError
from tenantflow_dev.health import Health
from tenantflow_dev.prefect_server import prefect_healthy
from tenantflow_dev.service import HttpProcessService

__all__ = ["LoadBalancer"]


class LoadBalancer(HttpProcessService):
    """`haproxy` in the foreground, its config, stats socket and log in its folder."""

    name = "prefect-lb"
    what = "HAProxy"
    folder = "haproxy"
    port_variable = "TENANTFLOW_PREFECT_PORT"
    ready_timeout = 30
    umask = 0o077

    def __init__(self, config: StackConfig) -> None:
        super().__init__(config)
        self.conf = self.root / "haproxy.cfg"
        self.stats_socket = self.root / "stats.sock"

    @property
    def port(self) -> int:
        return self.config.prefect_port

    @property
    def address(self) -> str:
        return self.config.prefect_ui_url

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        host = self.config.host
        servers = [
            f"    server api-{n} {host}:{port} check inter 1s fall 2 rise 2"
            for n, port in enumerate(self.config.prefect_replica_ports, start=1)
        ]
        self.conf.write_text(
            "\n".join(
                [
                    "global",
                    "    maxconn 4096",
                    f"    stats socket {self.stats_socket} mode 600 level user",
                    "",
                    "defaults",
                    "    mode http",
                    "    option redispatch",
                    "    retries 3",
                    # NOTE: only a request that never reached a replica is sent again: a
                    # POST that a dying replica may have done is the client's to retry.
                    "    retry-on conn-failure",
                    "    timeout connect 2s",
                    "    timeout client 5m",
                    "    timeout server 5m",
                    # NOTE: the events and logs websockets of flow runs stay open for a run.
                    "    timeout tunnel 1h",
                    "",
                    "frontend prefect",
                    f"    bind {host}:{self.port}",
                    "    default_backend replicas",
                    "",
                    "backend replicas",
                    "    balance leastconn",
                    "    option httpchk GET /api/health",
                    "    http-check expect status 200",
                    *servers,
                    "",
                ]
            )
        )
        self.conf.chmod(0o600)

    def argv(self) -> list[str]:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(binary).exists():
            raise StackError(
                "the ha topology needs a load balancer: install Debian's haproxy "
                "(`apt-get install haproxy`, or `TENANTFLOW_WITH_HA=1 make env`)"
            )
        # NOTE: -db: in the foreground, as a process group of ours that `down` stops.
        return [binary, "-db", "-f", str(self.conf)]

    def answers(self) -> bool:
        return prefect_healthy(self.config, self.config.prefect_api_url)

    def server_stats(self) -> dict[str, dict[str, str]]:
        """Each replica's row of HAProxy's `show stat` (`status`, `wretr` retries,
        `wredis` redispatches, `eresp` failed responses, ...), by server name (`api-1`);
        empty when HAProxy does not answer."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                sock.connect(str(self.stats_socket))
                sock.sendall(b"show stat\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError:
            return {}
        lines = data.decode().splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        header = lines[0][2:].split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:]]
        return {
            row["svname"]: row
            for row in rows
            if row.get("pxname") == "replicas" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def replicas_up(self) -> tuple[int, int]:
        """(replicas passing their health check, replicas), from HAProxy's stats socket."""
        servers = self.server_stats()
        if not servers:
            return 0, len(self.config.prefect_replica_ports)
        return sum(row["status"].startswith("UP") for row in servers.values()), len(servers)

    def health(self) -> Health:
        found = super().health()
        if not found.running:
            return found
        up, replicas = self.replicas_up()
        detail = f"{up} of {replicas} replicas up"
        return Health(self.name, self.address, True, found.healthy and up > 0, found.pid, detail)
