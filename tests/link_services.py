"""The three services as real processes for the web page and CLI tests (tests/test_web_page.py,
tests/test_cli.py): the shipped models, free loopback ports, a store in a temporary folder."""
from __future__ import annotations

from pathlib import Path

from tests.service_procs import free_port, start_service, stop_service


class LinkServices:
    """receiver, channel_sim and sender, started in that order; `stop` ends all three."""

    def __init__(self, tmp: Path, sender_env: dict[str, str] | None = None,
                 output_size: tuple[int, int] = (96, 128)) -> None:
        self.sender_port, self.channel_port = free_port(), free_port()
        self.sender_grpc = free_port()
        self.receiver_http, self.receiver_grpc = free_port(), free_port()
        self.receiver_url = f"http://127.0.0.1:{self.receiver_http}"
        self.sender_url = f"http://127.0.0.1:{self.sender_port}"
        self.procs = []
        try:
            self.procs.append(start_service("receiver_service", {
                "GESCO_RECEIVER_HTTP_PORT": str(self.receiver_http),
                "GESCO_RECEIVER_GRPC_PORT": str(self.receiver_grpc),
                "GESCO_RECEIVER_PUBLIC_URL": self.receiver_url,
                "GESCO_RECEIVER_STORE_DIR": str(tmp / "store"),
                "GESCO_RECEIVER_OUTPUT_HEIGHT": str(output_size[0]),
                "GESCO_RECEIVER_OUTPUT_WIDTH": str(output_size[1]),
                "GESCO_RECEIVER_DEVICE": "cpu",
                "GESCO_RECEIVER_SHUTDOWN_GRACE_S": "1",
                "GESCO_RECEIVER_TORCH_THREADS": "1",
            }, ready_url=f"{self.receiver_url}/readyz", grpc_port=self.receiver_grpc, timeout=180))
            self.procs.append(start_service("channel_sim", {
                "GESCO_CHANNEL_PORT": str(self.channel_port),
                "GESCO_CHANNEL_RECEIVER_ADDRESS": f"127.0.0.1:{self.receiver_grpc}",
                "GESCO_CHANNEL_METRICS_PORT": "0",
            }, grpc_port=self.channel_port, timeout=120))
            self.procs.append(start_service("sender_service", {
                "GESCO_SENDER_PORT": str(self.sender_port),
                "GESCO_SENDER_GRPC_PORT": str(self.sender_grpc),
                "GESCO_SENDER_CHANNEL_ADDRESS": f"127.0.0.1:{self.channel_port}",
                "GESCO_SENDER_RECEIVER_PUBLIC_URL": self.receiver_url,
                "GESCO_SENDER_DEVICE": "cpu",
                **(sender_env or {}),
            }, ready_url=f"{self.sender_url}/readyz", grpc_port=self.sender_grpc, timeout=120))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_service(proc)
        self.procs.clear()
