"""The receiver's job store: the embedded disk store, or the shared Redis store once its URL is set.

One receiver needs nothing but its disk (`make demo`, `make test`); replicas behind one channel
share Redis (GESCO_RECEIVER_REDIS_URL, password in GESCO_RECEIVER_REDIS_PASSWORD).
"""
from __future__ import annotations

from collections.abc import Callable

from receiver_service.redis_store import RedisStoreSettings, RedisTransmissionStore
from receiver_service.settings import ReceiverSettings
from receiver_service.store import TransmissionStore

JobStore = TransmissionStore | RedisTransmissionStore


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
