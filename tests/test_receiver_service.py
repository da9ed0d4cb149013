"""Receiver: store, settings, sampling defaults and worker in process; then the real service.

The in-process tests use a fake generator (fast, deterministic). The end-to-end tests start
`python -m channel_sim` and `python -m receiver_service` with an untrained model and 2 DDIM steps.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import cv2
import grpc
import httpx
import numpy as np
import pytest
import torch

from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from receiver_service.settings import REPO_ROOT, ReceiverSettings
from receiver_service.store import (
    RESTART_ERROR,
    DuplicateTransmissionError,
    TransmissionStore,
    UnknownTransmissionError,
)
from receiver_service.views import class_palette, labels_png, maps_png
from shared import codec, transport
from tests.service_procs import free_port, service_log, start_service, stop_service

IDS = [f"{i:032x}" for i in range(1, 20)]


# ----------------------------------------------------------------------------------------- store


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(transmission_id: str, created_at: float, status: str = "queued") -> dict:
    return {"id": transmission_id, "status": status, "created_at": created_at, "error": None, "timings_ms": {}}


def test_store_create_get_update(tmp_path):
    store = TransmissionStore(tmp_path, max_items=10, max_age_s=100)
    store.open()
    store.create(record(IDS[0], 1.0))
    assert store.get(IDS[0])["status"] == "queued"
    updated = store.update(IDS[0], status="running", timings_ms={"queue_wait": 3.0})
    updated = store.update(IDS[0], timings_ms={"sample": 4.0})
    assert updated["timings_ms"] == {"queue_wait": 3.0, "sample": 4.0}
    assert json.loads((tmp_path / IDS[0] / "status.json").read_text()) == updated
    assert not list(tmp_path.glob(f"{IDS[0]}/.*.tmp"))
    with pytest.raises(DuplicateTransmissionError):
        store.create(record(IDS[0], 2.0))
    with pytest.raises(UnknownTransmissionError):
        store.get(IDS[1])


def test_store_artifacts(tmp_path):
    store = TransmissionStore(tmp_path, max_items=10, max_age_s=100)
    store.open()
    store.create(record(IDS[0], 1.0))
    assert store.artifact_path(IDS[0], "image") is None
    store.write_artifact(IDS[0], "image", b"\x89PNG fake")
    assert store.artifact_path(IDS[0], "image").read_bytes() == b"\x89PNG fake"
    with pytest.raises(ValueError, match="unknown artifact"):
        store.write_artifact(IDS[0], "../status.json", b"x")
    with pytest.raises(UnknownTransmissionError):
        store.write_artifact(IDS[1], "image", b"x")


@pytest.mark.parametrize("bad_id", ["..", "../" + IDS[0][3:], "ABCDEF0123456789ABCDEF0123456789", IDS[0] + "/x", ""])
def test_store_never_builds_a_path_from_a_bad_id(tmp_path, bad_id):
    store = TransmissionStore(tmp_path / "store", max_items=10, max_age_s=100)
    store.open()
    with pytest.raises(ValueError, match="transmission_id"):
        store.create(record(bad_id, 1.0))
    for call in (store.get, store.contains, store.delete):
        with pytest.raises(ValueError, match="transmission_id"):
            call(bad_id)
    with pytest.raises(ValueError, match="transmission_id"):
        store.artifact_path(bad_id, "image")
    assert list(tmp_path.iterdir()) == [tmp_path / "store"]


def test_store_evicts_oldest_finished_first_by_count(tmp_path):
    clock = FakeClock()
    store = TransmissionStore(tmp_path, max_items=3, max_age_s=1e9, clock=clock)
    store.open()
    store.create(record(IDS[0], 1.0, "running"))  # oldest, but unfinished: kept
    store.create(record(IDS[1], 2.0, "done"))
    store.create(record(IDS[2], 3.0, "failed"))
    store.create(record(IDS[3], 4.0, "done"))
    assert not store_has(store, IDS[1]) and not (tmp_path / IDS[1]).exists()
    assert all(store_has(store, i) for i in (IDS[0], IDS[2], IDS[3]))
    store.create(record(IDS[4], 5.0))
    assert [i for i in IDS[:5] if store_has(store, i)] == [IDS[0], IDS[3], IDS[4]]


def test_store_never_evicts_unfinished_jobs(tmp_path):
    store = TransmissionStore(tmp_path, max_items=1, max_age_s=1e9)
    store.open()
    store.create(record(IDS[0], 1.0))
    store.create(record(IDS[1], 2.0))
    assert len(store) == 2


def test_store_evicts_by_age(tmp_path):
    clock = FakeClock(now=1000.0)
    store = TransmissionStore(tmp_path, max_items=100, max_age_s=60, clock=clock)
    store.open()
    store.create(record(IDS[0], 900.0, "done"))
    store.create(record(IDS[1], 900.0, "queued"))
    store.create(record(IDS[2], 990.0, "done"))
    assert not store_has(store, IDS[0])
    assert store_has(store, IDS[1]) and store_has(store, IDS[2])
    clock.now = 1100.0
    assert store.evict() == [IDS[2]]


def test_store_open_marks_unfinished_failed_and_keeps_the_rest(tmp_path):
    store = TransmissionStore(tmp_path, max_items=100, max_age_s=1e12)
    store.open()
    store.create(record(IDS[0], 1.0, "queued"))
    store.create(record(IDS[1], 2.0, "running"))
    store.create(record(IDS[2], 3.0, "done"))
    store.write_artifact(IDS[2], "image", b"png")
    (tmp_path / IDS[3]).mkdir()  # crashed between mkdir and status.json
    (tmp_path / IDS[4]).mkdir()
    (tmp_path / IDS[4] / "status.json").write_text("{not json")
    (tmp_path / "not-a-job").mkdir()
    (tmp_path / "notes.txt").write_text("keep me")

    reopened = TransmissionStore(tmp_path, max_items=100, max_age_s=1e12)
    assert sorted(reopened.open()) == [IDS[0], IDS[1]]
    for transmission_id in (IDS[0], IDS[1]):
        assert reopened.get(transmission_id)["status"] == "failed"
        assert reopened.get(transmission_id)["error"] == RESTART_ERROR
    assert reopened.get(IDS[2])["status"] == "done"
    assert reopened.artifact_path(IDS[2], "image").read_bytes() == b"png"
    assert not (tmp_path / IDS[3]).exists() and not (tmp_path / IDS[4]).exists()
    assert (tmp_path / "not-a-job").is_dir() and (tmp_path / "notes.txt").is_file()
    assert reopened.unfinished_ids() == []


def test_store_is_safe_under_concurrent_updates(tmp_path):
    store = TransmissionStore(tmp_path, max_items=100, max_age_s=1e12)
    store.open()
    store.create(record(IDS[0], 1.0))

    def bump(worker: int) -> None:
        for step in range(20):
            store.update(IDS[0], timings_ms={f"w{worker}-{step}": 1.0})

    threads = [threading.Thread(target=bump, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store.get(IDS[0])["timings_ms"]) == 80


def store_has(store: TransmissionStore, transmission_id: str) -> bool:
    return store.contains(transmission_id)


# -------------------------------------------------------------------------------- settings, views


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GESCO_RECEIVER_GRPC_PORT", "6001")
    monkeypatch.setenv("GESCO_RECEIVER_QUEUE_SIZE", "3")
    monkeypatch.setenv("GESCO_RECEIVER_STORE_DIR", str(tmp_path))
    monkeypatch.setenv("GESCO_RECEIVER_PUBLIC_URL", "http://example.test:9000/")
    monkeypatch.setenv("GESCO_RECEIVER_LOG_LEVEL", "debug")
    settings = ReceiverSettings()
    assert (settings.grpc_port, settings.queue_size, settings.store_dir) == (6001, 3, tmp_path)
    assert settings.public_url == "http://example.test:9000"
    assert settings.log_level == "DEBUG"
    assert settings.checkpoint == REPO_ROOT / "models/diffusion-camvid.pt"


def test_settings_defaults(monkeypatch):
    for key in list(os.environ):
        if key.startswith("GESCO_RECEIVER_"):
            monkeypatch.delenv(key)
    settings = ReceiverSettings()
    assert (settings.host, settings.grpc_port, settings.http_port) == ("127.0.0.1", 50052, 8001)
    assert settings.store_dir == REPO_ROOT / "var/receiver"
    assert settings.queue_size == 8 and settings.device == "auto"


@pytest.mark.parametrize(("name", "value"), [("QUEUE_SIZE", "0"), ("DEVICE", "tpu"), ("GRPC_PORT", "70000"),
                                             ("DEFAULT_GUIDANCE", "21")])
def test_bad_settings_are_rejected(monkeypatch, name, value):
    monkeypatch.setenv(f"GESCO_RECEIVER_{name}", value)
    with pytest.raises(ValueError):
        ReceiverSettings()


def test_palette_is_fixed_and_distinct():
    palette = class_palette(40)
    assert palette.shape == (40, 3) and palette.dtype == np.uint8
    assert len({tuple(colour) for colour in palette}) == 40
    np.testing.assert_array_equal(class_palette(12), palette[:12])


def test_debug_pngs():
    maps = np.zeros((5, 6, 8), dtype=np.float32)
    maps[2, :3] = 1.0
    maps[4, 3:] = 1.0
    labels = cv2.imdecode(np.frombuffer(labels_png(maps), np.uint8), cv2.IMREAD_UNCHANGED)
    assert labels.dtype == np.uint8 and labels.shape == (6, 8)
    assert (labels[:3] == 2).all() and (labels[3:] == 4).all()
    colours = cv2.imdecode(np.frombuffer(maps_png(maps), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    np.testing.assert_array_equal(colours[0, 0], class_palette(5)[2])
    many = np.zeros((300, 2, 2), dtype=np.float32)
    many[299] = 1.0
    wide = cv2.imdecode(np.frombuffer(labels_png(many), np.uint8), cv2.IMREAD_UNCHANGED)
    assert wide.dtype == np.uint16 and (wide == 299).all()
