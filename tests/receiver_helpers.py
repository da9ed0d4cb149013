"""Receiver test helpers: a fake generator, a tiny real one, settings and transmissions built in
the test, and waits on the store. The fixtures that use them are in conftest.py."""
from __future__ import annotations

import threading
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import grpc
import numpy as np
import torch
from fastapi.testclient import TestClient

from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from receiver_service import model_host
from receiver_service.app import create_app
from receiver_service.settings import ReceiverSettings
from receiver_service.store import TransmissionStore
from receiver_service.views import class_palette
from receiver_service.worker import GenerationWorker
from shared.limits import SamplingOptions
from shared.semantic import codec
from shared.semantic.diffusion import samplers
from shared.semantic.diffusion.gaussian_diffusion import DiffusionConfig
from shared.semantic.diffusion.generator import GeneratorInfo, SemanticDiffusionConfig, SemanticImageGenerator
from shared.semantic.diffusion.unet import UNetConfig
from shared.wire import transport
from tests.service_procs import free_port


NUM_CLASSES = 12


class FakeGenerator:
    """Paints each pixel with the colour of its condition's argmax; `gate` holds generation (and
    calls the step callback while it does)."""

    max_steps = 100

    def __init__(self) -> None:
        self.info = GeneratorInfo(name="fake", trained=False, image_height=24, image_width=32,
                                  num_classes=NUM_CLASSES, checkpoint=None, parameters=0)
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[dict] = []
        self.fail_with: Exception | None = None
        self.inference_options: list[str] = []
        self.diffusion = types.SimpleNamespace(num_timesteps=self.max_steps)  # the chain's length, as the real one has

    def resolve(self, sampling: SamplingOptions) -> SamplingOptions:
        return samplers.resolve(sampling, self.max_steps)

    def use_channels_last(self) -> None:
        self.inference_options.append("channels_last")

    def compile(self) -> None:
        self.inference_options.append("compile")

    def trace(self) -> None:
        self.inference_options.append("trace")

    def generate(self, conditions, sampling, seeds, step_callback=None):
        sampler, steps, guidance = sampling.sampler, sampling.steps, sampling.guidance
        self.calls.append(dict(shape=tuple(conditions.shape), sampler=sampler, steps=steps,
                               guidance=guidance, seeds=list(seeds)))
        deadline = time.monotonic() + 30
        while not self.gate.wait(0.01):  # one "step" per wait, so a cancelled batch can stop
            assert time.monotonic() < deadline
            if step_callback is not None:
                step_callback(0, steps)
        if self.fail_with is not None:
            raise self.fail_with
        labels = conditions.argmax(dim=1).numpy()
        return class_palette(NUM_CLASSES)[labels]


def make_settings(tmp_path: Path, **overrides) -> ReceiverSettings:
    values = dict(store_dir=tmp_path / "store", checkpoint=tmp_path / "missing.pt", device="cpu", upscale=False,
                  queue_size=2, output_height=30, output_width=40, grpc_port=free_port(), http_port=free_port())
    values.update(overrides)
    return ReceiverSettings(**values)


def start_worker(tmp_path: Path, **overrides) -> GenerationWorker:
    """A worker on a disk store in `tmp_path` (queue of 8 unless overridden) whose model has loaded;
    its thread runs until `stop`."""
    store = TransmissionStore(tmp_path / "store", max_items=50, max_age_s=3600)
    store.open()
    worker = GenerationWorker(make_settings(tmp_path, **{"queue_size": 8, **overrides}), store)
    worker.load_model()
    assert worker.ready, worker.load_error
    return worker


def serve_as_the_model(monkeypatch, generator) -> None:
    """The receiver's model host loads `generator` whatever checkpoint it is given (and notes
    which one it was asked for)."""

    class Loader:
        @staticmethod
        def load(checkpoint_path, device="auto"):
            generator.loaded_from = (checkpoint_path, device)
            return generator

    monkeypatch.setattr(model_host, "SemanticImageGenerator", Loader)


def street_label_map(height: int = 24, width: int = 32) -> np.ndarray:
    label_map = np.full((height, width), 3, dtype=np.int64)  # road
    label_map[: height // 3] = 0  # sky
    label_map[height // 3 : 2 * height // 3, : width // 2] = 1  # building
    label_map[2 * height // 3 :, width // 2 :] = 8  # car
    return label_map


def transmission(label_map: np.ndarray | None = None, transmission_id: str | None = None,
                 sampling: gesco_pb2.SamplingRequest | None = None, factor: int = 1):
    label_map = street_label_map() if label_map is None else label_map
    encoded = codec.encode_label_map(label_map, codec.CodecConfig(NUM_CLASSES, downsample_factor=factor))
    header = gesco_pb2.TransmissionHeader(
        transmission_id=transmission_id or transport.new_transmission_id(),
        semantic=transport.semantic_header_to_proto(encoded.header),
        channel=gesco_pb2.ChannelRequest(model="awgn", snr_db=30.0,
                                         snr_definition=gesco_pb2.SNR_DEFINITION_PAPER_PSNR, equalize=True),
        image_bits_jpeg=12345,
    )
    if sampling is not None:
        header.sampling.CopyFrom(sampling)
    return header, encoded.symbols


def wait_for_status(store: TransmissionStore, transmission_id: str, statuses, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        record = store.get(transmission_id)
        if record["status"] in statuses:
            return record
        assert time.monotonic() < deadline, record
        time.sleep(0.05)


def decode_png(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


@contextmanager
def ready_client(settings, fake_generator) -> Iterator[TestClient]:
    """An in-process receiver app whose model has loaded; releases the fake generator on exit."""
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client.settings = settings
        yield client
        fake_generator.gate.set()


def receive(port: int, frames, request_id: str = "req-rest"):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return gesco_pb2_grpc.ReceiverStub(channel).Receive(
            iter(list(frames)), metadata=((transport.REQUEST_ID_METADATA_KEY, request_id),), timeout=20)


TINY = UNetConfig(num_classes=NUM_CLASSES, image_height=8, image_width=16, model_channels=32, channel_mult=(1, 2),
                  attention_downsample=(2,), head_channels=32, spade_hidden=16)


def tiny_generator() -> SemanticImageGenerator:
    """A small random network whose outputs depend on every input (no zero-initialised heads)."""
    generator = SemanticImageGenerator.load(None, "cpu", untrained_config=SemanticDiffusionConfig(
        unet=TINY, diffusion=DiffusionConfig(num_timesteps=50)))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in generator.network.parameters():
            torch.nn.init.normal_(parameter, std=0.05)
    return generator


def conditions(count: int) -> torch.Tensor:
    labels = torch.randint(0, NUM_CLASSES, (count, 8, 16), generator=torch.Generator().manual_seed(7))
    return torch.nn.functional.one_hot(labels, NUM_CLASSES).permute(0, 3, 1, 2).float()


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(transmission_id: str, created_at: float, status: str = "queued") -> dict:
    return {"id": transmission_id, "status": status, "created_at": created_at, "error": None, "timings_ms": {}}


def ddim(seed: int) -> gesco_pb2.SamplingRequest:
    return gesco_pb2.SamplingRequest(sampler="ddim", steps=3, seed=seed)


def ddpm(seed: int) -> gesco_pb2.SamplingRequest:
    return gesco_pb2.SamplingRequest(sampler="ddpm", steps=3, seed=seed)
