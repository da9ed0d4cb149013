"""Channel simulator settings, read from GESCO_CHANNEL_* environment variables."""
from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from shared.wire.load_balancing import grpc_target
from shared.wire.service_settings import ServiceSettings


class ChannelSettings(ServiceSettings):
    """Where the simulator listens, where it forwards, and how much it accepts."""

    model_config = SettingsConfigDict(env_prefix="GESCO_CHANNEL_")

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=1, le=65535)
    # The receiver replicas, spread over with gRPC's round_robin and health checking: host:port,
    # dns:///name:port (every address of the name) or a list ip:port,ip:port.
    receiver_address: str = "127.0.0.1:50052"
    # Most receivers one transmission is offered to when each answers RESOURCE_EXHAUSTED (a full
    # queue) before the caller gets it: each next try goes to the next replica in the rotation.
    forward_attempts: int = Field(3, ge=1, le=10)
    max_symbols: int = Field(8_000_000, ge=1)
    max_workers: int = Field(8, ge=1)
    # Deadline of the call to the receiver: the caller's remaining time, at most this.
    forward_timeout_s: float = Field(30.0, gt=0)
    shutdown_grace_s: float = Field(5.0, ge=0)
    # Prometheus /metrics over HTTP on host:metrics_port; 0: any free port (logged at start).
    metrics_port: int = Field(9051, ge=0, le=65535)
    # TLS of this server (PEM paths; empty: plaintext). A client CA makes it mutual TLS.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # TLS to the receiver: its CA turns TLS on; a certificate and key are presented for mutual TLS.
    receiver_tls_ca_file: str = ""
    receiver_tls_cert_file: str = ""
    receiver_tls_key_file: str = ""

    @field_validator("receiver_address")
    @classmethod
    def _receiver_target(cls, value: str) -> str:
        grpc_target(value, "receiver_address")  # ValueError for a malformed list
        return value
