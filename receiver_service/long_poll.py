"""Long polling of a transmission's status: GET .../{id}?wait_s=N answers once the job has
finished, or after N seconds with its status then.

A client waiting for its image (the sender's wait=true among them) then makes one request per job
instead of one every poll interval: no polling load on the process that samples, and the answer
comes the moment the job ends rather than up to an interval later. Waiting holds no thread: the
handler awaits an asyncio event that the store's finish callback sets from the worker's thread.
"""
from __future__ import annotations

import asyncio


class FinishWaiters:
    """Events of the requests waiting for each transmission to finish, set from any thread."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, set[asyncio.Event]] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the waiting handlers run on (the server's, known once it has started)."""
        self._loop = loop

    def notify_finished(self, transmission_id: str) -> None:
        """Thread-safe: wake every request waiting for `transmission_id`."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake, transmission_id)

    def _wake(self, transmission_id: str) -> None:
        for event in self._events.pop(transmission_id, ()):
            event.set()

    def register(self, transmission_id: str) -> asyncio.Event:
        """Register before reading the status, so that a job finishing in between still wakes it."""
        event = asyncio.Event()
        self._events.setdefault(transmission_id, set()).add(event)
        return event

    def unregister(self, transmission_id: str, event: asyncio.Event) -> None:
        waiting = self._events.get(transmission_id)
        if waiting is not None:
            waiting.discard(event)
            if not waiting:
                del self._events[transmission_id]

    async def wait(self, event: asyncio.Event, timeout_s: float) -> bool:
        """True when the job finished within `timeout_s`."""
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    @property
    def waiting(self) -> int:
        return sum(len(events) for events in self._events.values())
