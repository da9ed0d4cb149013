"""Receiver settings, read from GESCO_RECEIVER_* environment variables."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from shared.limits import MAX_GUIDANCE, MAX_STEPS
from shared.wire.service_settings import BaseUrl, RepoPath, ServiceSettings


class ReceiverSettings(ServiceSettings):
    """Ports, model, queue, store and sampling defaults of the receiver process."""

    model_config = SettingsConfigDict(env_prefix="GESCO_RECEIVER_")

    host: str = "127.0.0.1"
    grpc_port: int = Field(50052, ge=1, le=65535)
    http_port: int = Field(8001, ge=1, le=65535)
    # Base of the URLs the status JSON hands out (the address clients reach this process at).
    public_url: BaseUrl = "http://127.0.0.1:8001"
    # Relative paths are taken from the repository root; a missing file gives an untrained model.
    checkpoint: RepoPath = Path("models/diffusion-camvid.pt")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(0, ge=0)  # 0: torch's default
    # CPU inference options measured in docs/benchmarks.md: channels_last is 6-9% faster for free;
    # torch.compile 12-19% faster but compiles for minutes at every start on a small CPU.
    channels_last: bool = True
    torch_compile: bool = False
    queue_size: int = Field(8, ge=1)  # jobs waiting behind the batch being generated
    # Dynamic batching: compatible jobs (same sampler, steps, guidance) share one sampling run.
    max_batch_size: int = Field(4, ge=1)  # 1: no batching
    max_queue_delay_ms: float = Field(10.0, ge=0.0)  # how long the oldest job waits for company
    store_dir: RepoPath = Path("var/receiver")
    store_max_items: int = Field(500, ge=1)
    store_max_age_s: float = Field(24 * 3600.0, gt=0)
    # Used for a header without a SamplingRequest; "" / 0 within one mean the same defaults.
    default_sampler: str = ""  # "": the model's default sampler
    default_steps: int = Field(0, ge=0, le=MAX_STEPS)  # 0: the sampler's default
    default_guidance: float = Field(0.0, ge=0.0, le=MAX_GUIDANCE)
    output_height: int = Field(0, ge=0)  # 0: the model's resolution
    output_width: int = Field(0, ge=0)
    max_symbols: int = Field(8_000_000, ge=1)
    max_grpc_workers: int = Field(8, ge=1)
    shutdown_grace_s: float = Field(5.0, ge=0)
    # Required in the X-API-Key header of the status, image, maps and cancel requests (health,
    # readiness, metrics and docs stay open); empty: off. Replicas share one key.
    api_key: SecretStr = SecretStr("")
    # TLS of the gRPC server (PEM paths; empty: plaintext). A client CA makes it mutual TLS.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
