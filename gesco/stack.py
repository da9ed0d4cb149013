"""The three services wired together: one builder for the launcher, the benchmarks and the tests.

`services(ports)` lists what runs, in start order (Redis when asked for, the receivers, the
channel, the sender), each with the variables that make it listen where `ports` says and find the
others. `RunningStack` starts such a list as child processes and waits until each is ready, for
the tests and the serving benchmark; scripts/launch.py starts the same list in the background with
pid files. Importing this module needs the standard library only (the launcher's `down` runs
without the virtual environment); the readiness checks import the project's health probe.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.paths import REPO_ROOT

REDIS_SERVER = "redis-server"
# The channel's metrics port follows its port: 9051 beside 50051 (the channel's defaults), and as
# far from any other port, so that stacks on other ports do not collide on it.
CHANNEL_METRICS_OFFSET = 9051 - 50051
# Roles a caller can give settings for (`services(settings=...)`), by the module each runs.
ROLES = {"receiver": "receiver_service", "channel": "channel_sim", "sender": "sender_service"}
# Serving replicas run at this niceness, so the sampling replicas' processes get their cores first
# (docs/scale-out.md, "A serving replica for the watches").
SERVING_NICENESS = 10


@dataclass(frozen=True)
class Ports:
    sender: int
    receiver_http: int  # the first receiver's; receiver i listens on this + i - 1
    receiver_grpc: int
    channel: int
    receivers: int = 1
    redis: int = 0  # the port of a redis-server run beside the services; 0: none
    # The last `serving` receivers are serving replicas (GESCO_RECEIVER_SAMPLING=false): the channel
    # and the sender reach only them, and they hand every job to the sampling ones through Redis.
    serving: int = 0
    sender_grpc: int = 50050
    # The channel's Prometheus port. None: it follows the channel port (CHANNEL_METRICS_OFFSET);
    # 0: any free port, which the channel picks and logs (the launcher picks one and reports it).
    channel_metrics: int | None = None

    @classmethod
    def free(cls, receivers: int = 1, redis: bool = False) -> Ports:
        """Ports nothing listens on now, on 127.0.0.1 (the receivers' in consecutive blocks)."""
        return cls(free_port(), free_ports(receivers), free_ports(receivers), free_port(), receivers=receivers,
                   redis=free_port() if redis else 0, sender_grpc=free_port(), channel_metrics=free_port())

    @property
    def channel_metrics_port(self) -> int:
        """The channel's metrics port: as set, else the channel port's follower (0 if that is no
        port: any free one)."""
        if self.channel_metrics is not None:
            return self.channel_metrics
        following = self.channel + CHANNEL_METRICS_OFFSET
        return following if 1 <= following <= 65535 else 0

    def in_use(self) -> dict[str, int]:
        """Every port the services listen on, by a name for messages (a metrics port of 0 is
        picked when the channel starts, so it is not listed)."""
        ports = {"sender": self.sender, "sender gRPC": self.sender_grpc, "channel": self.channel}
        if self.channel_metrics_port:
            ports["channel metrics"] = self.channel_metrics_port
        for index in range(self.receivers):
            suffix = f" {index + 1}" if self.receivers > 1 else ""
            ports[f"receiver{suffix} REST"] = self.receiver_http + index
            ports[f"receiver{suffix} gRPC"] = self.receiver_grpc + index
        if self.redis:
            ports["redis"] = self.redis
        return ports


@dataclass(frozen=True)
class Service:
    name: str
    module: str  # `python -m module`; for a program (redis-server) its name, found in its command line
    http_ready: str | None  # URL answering 200 once ready
    grpc_port: int | None  # port whose gRPC health check says SERVING once ready
    listen: dict[str, str]  # where it listens, and the caller's settings: these win over the environment
    wiring: dict[str, str]  # where it finds the others: variables set in the environment win
    probe: str = ""  # the health probe of its gRPC port (shared/wire/health_probe.HOPS); "": its name
    command: tuple[str, ...] = ()  # a program to run instead of `python -m module`
    redis_ready: str | None = None  # redis URL answering PING once ready
    niceness: int = 0  # run under `nice -n niceness` (0: as the launcher runs)

    def argv(self) -> list[str]:
        argv = list(self.command) if self.command else [sys.executable, "-m", self.module]
        return ["nice", "-n", str(self.niceness), *argv] if self.niceness else argv

    @property
    def url(self) -> str | None:
        """Its REST base URL, if it has one."""
        return self.http_ready.removesuffix("/readyz") if self.http_ready else None


def services(ports: Ports, host: str = "127.0.0.1", redis_config: Path | None = None,
             settings: Mapping[str, Mapping[str, str]] | None = None) -> list[Service]:
    """The services in start order: Redis (when `ports.redis`, run with `redis_config`), the
    receivers (they load the largest model), the channel, the sender.

    `settings` adds variables by role ("receiver", "channel", "sender"; see ROLES), e.g. a test's
    store folder or a benchmark's batching; a receiver API key in the environment is passed on.
    """
    settings = settings or {}
    unknown = set(settings) - set(ROLES)
    if unknown:
        raise ValueError(f"settings for unknown roles {sorted(unknown)}; expected some of {sorted(ROLES)}")
    started: list[Service] = []
    redis_url = f"redis://{url_host(host)}:{ports.redis}/0" if ports.redis else ""
    if ports.redis:
        command = (shutil.which(REDIS_SERVER) or REDIS_SERVER, *([str(redis_config)] if redis_config else ["--port", str(ports.redis)]))
        started.append(Service("redis", REDIS_SERVER, None, None, {}, {}, command=command, redis_ready=redis_url))
    receiver_urls, receiver_addresses = [], []
    for index in range(ports.receivers):
        http_port, grpc_port = ports.receiver_http + index, ports.receiver_grpc + index
        url = f"http://{url_host(host)}:{http_port}"
        serving = index >= ports.receivers - ports.serving
        if serving or not ports.serving:  # with serving replicas, clients and the channel reach only them
            receiver_urls.append(url)
            receiver_addresses.append(f"{url_host(host)}:{grpc_port}")
        name = f"receiver-{index + 1}" if ports.receivers > 1 else "receiver"
        listen = {
            "GESCO_RECEIVER_HOST": host,
            "GESCO_RECEIVER_HTTP_PORT": str(http_port),
            "GESCO_RECEIVER_GRPC_PORT": str(grpc_port),
            "GESCO_RECEIVER_PUBLIC_URL": url,
            # Unique among the replicas, and the same after a restart (which then fails what its
            # predecessor left unfinished at once).
            "GESCO_RECEIVER_REDIS_REPLICA_ID": name,
            **({"GESCO_RECEIVER_SAMPLING": "false"} if serving else {}),
            **settings.get("receiver", {}),
        }
        wiring = {"GESCO_RECEIVER_REDIS_URL": redis_url} if redis_url else {}
        started.append(Service(name, ROLES["receiver"], f"{url}/readyz", grpc_port, listen, wiring, probe="receiver",
                               niceness=SERVING_NICENESS if serving else 0))
    sender_wiring = {
        "GESCO_SENDER_CHANNEL_ADDRESS": f"{url_host(host)}:{ports.channel}",
        "GESCO_SENDER_RECEIVER_PUBLIC_URL": receiver_urls[0],
    }
    if receiver_key := os.environ.get("GESCO_RECEIVER_API_KEY"):
        sender_wiring["GESCO_SENDER_RECEIVER_API_KEY"] = receiver_key
    started += [
        Service(
            "channel",
            ROLES["channel"],
            None,
            ports.channel,
            {"GESCO_CHANNEL_HOST": host, "GESCO_CHANNEL_PORT": str(ports.channel),
             "GESCO_CHANNEL_METRICS_PORT": str(ports.channel_metrics_port), **settings.get("channel", {})},
            {"GESCO_CHANNEL_RECEIVER_ADDRESS": receivers_address(host, receiver_addresses)},
        ),
        Service(
            "sender",
            ROLES["sender"],
            f"http://{url_host(host)}:{ports.sender}/readyz",
            ports.sender_grpc,
            {"GESCO_SENDER_HOST": host, "GESCO_SENDER_PORT": str(ports.sender),
             "GESCO_SENDER_GRPC_PORT": str(ports.sender_grpc), **settings.get("sender", {})},
            sender_wiring,
        ),
    ]
    return started


def receivers_address(host: str, addresses: list[str]) -> str:
    """The channel's receiver address: one host:port, or for several receivers the list of their
    IP addresses the channel spreads over (a host name is resolved here, once)."""
    if len(addresses) == 1:
        return addresses[0]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        resolved = url_host(socket.gethostbyname(host))
        addresses = [f"{resolved}:{address.rpartition(':')[2]}" for address in addresses]
    return ",".join(addresses)


def url_host(host: str) -> str:
    """The host as it goes into a URL or an address: an IPv6 address in brackets."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


# --- ports ---------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> int:
    """The first of `count` consecutive TCP ports on 127.0.0.1 that nothing listens on right now."""
    for _ in range(100):
        first = free_port()
        if first + count <= 65536 and all(_bindable(first + offset) for offset in range(1, count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports found")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --- environment and readiness -------------------------------------------------------------------


def process_env(service: Service, environment: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment (this process's by default) with the service's wiring unless set there,
    and its ports and settings."""
    return {**service.wiring, **(os.environ if environment is None else environment), **service.listen,
            "PYTHONUNBUFFERED": "1"}


def probe_env(all_services: list[Service]) -> dict[str, str]:
    """What the services see together: every wiring, unless the user set it (the health probes
    read a server's TLS switch and its client's files and address from here)."""
    return {key: value for service in all_services for key, value in service.wiring.items()} | dict(os.environ)


def tls_probe_error(all_services: list[Service]) -> str | None:
    """Why the gRPC readiness checks cannot be made (TLS on without the client's files), if so."""
    from shared.wire import health_probe

    env = probe_env(all_services)
    for service in all_services:
        if service.grpc_port is not None:
            try:
                health_probe.probe_for(service.probe or service.name, env)
            except ValueError as error:
                return str(error)
    return None


def is_ready(service: Service, host: str, env: dict[str, str]) -> bool:
    """/readyz answers 200 and the gRPC health check (over TLS where configured) says SERVING.

    `env` is `probe_env(...)`; ValueError if the TLS settings cannot make the check.
    """
    from shared.wire import health_probe

    if service.redis_ready is not None:
        return redis_answers(service.redis_ready, env.get("GESCO_RECEIVER_REDIS_PASSWORD", ""))
    if service.http_ready is not None and not health_probe.http_ok(service.http_ready):
        return False
    if service.grpc_port is None:
        return True
    target = f"{url_host(host)}:{service.grpc_port}"
    return health_probe.grpc_serving(target, health_probe.probe_for(service.probe or service.name, env))


def redis_answers(url: str, password: str) -> bool:
    """Redis at `url` answers PING (with the password, if any)."""
    import redis

    client = redis.Redis.from_url(url, password=password or None, socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


# --- child processes -----------------------------------------------------------------------------


class RunningStack:
    """Services started as child processes, in order, each ready before the next starts; their
    output goes to `log_dir/<name>.log` (each process's `log_path`). `stop` ends them in reverse
    (SIGTERM, then SIGKILL)."""

    def __init__(self, all_services: list[Service], log_dir: Path, host: str = "127.0.0.1",
                 timeout_s: float = 180.0) -> None:
        self.services = {service.name: service for service in all_services}
        self.log_dir, self.host, self.timeout_s = log_dir, host, timeout_s
        self.procs: dict[str, subprocess.Popen] = {}
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in self.services:
                self.start(name)
        except BaseException:
            self.stop()
            raise

    def url(self, name: str) -> str:
        url = self.services[name].url
        assert url is not None, f"{name} has no REST API"
        return url

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, name: str) -> subprocess.Popen:
        """(Re)start one service and wait until it is ready; RuntimeError if it exits or times out."""
        service, log_path = self.services[name], self.log_dir / f"{name}.log"
        with log_path.open("ab") as output:
            proc = subprocess.Popen(service.argv(), cwd=REPO_ROOT, env=process_env(service),
                                    stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        proc.log_path = log_path  # type: ignore[attr-defined]
        self.procs[name] = proc
        env, deadline = probe_env(list(self.services.values())), time.monotonic() + self.timeout_s
        while not is_ready(service, self.host, env):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready after {self.timeout_s:.0f} s:\n{self.log(name)[-4000:]}")
            time.sleep(0.2)
        return proc

    def stop(self, grace_s: float = 15.0) -> None:
        for name in reversed(list(self.procs)):
            stop_process(self.procs.pop(name), grace_s)


def stop_process(proc: subprocess.Popen, grace_s: float = 15.0) -> int:
    """SIGTERM, then SIGKILL after `grace_s` seconds; return the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode

