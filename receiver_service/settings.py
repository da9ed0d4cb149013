"""Receiver settings, read from GESCO_RECEIVER_* environment variables."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from receiver_service.presets import apply_preset, queue_size_for
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
    # Use the condition adapters found beside the checkpoint (<stem>.f<factor>.adapter.pt) for maps
    # sent at their downsample factor; off: the base generator serves every factor.
    adapters: bool = True
    # Serve the `distilled` sampler with the students found beside the checkpoint, one per
    # downsample factor (<stem>.distilled.pt for full-resolution maps, <stem>.f<factor>.distilled.pt;
    # shared/semantic/diffusion/distilled.py). Off, or no student for a job's factor: the sampler
    # falls back to the trajectory the student imitates (DDIM over 10 steps).
    distilled: bool = True
    # false: a serving replica. It answers the REST and gRPC APIs and serves watches, and puts each
    # job it receives into the shared queue (needs the Redis store) for the sampling replicas,
    # never sampling itself, so a thousand watch streams do not share a process, and its
    # interpreter lock, with sampling (docs/scaling.md). It still loads the models, which
    # validating a request needs.
    sampling: bool = True
    # The second stage: the generated image upscaled with the received map by this checkpoint
    # (shared/semantic/upscaler.py). Off, or no such file: images stay at the generator's resolution.
    upscale: bool = True
    upscaler: RepoPath = Path("models/upscaler-camvid.pt")
    # The learned link's map encoders (map-jscc-*.pt, named by their stems): their decoders turn
    # its symbols into soft maps. None there: the learned link is refused.
    map_encoders_dir: RepoPath = Path("models")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(0, ge=0)  # 0: torch's default
    # CPU inference options measured in docs/benchmarks.md: channels_last is 6-9% faster for free;
    # torch.compile 12-19% faster but compiles for minutes at every start on a small CPU.
    channels_last: bool = True
    torch_compile: bool = False
    # Without torch_compile, run the networks as TorchScript traces: a forward then holds the
    # interpreter lock only to start, so the gRPC loop writing to many watches does not stall
    # sampling (SemanticImageGenerator.trace; docs/load-testing.md). Same images. Off by default:
    # with it on, the scale-out SIGTERM hand-back test failed in most runs on the 2-core machine;
    # whether tracing causes that is not established (the test also failed once with it off).
    trace_network: bool = False
    # Jobs waiting behind the batch being generated. Unset: sized by the batch, 2 x max_batch_size
    # and at least 8, so a full batch can always form; below max_batch_size batches stay small.
    queue_size: int | None = Field(None, ge=1)
    # Dynamic batching: compatible jobs (same sampler, steps, guidance) share one sampling run.
    max_batch_size: int = Field(4, ge=1)  # 1: no batching
    max_queue_delay_ms: float = Field(10.0, ge=0.0)  # how long the oldest job waits for company
    # request: a batch samples from its first step to its last (the batch above); continuous: jobs
    # of any sampling options join and leave one running batch of up to max_batch_size jobs at
    # every step (receiver_service/step_batching.py).
    batching: Literal["request", "continuous"] = "request"
    # Threads that encode a finished job's PNGs and store them while the next batch samples; 0: the
    # sampling thread does it.
    encode_workers: int = Field(1, ge=0)
    # GPU serving (not yet measured on a GPU: scripts/gpu/gpu_serving_check.py writes docs/benchmarks-gpu.md
    # when one is lent). The network called at these batch sizes only (rows of a
    # guided forward: conditional + unconditional), JSON, e.g. [2, 4, 8]; empty: any size.
    batch_buckets: list[int] = []
    # Each bucket captured as a CUDA graph at start and replayed (CUDA only; ignored on a CPU).
    cuda_graphs: bool = False
    # Noise drawn on the model's device: no copy per draw, but a seed's image then differs between
    # a CPU and a GPU (shared/semantic/diffusion/generator.py).
    noise_on_device: bool = False
    # Defaults for a kind of machine (receiver_service/presets.py): "gpu"; the variables set one by
    # one win over a preset's values.
    preset: Literal["", "gpu"] = ""
    store_dir: RepoPath = Path("var/receiver")
    store_max_items: int = Field(500, ge=1)
    store_max_age_s: float = Field(24 * 3600.0, gt=0)
    # Used for a header without a SamplingRequest; "" / 0 within one mean the same defaults.
    default_sampler: str = ""  # "": the model's default sampler
    default_steps: int = Field(0, ge=0, le=MAX_STEPS)  # 0: the sampler's default
    default_guidance: float = Field(0.0, ge=0.0, le=MAX_GUIDANCE)
    output_height: int = Field(0, ge=0)  # 0: the last stage's resolution (the upscaler's, else the model's)
    output_width: int = Field(0, ge=0)
    max_symbols: int = Field(8_000_000, ge=1)
    max_grpc_workers: int = Field(8, ge=1)
    # WatchTransmission calls served at once (coroutines of the gRPC server's event loop, about
    # 25 KB of memory each, no thread); more are RESOURCE_EXHAUSTED.
    max_watches: int = Field(10_000, ge=1)
    shutdown_grace_s: float = Field(5.0, ge=0)
    # Required in the X-API-Key header of the status, image, maps and cancel requests (health,
    # readiness, metrics and docs stay open); empty: off. Replicas share one key.
    api_key: SecretStr = SecretStr("")
    # TLS of the gRPC server (PEM paths; empty: plaintext). A client CA makes it mutual TLS.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""

    @model_validator(mode="before")
    @classmethod
    def _preset_defaults(cls, values: Any) -> Any:
        return apply_preset(values)

    @model_validator(mode="after")
    def _queue_sized_by_the_batch(self) -> ReceiverSettings:
        if self.queue_size is None:
            self.queue_size = queue_size_for(self.max_batch_size)
        return self
