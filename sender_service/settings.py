"""Sender service settings, read from GESCO_SENDER_* environment variables."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from shared.limits import MAX_STATUS_WAIT_S
from shared.semantic.codec import Compression
from shared.wire.service_settings import BaseUrl, RepoPath, ServiceSettings


class SenderSettings(ServiceSettings):
    """Where the sender listens and sends, its semantic codec defaults and its input bounds."""

    model_config = SettingsConfigDict(env_prefix="GESCO_SENDER_")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Port of the gRPC API (gesco.v1.Sender), on the same host; `python -m sender_service` serves it.
    grpc_port: int = Field(50050, ge=1, le=65535)
    channel_address: str = "127.0.0.1:50051"
    # Base of the status and image URLs handed to clients.
    receiver_public_url: BaseUrl = "http://127.0.0.1:8001"
    # Where the sender itself polls the receiver for wait=true (inside Docker: http://receiver:8001);
    # empty means receiver_public_url.
    receiver_internal_url: BaseUrl = ""
    # A relative path is resolved against the repository root; a missing file means an untrained
    # segmenter (the responses and logs say so).
    segmenter_checkpoint: RepoPath = Path("models/segmenter-camvid.pt")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_classes: int = Field(12, ge=2, le=256)
    # The semantic size every label map is resized to (nearest) before encoding.
    map_height: int = Field(96, ge=8, le=4096)
    map_width: int = Field(128, ge=8, le=4096)
    # 2: 48x64 maps, a bandwidth ratio of 1/2 with CamVid's 12 classes, 0.007 mIoU below factor 1 at an
    # average-power SNR of 10 dB on val through the receiver's factor-2 adapter (docs/rate-quality.md),
    # for a quarter of the channel uses.
    downsample_factor: int = Field(2, ge=1, le=64)
    compression: Compression = Compression.NONE
    jpeg_quality: int = Field(75, ge=1, le=100)
    # The measured mIoU of each map coding the `budget` form field chooses from (docs/rate-quality.md).
    rate_quality_table: RepoPath = Path("models/rate-quality-table.json")
    # Where the learned link's map encoders are (map-jscc-*.pt: the names the link and the table use).
    map_encoders_dir: RepoPath = Path("models")
    # Quality of the JPEG that sizes the full-image comparison (image_bits_jpeg).
    image_jpeg_quality: int = Field(75, ge=1, le=100)
    rpc_timeout_s: float = Field(30.0, gt=0)
    wait_timeout_s: float = Field(600.0, gt=0)
    poll_interval_s: float = Field(0.5, gt=0)
    # wait=true asks the receiver to hold each status request until the job ends, up to this long
    # (MAX_STATUS_WAIT_S at most); 0: plain polling every poll_interval_s.
    status_long_poll_s: float = Field(20.0, ge=0, le=MAX_STATUS_WAIT_S)
    # Retry-After (seconds) sent with 429 when the channel or receiver gives no hint.
    retry_after_s: int = Field(5, ge=1)
    max_upload_bytes: int = Field(20_000_000, ge=1)
    max_pixels: int = Field(25_000_000, ge=1)
    # Required in the X-API-Key header of every request but health, metrics and docs; empty: off.
    api_key: SecretStr = SecretStr("")
    # The receiver's API key (its GESCO_RECEIVER_API_KEY), sent with the sender's calls to the
    # receiver's REST API: the wait=true long poll, cancels and the web page's relay. Empty: none.
    receiver_api_key: SecretStr = SecretStr("")
    # TLS of the gRPC API (PEM paths; empty: plaintext). A client CA makes it mutual TLS.
    grpc_tls_cert_file: str = ""
    grpc_tls_key_file: str = ""
    grpc_tls_client_ca_file: str = ""
    # TLS to the channel simulator (PEM paths): its CA turns TLS on; a certificate and key are
    # presented for mutual TLS. Empty: plaintext.
    channel_tls_ca_file: str = ""
    channel_tls_cert_file: str = ""
    channel_tls_key_file: str = ""

    @property
    def receiver_poll_url(self) -> str:
        return self.receiver_internal_url or self.receiver_public_url
