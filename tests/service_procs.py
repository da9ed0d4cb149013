"""Start the services as real subprocesses on free loopback ports and wait until they answer."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from shared.wire.health_probe import Probe, grpc_serving, http_ok
from shared.paths import REPO_ROOT



def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(
    module: str,
    env: dict[str, str],
    ready_url: str | None = None,
    grpc_port: int | None = None,
    timeout: float = 60.0,
) -> subprocess.Popen:
    """Run `python -m module` with `env` added to this environment; return once it is ready.

    Ready means `ready_url` answers 200 (when given) and the gRPC health check on 127.0.0.1:grpc_port
    says SERVING (when given). The process's stderr goes to a temporary file, shown if it dies or
    never becomes ready, and available afterwards as `proc.log_path`. A sender whose `env` names no
    gRPC port gets a free one, so that senders started at once never compete for its default.
    """
    if module == "sender_service":
        env = {"GESCO_SENDER_GRPC_PORT": str(free_port()), **env}
    log_file = tempfile.NamedTemporaryFile(prefix=f"{module}-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    proc.log_path = Path(log_file.name)  # type: ignore[attr-defined]
    log_file.close()
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{module} exited with {proc.returncode}:\n{service_log(proc)}")
            if (ready_url is None or http_ok(ready_url, timeout_s=1.0)) and (
                grpc_port is None or grpc_serving(f"127.0.0.1:{grpc_port}", Probe(), timeout_s=1.0)
            ):
                return proc
            if time.monotonic() > deadline:
                raise TimeoutError(f"{module} not ready after {timeout:.0f} s:\n{service_log(proc)}")
            time.sleep(0.2)
    except BaseException:
        stop_service(proc)
        raise


def stop_service(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGTERM, then SIGKILL after `timeout` seconds; return the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


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
