"""The three services as real processes for the web page, CLI and gRPC API tests: the shipped
models, free loopback ports, a store and logs in a temporary folder, wired by gesco.stack."""
from __future__ import annotations

from pathlib import Path

from gesco.stack import Ports, RunningStack, services


class LinkServices:
    """receiver, channel_sim and sender, started in that order; `stop` ends all three."""

    def __init__(self, tmp: Path, sender_env: dict[str, str] | None = None,
                 output_size: tuple[int, int] = (96, 128)) -> None:
        ports = Ports.free()
        self.sender_port, self.channel_port, self.sender_grpc = ports.sender, ports.channel, ports.sender_grpc
        self.receiver_http, self.receiver_grpc = ports.receiver_http, ports.receiver_grpc
        self.stack = RunningStack(services(ports, settings={
            "receiver": {
                "GESCO_RECEIVER_STORE_DIR": str(tmp / "store"),
                "GESCO_RECEIVER_OUTPUT_HEIGHT": str(output_size[0]),
                "GESCO_RECEIVER_OUTPUT_WIDTH": str(output_size[1]),
                "GESCO_RECEIVER_DEVICE": "cpu",
                "GESCO_RECEIVER_SHUTDOWN_GRACE_S": "1",
                "GESCO_RECEIVER_TORCH_THREADS": "1",
            },
            "channel": {"GESCO_CHANNEL_METRICS_PORT": "0"},
            "sender": {"GESCO_SENDER_DEVICE": "cpu", **(sender_env or {})},
        }), tmp / "logs")
        self.receiver_url, self.sender_url = self.stack.url("receiver"), self.stack.url("sender")

    def stop(self) -> None:
        self.stack.stop()
