"""The receiver's job store: the embedded disk store, or the shared Redis store once its URL is set.

One receiver needs nothing but its disk (`make demo`, `make test`); replicas behind one channel
share Redis (GESCO_RECEIVER_REDIS_URL, password in GESCO_RECEIVER_REDIS_PASSWORD).
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, Protocol

from receiver_service.redis_store import RedisStoreSettings, RedisTransmissionStore
from receiver_service.settings import ReceiverSettings
from receiver_service.store import TransmissionStore


class JobStore(Protocol):
    """What the receiver needs of a job store; the disk store and the Redis store both give it.

    Records are JSON dicts keyed by transmission id; artifacts are the PNGs of a job. Reads of an
    unknown id raise UnknownTransmissionError, an unreachable store StoreUnavailableError. A
    shared store keeps each job's inputs, hands a stopped or dead replica's jobs to the others
    (`claim`) and drops the writes of a replica that no longer holds the job at its `epoch`.
    """

    shares_jobs: bool  # jobs keep their inputs and may move between replicas (claim, hand_back)

    def open(self, unfinished_error: str = ...) -> list[str]: ...
    def close(self) -> list[str]: ...
    def check(self) -> None: ...
    def create(self, record: dict[str, Any], job_input: bytes = ...) -> None: ...
    def contains(self, transmission_id: str) -> bool: ...
    def get(self, transmission_id: str) -> dict[str, Any]: ...
    def update(self, transmission_id: str, epoch: int | None = ..., **changes: Any) -> dict[str, Any]: ...
    def request_cancel(self, transmission_id: str, reason: str) -> dict[str, Any]: ...
    def write_artifact(self, transmission_id: str, name: str, data: bytes, epoch: int | None = ...) -> None: ...
    def claim(self, limit: int) -> list[tuple[str, bytes, int]]: ...
    def hand_back(self, transmission_ids: Collection[str]) -> list[str]: ...
    def read_artifact(self, transmission_id: str, name: str) -> bytes | None: ...
    def set_progress(self, transmission_ids: Collection[str], step: int, steps: int) -> None: ...
    def progress(self, transmission_id: str) -> tuple[int, int] | None: ...
    def evict(self) -> list[str]: ...
    def set_job_holder(self, held_ids: Callable[[], Collection[str]]) -> None: ...
    def set_cancel_handler(self, handler: Callable[[str, str], None]) -> None: ...
    def set_progress_listener(self, listener: Callable[[Collection[str], int, int], None]) -> None: ...


def create_store(
    settings: ReceiverSettings,
    on_finished: Callable[[str], None] | None = None,
    redis_settings: RedisStoreSettings | None = None,
) -> JobStore:
    """Redis when `redis_settings.url` (default: from the environment) is set, else the disk
    store in settings.store_dir; both bounded by the store_max_items / store_max_age_s settings."""
    redis_settings = redis_settings or RedisStoreSettings()
    if redis_settings.url:
        return RedisTransmissionStore.from_settings(
            redis_settings, settings.store_max_items, settings.store_max_age_s, on_finished=on_finished
        )
    return TransmissionStore(settings.store_dir, settings.store_max_items, settings.store_max_age_s,
                             on_finished=on_finished)
