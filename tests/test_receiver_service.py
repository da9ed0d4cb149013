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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import grpc
import httpx
import numpy as np
import pytest

from gesco.stack import Ports, RunningStack
from gesco.stack import services as services_of
from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from receiver_service.settings import ReceiverSettings
from receiver_service.store import (
    RESTART_ERROR,
    DuplicateTransmissionError,
    TransmissionStore,
    UnknownTransmissionError,
)
from receiver_service.views import class_palette, labels_png, maps_png
from shared.paths import REPO_ROOT
from shared.semantic import codec
from shared.wire import transport
from tests.receiver_helpers import FakeClock, ddim, ddpm, record
from tests.service_procs import free_port, service_log, start_service, stop_service

IDS = [f"{i:032x}" for i in range(1, 20)]


# ----------------------------------------------------------------------------------------- store


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


def test_store_reports_finished_jobs(tmp_path):
    finished: list[str] = []
    store = TransmissionStore(tmp_path, max_items=10, max_age_s=100, on_finished=finished.append)
    store.open()
    store.create(record(IDS[0], 1.0))
    store.update(IDS[0], status="running")
    assert finished == []
    store.update(IDS[0], status="done")
    assert finished == [IDS[0]]


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


# ------------------------------------------------------------------- worker with a fake generator

from receiver_service.grpc_server import job_from_header, queue_transmission, sampling_request  # noqa: E402
from receiver_service.jobs import NotReadyError, QueueFullError  # noqa: E402
from receiver_service.worker import GenerationWorker  # noqa: E402
from shared.limits import SamplingOptions  # noqa: E402
from tests.receiver_helpers import (  # noqa: E402
    NUM_CLASSES,
    start_worker,
    decode_png,
    make_settings,
    street_label_map,
    transmission,
    wait_for_status,
)


@pytest.mark.parametrize(("overrides", "expected"), [({}, ["channels_last"]),
                                                     ({"trace_network": True}, ["channels_last", "trace"]),
                                                     ({"channels_last": False, "torch_compile": True}, ["compile"])])
def test_worker_applies_the_cpu_inference_settings(tmp_path, fake_generator, overrides, expected) -> None:
    store = TransmissionStore(tmp_path / "store", max_items=50, max_age_s=3600)
    store.open()
    worker = GenerationWorker(make_settings(tmp_path, **overrides), store)
    worker.load_model()
    try:
        assert worker.ready and fake_generator.inference_options == expected
    finally:
        worker.stop(5)


def test_worker_generates_and_stores_everything(running_worker, fake_generator):
    sampling = gesco_pb2.SamplingRequest(sampler="ddpm", steps=7, guidance=2.5, seed=99, use_fds=True)
    header, symbols = transmission(sampling=sampling)
    assert queue_transmission(running_worker, header, symbols, "req-1") == 0
    record = wait_for_status(running_worker.store, header.transmission_id, {"done", "failed"})
    assert record["status"] == "done", record["error"]
    assert record["sampling"] == {"sampler": "ddpm", "steps": 7, "guidance": 2.5, "seed": 99, "use_fds": True}
    assert set(record["timings_ms"]) == {"queue_wait", "decode_fds", "sample", "png", "total"}
    assert record["bits"]["image_bits_jpeg"] == 12345 and record["bits"]["num_symbols"] == symbols.size
    assert record["model"]["name"] == "fake" and record["model"]["trained"] is False
    assert record["request_id"] == "req-1"
    (call,) = fake_generator.calls
    assert call == dict(shape=(1, NUM_CLASSES, 24, 32), sampler="ddpm", steps=7, guidance=2.5, seeds=[99])
    store = running_worker.store
    image = decode_png(store.artifact_path(header.transmission_id, "image").read_bytes())
    assert image.shape == (30, 40, 3)
    labels = decode_png(store.artifact_path(header.transmission_id, "fds_labels").read_bytes())
    np.testing.assert_array_equal(labels, street_label_map())
    for name in ("maps_received", "maps_fds"):
        assert decode_png(store.artifact_path(header.transmission_id, name).read_bytes()).shape == (24, 32, 3)


def test_worker_decodes_downsampled_maps_at_the_transmitted_size(running_worker):
    label_map = street_label_map(48, 64)
    header, symbols = transmission(label_map, factor=4)
    queue_transmission(running_worker, header, symbols, "req")
    assert wait_for_status(running_worker.store, header.transmission_id, {"done", "failed"})["status"] == "done"
    labels = decode_png(running_worker.store.artifact_path(header.transmission_id, "fds_labels").read_bytes())
    assert labels.shape == (48, 64)
    assert np.mean(labels == label_map) > 0.9


def test_header_without_sampling_gets_the_defaults(running_worker, fake_generator):
    header, symbols = transmission()
    queue_transmission(running_worker, header, symbols, "req")
    record = wait_for_status(running_worker.store, header.transmission_id, {"done", "failed"})
    assert record["sampling"] == {"sampler": "ddim", "steps": 10, "guidance": 0.0, "seed": 0, "use_fds": True}


def test_queue_full_duplicates_and_positions(running_worker, fake_generator):
    fake_generator.gate.clear()
    jobs = [transmission() for _ in range(4)]
    assert queue_transmission(running_worker, *jobs[0], "a") == 0
    wait_for_status(running_worker.store, jobs[0][0].transmission_id, {"running"})
    assert queue_transmission(running_worker, *jobs[1], "b") == 1
    assert queue_transmission(running_worker, *jobs[2], "c") == 2  # queue_size 2: both slots now taken
    with pytest.raises(QueueFullError) as raised:
        queue_transmission(running_worker, *jobs[3], "d")
    assert raised.value.retry_after_s >= 1
    assert not running_worker.store.contains(jobs[3][0].transmission_id)
    with pytest.raises(DuplicateTransmissionError):
        queue_transmission(running_worker, *jobs[1], "b again")
    fake_generator.gate.set()
    for header, _ in jobs[:3]:
        assert wait_for_status(running_worker.store, header.transmission_id, {"done", "failed"})["status"] == "done"
    assert queue_transmission(running_worker, *jobs[3], "d") == 0


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        (gesco_pb2.SamplingRequest(sampler="euler"), "sampling.sampler"),
        (gesco_pb2.SamplingRequest(steps=101), "sampling.steps"),
        (gesco_pb2.SamplingRequest(guidance=20.5), "sampling.guidance"),
        (gesco_pb2.SamplingRequest(guidance=-1.0), "sampling.guidance"),
        (gesco_pb2.SamplingRequest(guidance=float("nan")), "sampling.guidance"),
    ],
)
def test_bad_sampling_requests(running_worker, sampling, message):
    header, symbols = transmission(sampling=sampling)
    with pytest.raises(ValueError, match=message):
        queue_transmission(running_worker, header, symbols, "req")
    assert not running_worker.store.contains(header.transmission_id)


def test_num_classes_must_match_the_model(running_worker):
    label_map = street_label_map()
    encoded = codec.encode_label_map(label_map, codec.CodecConfig(num_classes=19))
    header, _ = transmission()
    header.semantic.CopyFrom(transport.semantic_header_to_proto(encoded.header))
    with pytest.raises(ValueError, match="num_classes"):
        queue_transmission(running_worker, header, encoded.symbols, "req")


def test_sampling_failure_marks_the_job_failed(running_worker, fake_generator):
    fake_generator.fail_with = RuntimeError("out of memory")
    header, symbols = transmission()
    queue_transmission(running_worker, header, symbols, "req")
    record = wait_for_status(running_worker.store, header.transmission_id, {"done", "failed"})
    assert record["status"] == "failed" and "out of memory" in record["error"]
    fake_generator.fail_with = None
    header, symbols = transmission()
    queue_transmission(running_worker, header, symbols, "req")
    assert wait_for_status(running_worker.store, header.transmission_id, {"done", "failed"})["status"] == "done"


def test_not_ready_before_the_model_is_loaded(tmp_path):
    store = TransmissionStore(tmp_path, max_items=5, max_age_s=60)
    store.open()
    worker = GenerationWorker(make_settings(tmp_path), store)
    header, symbols = transmission()
    with pytest.raises(NotReadyError, match="loading"):
        queue_transmission(worker, header, symbols, "req")


def test_sampling_takes_the_settings_defaults(tmp_path, fake_generator):
    def sampling_of(worker: GenerationWorker, request: gesco_pb2.SamplingRequest | None) -> SamplingOptions:
        header, symbols = transmission(sampling=request)
        job, record = job_from_header(header, symbols, "req", worker)
        assert record["sampling"]["sampler"] == job.sampling.sampler
        return job.sampling

    tuned = start_worker(tmp_path / "tuned", default_sampler="ddpm", default_steps=12, default_guidance=1.5)
    defaults = start_worker(tmp_path / "defaults")
    try:
        request = sampling_request(gesco_pb2.TransmissionHeader(), tuned.settings)
        assert (request.guidance, request.seed, request.use_fds) == (1.5, 0, True)
        assert sampling_of(tuned, None) == SamplingOptions(sampler="ddpm", steps=12, guidance=1.5)
        request = gesco_pb2.SamplingRequest(guidance=0.0, seed=2**64 - 1, use_fds=False)
        assert sampling_of(tuned, request) == SamplingOptions(sampler="ddpm", steps=12, guidance=0.0)
        assert sampling_of(defaults, request) == SamplingOptions(sampler="ddim", steps=10, guidance=0.0)
        request.sampler = "ddpm"
        assert sampling_of(defaults, request).steps == 50  # that sampler's default
    finally:
        tuned.stop(5)
        defaults.stop(5)


def test_an_unknown_default_sampler_fails_the_model_load(tmp_path, fake_generator):
    store = TransmissionStore(tmp_path / "store", max_items=5, max_age_s=60)
    store.open()
    worker = GenerationWorker(make_settings(tmp_path, default_sampler="euler"), store)
    worker.load_model()
    assert not worker.ready and "default sampler must be one of" in worker.load_error


# ------------------------------------------------------------------------------ dynamic batching


def submit_while_busy(worker, fake_generator, samplings):
    """Hold the worker in a first job, queue one job per sampling request, then let it run."""
    fake_generator.gate.clear()
    first = transmission(sampling=gesco_pb2.SamplingRequest(sampler="ddim", steps=3, seed=100))
    queue_transmission(worker, *first, "first")
    wait_for_status(worker.store, first[0].transmission_id, {"running"})
    jobs = [transmission(sampling=sampling) for sampling in samplings]
    for header, symbols in jobs:
        queue_transmission(worker, header, symbols, "req")
    fake_generator.gate.set()
    for header, _ in [first, *jobs]:
        assert wait_for_status(worker.store, header.transmission_id, {"done", "failed"})["status"] == "done"
    return [(call["sampler"], call["seeds"]) for call in fake_generator.calls[1:]]


def test_batches_gather_compatible_jobs_and_keep_the_others_in_order(tmp_path, fake_generator):
    worker = start_worker(tmp_path, max_batch_size=2)
    try:
        calls = submit_while_busy(worker, fake_generator, [ddim(1), ddpm(2), ddim(3), ddim(4), ddpm(5)])
    finally:
        worker.stop(5)
    # ddpm(2) waits for the batch opened before it, then opens the next one ahead of the later
    # ddim(4); no batch exceeds two jobs or mixes settings.
    assert calls == [("ddim", [1, 3]), ("ddpm", [2, 5]), ("ddim", [4])]


def test_batch_size_one_disables_batching(tmp_path, fake_generator):
    worker = start_worker(tmp_path, max_batch_size=1, max_queue_delay_ms=500)
    try:
        started = time.monotonic()
        calls = submit_while_busy(worker, fake_generator, [ddim(1), ddim(2), ddpm(3)])
    finally:
        worker.stop(5)
    assert calls == [("ddim", [1]), ("ddim", [2]), ("ddpm", [3])]
    assert time.monotonic() - started < 2.0  # a batch of one never waits for company


def test_a_job_waits_for_company_at_most_the_queue_delay(tmp_path, fake_generator):
    worker = start_worker(tmp_path, max_batch_size=2, max_queue_delay_ms=5000)
    try:
        started = time.monotonic()
        jobs = [transmission(sampling=ddim(seed)) for seed in (1, 2)]
        queue_transmission(worker, *jobs[0], "a")
        time.sleep(0.1)
        queue_transmission(worker, *jobs[1], "b")
        for header, _ in jobs:
            wait_for_status(worker.store, header.transmission_id, {"done"})
        assert time.monotonic() - started < 4.0  # the batch left when full, not at the deadline
        assert [call["seeds"] for call in fake_generator.calls] == [[1, 2]]
    finally:
        worker.stop(5)
    worker = start_worker(tmp_path / "short", max_batch_size=2, max_queue_delay_ms=0)
    try:
        fake_generator.calls.clear()
        for seed in (3, 4):
            header, symbols = transmission(sampling=ddim(seed))
            queue_transmission(worker, header, symbols, "req")
            wait_for_status(worker.store, header.transmission_id, {"done"})
        assert [call["seeds"] for call in fake_generator.calls] == [[3], [4]]
    finally:
        worker.stop(5)


def test_held_jobs_count_against_the_queue_size(tmp_path, fake_generator):
    worker = start_worker(tmp_path, max_batch_size=4, max_queue_delay_ms=300, queue_size=2)
    try:
        fake_generator.gate.clear()
        first = transmission(sampling=ddim(1))
        queue_transmission(worker, *first, "a")
        queue_transmission(worker, *transmission(sampling=ddpm(2)), "b")  # held back while "a" waits for company
        wait_for_status(worker.store, first[0].transmission_id, {"running"})
        assert worker.queue_depth == 1
        queue_transmission(worker, *transmission(sampling=ddim(3)), "c")
        with pytest.raises(QueueFullError):
            queue_transmission(worker, *transmission(sampling=ddim(4)), "d")
    finally:
        fake_generator.gate.set()
        worker.stop(5)


def test_an_image_is_the_same_batched_or_alone(tmp_path):
    """Per-image generators: a job's image must not depend on its batch mates."""
    from receiver_service.jobs import Job
    from receiver_service.schedulers import run_batch
    from tests.receiver_helpers import tiny_generator

    generator = tiny_generator()  # no zero-initialised heads, which would hide differences
    jobs = []
    for seed, label in ((1, 3), (2, 8), (3, 3)):
        label_map = street_label_map()
        label_map[:8] = label
        header, symbols = transmission(label_map)
        semantic = transport.semantic_header_from_proto(header.semantic)
        sampling = SamplingOptions(sampler="dpmpp2m", steps=4, guidance=1.5)
        jobs.append(Job(header.transmission_id, "req", semantic, symbols, sampling, seed=seed, use_fds=seed != 2,
                        generator=generator))
    batched = run_batch(jobs)
    alone = [run_batch([job])[0] for job in jobs]
    for together, single in zip(batched, alone):
        assert together.error is None and single.error is None
        np.testing.assert_array_equal(together.image, single.image)
    assert not np.array_equal(batched[0].image, batched[2].image)


# ---------------------------------------------------------- REST + gRPC in process (fake generator)

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from tests.receiver_helpers import receive  # noqa: E402


def test_rest_status_image_and_maps(app_client, fake_generator):
    fake_generator.gate.clear()
    header, symbols = transmission(sampling=gesco_pb2.SamplingRequest(steps=3, seed=5, use_fds=True))
    header.channel_report.CopyFrom(gesco_pb2.ChannelReport(
        model="awgn", requested_snr_db=30.0, measured_snr_db=29.8,
        snr_definition=gesco_pb2.SNR_DEFINITION_PAPER_PSNR, channel_uses=symbols.size // 2))
    ack = receive(app_client.settings.grpc_port, transport.symbol_frames(header, symbols))
    assert ack.transmission_id == header.transmission_id and ack.queue_position == 0
    assert ack.channel_report.measured_snr_db == pytest.approx(29.8)
    tid = header.transmission_id

    status = app_client.get(f"/v1/transmissions/{tid}").json()
    assert status["status"] in ("queued", "running")
    response = app_client.get(f"/v1/transmissions/{tid}/image")
    assert response.status_code == 409 and response.json()["error"]["status"] in ("queued", "running")
    fake_generator.gate.set()
    deadline = time.monotonic() + 30
    while (status := app_client.get(f"/v1/transmissions/{tid}").json())["status"] != "done":
        assert status["status"] != "failed" and time.monotonic() < deadline, status
        time.sleep(0.05)

    assert status["id"] == tid and status["error"] is None
    assert status["channel"] == {"model": "awgn", "snr_definition": "paper_psnr", "requested_snr_db": 30.0,
                                 "measured_snr_db": pytest.approx(29.8), "channel_uses": symbols.size // 2}
    source_values = header.semantic.height * header.semantic.width * 3
    assert status["bits"] == {"payload_bits": int(header.semantic.payload_bits), "num_symbols": symbols.size,
                              "channel_uses": symbols.size // 2, "image_bits_jpeg": 12345, "image_jpeg_quality": 0,
                              "source_values": source_values,
                              "bandwidth_ratio": pytest.approx(symbols.size // 2 / source_values)}
    assert status["semantic"]["present_class_ids"] == [0, 1, 3, 8] and status["semantic"]["compression"] == "none"
    assert status["sampling"] == {"sampler": "ddim", "steps": 3, "guidance": 0.0, "seed": 5, "use_fds": True}
    assert status["model"]["name"] == "fake" and status["model"]["trained"] is False
    assert status["created_at"].endswith("+00:00") and status["finished_at"] >= status["created_at"]
    assert set(status["timings_ms"]) >= {"decode_fds", "sample", "png", "total"}
    base = f"http://receiver.test:8001/v1/transmissions/{tid}"
    assert status["urls"] == {"status": base, "image": f"{base}/image", "maps_received": f"{base}/maps/received.png",
                              "maps_fds": f"{base}/maps/fds.png", "maps_fds_labels": f"{base}/maps/fds_labels.png",
                              "maps_received_labels": f"{base}/maps/received_labels.png"}
    assert status["progress"] is None
    assert "request_id" not in status

    image = app_client.get(f"/v1/transmissions/{tid}/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert decode_png(image.content).shape == (30, 40, 3)
    for name in ("fds_labels.png", "received_labels.png"):  # noiseless: both are the sent map
        labels = app_client.get(f"/v1/transmissions/{tid}/maps/{name}")
        np.testing.assert_array_equal(decode_png(labels.content), street_label_map())
    for name in ("received.png", "fds.png"):
        assert app_client.get(f"/v1/transmissions/{tid}/maps/{name}").status_code == 200
    assert app_client.get(f"/v1/transmissions/{tid}/maps/secret.png").status_code == 404


def test_rest_status_shows_the_sampling_step_while_running(app_client, fake_generator):
    fake_generator.gate.clear()  # the fake sampler reports step 1 of 3 until the gate opens
    header, symbols = transmission(sampling=gesco_pb2.SamplingRequest(steps=3, seed=5, use_fds=True))
    receive(app_client.settings.grpc_port, transport.symbol_frames(header, symbols))
    tid = header.transmission_id
    deadline = time.monotonic() + 30
    while (status := app_client.get(f"/v1/transmissions/{tid}").json())["progress"] is None:
        assert status["status"] in ("queued", "running") and time.monotonic() < deadline, status
        time.sleep(0.02)
    assert status["status"] == "running" and status["progress"] == {"step": 1, "steps": 3}
    fake_generator.gate.set()
    done = app_client.get(f"/v1/transmissions/{tid}", params={"wait_s": 30}).json()
    assert done["status"] == "done" and done["progress"] is None


@pytest.mark.parametrize("bad_id", ["abc", "ABCDEF0123456789ABCDEF0123456789", "0" * 33, "..%2F..%2Fetc"])
def test_rest_rejects_bad_ids_naming_the_field(app_client, bad_id):
    for suffix in ("", "/image", "/maps/fds.png"):
        response = app_client.get(f"/v1/transmissions/{bad_id}{suffix}")
        assert response.status_code in (404, 422)
        if response.status_code == 422:
            assert response.json()["error"]["field"] == "transmission_id"
    assert app_client.get("/v1/transmissions/abc").status_code == 422


def test_rest_long_poll_answers_when_the_job_finishes(app_client, fake_generator):
    fake_generator.gate.clear()
    header, symbols = transmission(sampling=gesco_pb2.SamplingRequest(steps=3, seed=5))
    receive(app_client.settings.grpc_port, transport.symbol_frames(header, symbols))
    url = f"/v1/transmissions/{header.transmission_id}"
    started = time.monotonic()
    assert app_client.get(url, params={"wait_s": 0.3}).json()["status"] in ("queued", "running")
    assert time.monotonic() - started >= 0.3  # held for the whole wait while unfinished

    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(app_client.get, url, params={"wait_s": 30})
        time.sleep(0.3)
        assert not waiting.done()
        opened = time.monotonic()
        fake_generator.gate.set()
        status = waiting.result(timeout=20).json()
    assert status["status"] == "done" and time.monotonic() - opened < 5
    started = time.monotonic()
    assert app_client.get(url, params={"wait_s": 30}).json()["status"] == "done"  # finished: at once
    assert time.monotonic() - started < 5
    assert app_client.app.state.receiver.waiters.waiting == 0


@pytest.mark.parametrize("wait_s", ["-1", "61", "soon"])
def test_rest_long_poll_rejects_bad_waits_naming_the_field(app_client, wait_s):
    response = app_client.get(f"/v1/transmissions/{transport.new_transmission_id()}", params={"wait_s": wait_s})
    assert response.status_code == 422 and response.json()["error"]["field"] == "wait_s"


def test_rest_long_poll_of_an_unknown_id_is_404_at_once(app_client):
    started = time.monotonic()
    response = app_client.get(f"/v1/transmissions/{transport.new_transmission_id()}", params={"wait_s": 30})
    assert response.status_code == 404 and time.monotonic() - started < 5


def test_rest_unknown_id_is_404(app_client):
    unknown = transport.new_transmission_id()
    for suffix in ("", "/image", "/maps/received.png"):
        response = app_client.get(f"/v1/transmissions/{unknown}{suffix}")
        assert response.status_code == 404 and response.json()["error"]["field"] == "transmission_id"


def test_health_ready_docs_and_grpc_health(app_client):
    assert app_client.get("/healthz").json() == {"status": "ok"}
    ready = app_client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["model"]["name"] == "fake"
    docs = app_client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()
    assert "/v1/transmissions/{transmission_id}" in app_client.get("/openapi.json").json()["paths"]
    with grpc.insecure_channel(f"127.0.0.1:{app_client.settings.grpc_port}") as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="gesco.v1.Receiver"), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_errors_in_process(app_client, fake_generator):
    port = app_client.settings.grpc_port
    header, symbols = transmission()
    frames = list(transport.symbol_frames(header, symbols, chunk_bytes=256))
    for bad, code in [(frames[1:], grpc.StatusCode.INVALID_ARGUMENT), (frames[:-1], grpc.StatusCode.INVALID_ARGUMENT)]:
        with pytest.raises(grpc.RpcError) as raised:
            receive(port, bad)
        assert raised.value.code() == code
    fake_generator.gate.clear()
    receive(port, frames)
    with pytest.raises(grpc.RpcError) as raised:
        receive(port, frames)
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    wait_for_status(app_client.app.state.receiver.store, header.transmission_id, {"running"})
    receive(port, transport.symbol_frames(*transmission()))  # fills the one queue slot
    with pytest.raises(grpc.RpcError) as raised:
        receive(port, transport.symbol_frames(*transmission()))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(raised.value.trailing_metadata())["retry-after"]) >= 1
    fake_generator.gate.set()


# ------------------------------------------------------------ real processes, untrained model

E2E_SAMPLING = gesco_pb2.SamplingRequest(sampler="ddim", steps=2, guidance=0.0, seed=11, use_fds=True)
E2E_OUTPUT = (72, 96)


def receiver_settings(tmp_path: Path, store_dir: Path, **overrides) -> dict[str, str]:
    """An untrained receiver's variables for the end-to-end tests, ports aside."""
    return {
        "GESCO_RECEIVER_STORE_DIR": str(store_dir),
        "GESCO_RECEIVER_CHECKPOINT": str(tmp_path / "no-such-checkpoint.pt"),
        "GESCO_RECEIVER_DEVICE": "cpu",
        "GESCO_RECEIVER_QUEUE_SIZE": "4",
        "GESCO_RECEIVER_TORCH_THREADS": "1",
        "GESCO_RECEIVER_OUTPUT_HEIGHT": str(E2E_OUTPUT[0]),
        "GESCO_RECEIVER_OUTPUT_WIDTH": str(E2E_OUTPUT[1]),
        **{f"GESCO_RECEIVER_{key.upper()}": str(value) for key, value in overrides.items()},
    }


def receiver_env(tmp_path: Path, store_dir: Path, **overrides) -> tuple[dict[str, str], int, int]:
    grpc_port, http_port = free_port(), free_port()
    env = {
        "GESCO_RECEIVER_GRPC_PORT": str(grpc_port),
        "GESCO_RECEIVER_HTTP_PORT": str(http_port),
        "GESCO_RECEIVER_PUBLIC_URL": f"http://127.0.0.1:{http_port}",
        **receiver_settings(tmp_path, store_dir, **overrides),
    }
    return env, grpc_port, http_port


def start_receiver(env: dict[str, str], grpc_port: int, http_port: int):
    proc = start_service("receiver_service", env, ready_url=f"http://127.0.0.1:{http_port}/readyz",
                         grpc_port=grpc_port, timeout=180)
    proc.grpc_port, proc.http_port = grpc_port, http_port
    return proc


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """An untrained receiver and the channel in front of it, wired by gesco.stack (no sender)."""
    tmp_path = tmp_path_factory.mktemp("receiver-e2e")
    ports = Ports.free()
    wired = services_of(ports, settings={"receiver": receiver_settings(tmp_path, tmp_path / "store"),
                                         "channel": {"GESCO_CHANNEL_METRICS_PORT": "0"}})
    stack = RunningStack([service for service in wired if service.name != "sender"], tmp_path / "logs")
    receiver, channel = stack.procs["receiver"], stack.procs["channel"]
    receiver.grpc_port, receiver.http_port, channel.port = ports.receiver_grpc, ports.receiver_http, ports.channel
    yield receiver, channel
    assert stop_service(channel) == 0, stack.log("channel")
    assert stop_service(receiver) == 0, stack.log("receiver")


def e2e_transmission(snr_db: float = 40.0, sampling=E2E_SAMPLING, transmission_id: str | None = None):
    label_map = street_label_map(48, 64)
    header, symbols = transmission(label_map, transmission_id=transmission_id, sampling=sampling)
    header.channel.snr_db = snr_db
    return header, symbols, label_map


def via_channel(port: int, frames, request_id: str = "req-e2e", timeout: float = 60.0):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return gesco_pb2_grpc.ChannelStub(channel).Transmit(
            iter(list(frames)), metadata=((transport.REQUEST_ID_METADATA_KEY, request_id),), timeout=timeout)


def poll_status(http_port: int, transmission_id: str, statuses, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"http://127.0.0.1:{http_port}/v1/transmissions/{transmission_id}", timeout=10).json()
        if status["status"] in statuses:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.3)


def test_e2e_transmission_through_the_channel_ends_done(services):
    receiver, channel = services
    header, symbols, label_map = e2e_transmission()
    ack = via_channel(channel.port, transport.symbol_frames(header, symbols, chunk_bytes=4096), "req-e2e-done")
    assert ack.transmission_id == header.transmission_id
    assert ack.channel_report.model == "awgn" and ack.channel_report.channel_uses == -(-symbols.size // 2)

    status = poll_status(receiver.http_port, header.transmission_id, {"done", "failed"})
    assert status["status"] == "done", status["error"]
    assert status["channel"]["model"] == "awgn"
    assert status["channel"]["snr_definition"] == "paper_psnr"
    assert status["channel"]["requested_snr_db"] == 40.0
    assert abs(status["channel"]["measured_snr_db"] - 40.0) < 1.0
    assert status["bits"]["num_symbols"] == symbols.size and status["bits"]["image_bits_jpeg"] == 12345
    assert status["sampling"] == {"sampler": "ddim", "steps": 2, "guidance": 0.0, "seed": 11, "use_fds": True}
    assert status["model"]["trained"] is False and status["model"]["checkpoint"] is None
    assert status["model"]["num_classes"] == NUM_CLASSES
    assert status["timings_ms"]["sample"] > 0

    image = httpx.get(status["urls"]["image"], timeout=10)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert decode_png(image.content).shape == (*E2E_OUTPUT, 3)
    labels = decode_png(httpx.get(status["urls"]["maps_fds_labels"], timeout=10).content)
    np.testing.assert_array_equal(labels, label_map)
    for key in ("maps_received", "maps_fds"):
        assert decode_png(httpx.get(status["urls"][key], timeout=10).content).shape == (48, 64, 3)

    job_lines = [json.loads(line) for line in service_log(receiver).splitlines() if line.startswith("{")]
    tagged = [line for line in job_lines if line.get("request_id") == "req-e2e-done"]
    assert {"receive", "job started", "job finished"} <= {line["msg"] for line in tagged}


def test_e2e_bad_input_is_invalid_argument_and_the_next_request_works(services):
    receiver, channel = services
    header, symbols, _ = e2e_transmission()
    frames = list(transport.symbol_frames(header, symbols, chunk_bytes=1024))
    nan_symbols = symbols.copy()
    nan_symbols[-1] = np.nan
    unknown_sampler, _, _ = e2e_transmission(sampling=gesco_pb2.SamplingRequest(sampler="euler", steps=2))
    bad_streams = {
        "no header": frames[1:],
        "chunks short": frames[:-1],
        "chunks long": [*frames, frames[-1]],
        "nan": list(transport.symbol_frames(header, nan_symbols)),
        "unknown sampler": list(transport.symbol_frames(unknown_sampler, symbols)),
    }
    for name, bad in bad_streams.items():
        for send, port in ((via_channel, channel.port), (receive, receiver.grpc_port)):
            with pytest.raises(grpc.RpcError) as raised:
                send(port, bad)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, raised.value.details())
    ack = via_channel(channel.port, frames)
    assert ack.transmission_id == header.transmission_id
    with pytest.raises(grpc.RpcError) as raised:
        via_channel(channel.port, frames)
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    bad_id = httpx.get(f"http://127.0.0.1:{receiver.http_port}/v1/transmissions/not-an-id", timeout=10)
    assert bad_id.status_code == 422 and bad_id.json()["error"]["field"] == "transmission_id"


@pytest.mark.processes
def test_e2e_queue_full_then_restart_fails_unfinished_jobs(tmp_path):
    store_dir = tmp_path / "store"
    slow = gesco_pb2.SamplingRequest(sampler="ddim", steps=1000, guidance=0.0, seed=1, use_fds=True)
    env, grpc_port, http_port = receiver_env(tmp_path, store_dir, queue_size=1)
    receiver = start_receiver(env, grpc_port, http_port)
    try:
        running, _, _ = e2e_transmission(sampling=slow)
        queued, _, _ = e2e_transmission(sampling=slow)
        rejected, symbols, _ = e2e_transmission(sampling=slow)
        assert receive(grpc_port, transport.symbol_frames(running, symbols)).queue_position == 0
        poll_status(http_port, running.transmission_id, {"running"}, timeout=60)
        assert receive(grpc_port, transport.symbol_frames(queued, symbols)).queue_position == 1
        with pytest.raises(grpc.RpcError) as raised:
            receive(grpc_port, transport.symbol_frames(rejected, symbols))
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(dict(raised.value.trailing_metadata())["retry-after"]) >= 1
        receiver.send_signal(signal.SIGKILL)  # a crash: nothing gets to clean up
        receiver.wait(30)
    finally:
        stop_service(receiver)

    env, grpc_port, http_port = receiver_env(tmp_path, store_dir, queue_size=1)
    receiver = start_receiver(env, grpc_port, http_port)
    try:
        for header in (running, queued):
            status = poll_status(http_port, header.transmission_id, {"failed"}, timeout=5)
            assert status["error"] == RESTART_ERROR
        unknown = httpx.get(f"http://127.0.0.1:{http_port}/v1/transmissions/{rejected.transmission_id}", timeout=10)
        assert unknown.status_code == 404
        # A clean shutdown with a job in progress still exits promptly and with status 0.
        receive(grpc_port, transport.symbol_frames(rejected, symbols))
        poll_status(http_port, rejected.transmission_id, {"running"}, timeout=60)
        started = time.monotonic()
        assert stop_service(receiver, timeout=30) == 0, service_log(receiver)
        assert time.monotonic() - started < 30
    finally:
        stop_service(receiver)
