"""A transmission's public status: what the receiver's REST API (GET /v1/transmissions/{id}) and
its gRPC GetTransmission and WatchTransmission answer, built in one place from the stored record.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel

from receiver_service.store import JobStatus
from receiver_service.store_factory import JobStore
from receiver_service.worker import GenerationWorker
from shared.wire.records import TransmissionRecord

# URL name of each debug map -> store artifact.
MAP_ARTIFACTS = {"received.png": "maps_received", "fds.png": "maps_fds", "fds_labels.png": "fds_labels",
                 "received_labels.png": "received_labels"}


class StageRun(BaseModel):
    """One stage that made a done transmission's image: "sample" (the generator), then each stage
    after it (the upscaler), with the model it ran and its milliseconds."""

    name: str
    model: str
    ms: float


class TransmissionStatus(TransmissionRecord):
    """A transmission's job at the receiver: its progress, the record of what it carried, the
    model that samples it and where its images are."""

    id: str
    status: JobStatus
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    timings_ms: dict[str, float]
    output: dict[str, int]
    model: dict[str, Any]
    urls: dict[str, str]
    # Once done, what made the image, in order.
    stages: list[StageRun] = []
    # While running, {"step": k, "steps": n}: sampling step k of n has started (known to the
    # process sampling it; null otherwise).
    progress: dict[str, int] | None = None


def public_status(record: dict[str, Any], public_url: str, worker: GenerationWorker, store: JobStore) -> dict[str, Any]:
    """The public status of a stored record, with the sampling step of a running job: this
    process's, else the sampling replica's (blocking: the store may be Redis)."""
    progress = None
    if record["status"] == JobStatus.RUNNING.value:
        progress = worker.progress(record["id"]) or store.progress(record["id"])
    return status_json(record, public_url, progress)


def status_json(record: dict[str, Any], public_url: str, progress: tuple[int, int] | None = None) -> dict[str, Any]:
    """The public status of a stored record: ISO timestamps, urls, sampling progress while
    running, no internal fields."""
    base = f"{public_url}/v1/transmissions/{record['id']}"
    public = {key: record[key] for key in TransmissionStatus.model_fields if key in record}
    for key in ("created_at", "started_at", "finished_at"):
        public[key] = _iso(record.get(key))
    public["urls"] = {
        "status": base,
        "image": f"{base}/image",
        **{f"maps_{name.removesuffix('.png')}": f"{base}/maps/{name}" for name in MAP_ARTIFACTS},
    }
    running = progress is not None and record["status"] == JobStatus.RUNNING.value
    public["progress"] = {"step": progress[0], "steps": progress[1]} if running else None
    return public


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")
