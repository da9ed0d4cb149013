"""The receiver's stages after sampling: the upscaler runs on every sampled image with the
received FDS maps, the status names each stage with its model and time, and a setting turns it off."""
from __future__ import annotations

from pathlib import Path

import torch

from receiver_service.grpc_server import queue_transmission
from receiver_service.store import TransmissionStore
from receiver_service.worker import GenerationWorker
from shared.semantic.checkpoints import save_checkpoint
from shared.semantic.upscaler import CHECKPOINT_KIND, UpscalerConfig, UpscalerNet
from tests.receiver_helpers import (
    NUM_CLASSES,
    TINY,
    decode_png,
    make_settings,
    start_worker,
    street_label_map,
    transmission,
    wait_for_status,
)


def upscaler_file(path: Path, in_height: int = TINY.image_height, in_width: int = TINY.image_width) -> Path:
    """A small random upscaler for the tiny generator's images (random, so its output is not bicubic)."""
    config = UpscalerConfig(num_classes=NUM_CLASSES, in_height=in_height, in_width=in_width, channels=8, blocks=1,
                            mid_channels=8, mid_blocks=1, out_channels=8, spade_hidden=8, out_spade_hidden=4)
    network = UpscalerNet(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(std=0.05)
    save_checkpoint(path, CHECKPOINT_KIND, config, network.state_dict(), {"name": "tiny-upscaler"})
    return path


def run_one(tmp_path: Path, **overrides) -> tuple[dict, tuple[int, ...]]:
    """One transmission through a worker on the tiny generator: its final record and image shape."""
    worker = start_worker(tmp_path, output_height=0, output_width=0, **overrides)
    store = worker.store
    try:
        header, symbols = transmission(street_label_map(), sampling=None)
        queue_transmission(worker, header, symbols, "req")
        record = wait_for_status(store, header.transmission_id, {"done", "failed"})
        assert record["status"] == "done", record["error"]
        image = decode_png(store.read_artifact(header.transmission_id, "image"))
        return record, image.shape
    finally:
        worker.stop(5)


def test_the_upscaler_runs_after_sampling_and_the_status_names_every_stage(tmp_path, tiny_model) -> None:
    path = upscaler_file(tmp_path / "up.pt")
    record, shape = run_one(tmp_path, upscale=True, upscaler=path)
    assert shape == (4 * TINY.image_height, 4 * TINY.image_width, 3)
    assert record["output"] == {"height": 4 * TINY.image_height, "width": 4 * TINY.image_width}
    assert [(stage["name"], stage["model"]) for stage in record["stages"]] == [
        ("sample", tiny_model.info.name), ("upscale-x4", "tiny-upscaler")]
    assert all(stage["ms"] > 0 for stage in record["stages"])
    assert record["stages"][1]["ms"] == record["timings_ms"]["upscale-x4"]


def test_without_the_stage_images_keep_the_generators_size(tmp_path, tiny_model) -> None:
    record, shape = run_one(tmp_path, upscale=False, upscaler=upscaler_file(tmp_path / "up.pt"))
    assert shape == (TINY.image_height, TINY.image_width, 3)
    assert [stage["name"] for stage in record["stages"]] == ["sample"]
    _, shape = run_one(tmp_path / "missing", upscale=True, upscaler=tmp_path / "no-such-upscaler.pt")
    assert shape == (TINY.image_height, TINY.image_width, 3)


def test_an_upscaler_for_other_images_fails_the_load_naming_the_file(tmp_path, tiny_model) -> None:
    path = upscaler_file(tmp_path / "for-48x64.pt", in_height=48, in_width=64)
    store = TransmissionStore(tmp_path / "store", max_items=10, max_age_s=3600)
    store.open()
    worker = GenerationWorker(make_settings(tmp_path, upscale=True, upscaler=path), store)
    worker.load_model()
    assert not worker.ready and "for-48x64.pt" in worker.load_error and "48x64" in worker.load_error
