"""Start the services as real subprocesses on free loopback ports and wait until they answer."""
from __future__ import annotations

import socket
import subprocess
import tempfile
from pathlib import Path

import httpx

from gesco.stack import ROLES, RunningStack, Service, free_port, stop_process


def start_service(
    module: str,
    env: dict[str, str],
    ready_url: str | None = None,
    grpc_port: int | None = None,
    timeout: float = 60.0,
) -> subprocess.Popen:
    """Run `python -m module` with `env` added to this environment; return once it is ready.

    Ready means `ready_url` answers 200 (when given) and the gRPC health check on 127.0.0.1:grpc_port
    says SERVING (when given). A test wiring one service to fakes of the others starts it here; the
    services wired to each other start through gesco.stack. The process's output is available as
    `service_log(proc)`. A sender whose `env` names no gRPC port gets a free one, so that senders
    started at once never compete for its default.
    """
    if module == "sender_service":
        env = {"GESCO_SENDER_GRPC_PORT": str(free_port()), **env}
    role = next(role for role, role_module in ROLES.items() if role_module == module)
    service = Service(role, module, ready_url, grpc_port, dict(env), {}, probe=role)
    return RunningStack([service], Path(tempfile.mkdtemp(prefix=f"{module}-")), timeout_s=timeout).procs[role]


def stop_service(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGTERM, then SIGKILL after `timeout` seconds; return the exit code."""
    return stop_process(proc, timeout)


def open_post(url: str, files: dict, data: dict[str, str]) -> socket.socket:
    """Send a multipart POST over a socket of its own and return the socket, unread: closing it
    is a client that goes away before (or while) the answer comes."""
    request = httpx.Request("POST", url, files=files, data=data)
    body = request.read()
    head = "".join(f"{name}: {value}\r\n" for name, value in request.headers.items())
    sock = socket.create_connection((request.url.host, request.url.port), timeout=10)
    sock.sendall(f"POST {request.url.raw_path.decode()} HTTP/1.1\r\n{head}\r\n".encode() + body)
    return sock


def service_log(proc: subprocess.Popen) -> str:
    """What the service has written to stdout and stderr so far."""
    path = getattr(proc, "log_path", None)
    return path.read_text(errors="replace") if path and path.exists() else ""
