"""Watches pushed, not polled: one broadcast per watched transmission, fed by the job's steps and end.

The job queue reports every sampling step of this process's jobs (`JobQueue.set_progress`); the
store reports every finish, this replica's and (Redis) the others', and the Redis store relays
the others' steps too. Each report that concerns a watched transmission wakes its topic, on the
event loop the watches are served on: the topic reads the store once (a finish, a status change),
builds the status message once, and hands it to every watcher of the transmission. A thousand
watchers of one job thus cost one store read per change and one message built per step, and no
thread each.

Bounds: a watcher keeps at most MAX_PENDING messages not yet sent to its client; beyond that the
oldest step is dropped (a client too slow to read every step gets the latest ones, always the
end). A topic with no report for REFRESH_S reads the store anyway: an end whose notification was
lost (Redis reconnecting) still ends its watches.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection
from concurrent.futures import Executor
from typing import Any

from receiver_service.store import FINISHED, JobStatus

log = logging.getLogger("receiver_service.watch_hub")

# Messages a watcher holds for a client that reads slower than the job steps.
MAX_PENDING = 64
# A topic re-reads the store after this long without a report (a lost notification).
REFRESH_S = 2.0

# (transmission id) -> its public status (blocking: the store may be Redis); raises what the store raises.
ReadStatus = Callable[[str], dict[str, Any]]
# (transmission id) -> the PNG of a done transmission (blocking).
ReadImage = Callable[[str], bytes]
# (status, image or b"") -> the message sent to every watcher (built once per change).
Render = Callable[[dict[str, Any], bytes], Any]


class WatchHub:
    """The watched transmissions of one process and their watchers, served on one event loop.

    `notify_progress` and `notify_finished` are thread-safe and cheap when nobody watches (a
    dictionary lookup); everything else runs on the loop given to `bind`.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._topics: dict[str, _Topic] = {}
        self._read_status: ReadStatus | None = None
        self._read_image: ReadImage | None = None
        self._render: Render | None = None
        self._executor: Executor | None = None

    def bind(self, loop: asyncio.AbstractEventLoop, executor: Executor, read_status: ReadStatus,
             read_image: ReadImage, render: Render) -> None:
        """Serve watches on `loop`, reading the store on `executor`'s threads."""
        self._loop, self._executor = loop, executor
        self._read_status, self._read_image, self._render = read_status, read_image, render

    # --- reports, from any thread ---------------------------------------------------------------
    def notify_progress(self, transmission_ids: Collection[str], step: int, steps: int) -> None:
        """Jobs that have started sampling step `step` of `steps`."""
        watched = [transmission_id for transmission_id in transmission_ids if transmission_id in self._topics]
        if watched:
            self._call_soon(self._progress, watched, step, steps)

    def notify_finished(self, transmission_id: str) -> None:
        """A job has finished (done, failed or cancelled), on this replica or another."""
        if transmission_id in self._topics:
            self._call_soon(self._finished, transmission_id)

    @property
    def watchers(self) -> int:
        return sum(len(topic.watchers) for topic in list(self._topics.values()))

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(callback, *args)
            except RuntimeError:  # the loop closed in between: nobody is watching any more
                pass

    def _progress(self, transmission_ids: list[str], step: int, steps: int) -> None:
        for transmission_id in transmission_ids:
            topic = self._topics.get(transmission_id)
            if topic is not None:
                topic.progress_reported(step, steps)

    def _finished(self, transmission_id: str) -> None:
        topic = self._topics.get(transmission_id)
        if topic is not None:
            topic.wake(stale=True)

    # --- watching, on the loop ------------------------------------------------------------------
    async def watch(self, transmission_id: str) -> AsyncIterator[Any]:
        """The current status at once, then each change of status or sampling step, ending with the
        finished status (and its image when done). Raises what reading the store raises
        (UnknownTransmissionError, StoreUnavailableError), at the start or later (evicted)."""
        topic = self._topics.get(transmission_id)
        if topic is None:
            topic = self._topics[transmission_id] = _Topic(self, transmission_id)
        watcher = _Watcher()
        topic.add(watcher)
        try:
            while True:
                message, last = await watcher.next()
                yield message
                if last:
                    return
        finally:
            topic.remove(watcher)

    def _drop(self, topic: _Topic) -> None:
        if self._topics.get(topic.transmission_id) is topic:
            del self._topics[topic.transmission_id]

    async def _blocking(self, function: Callable[..., Any], *args: Any) -> Any:
        assert self._loop is not None, "WatchHub.bind was never called"
        return await self._loop.run_in_executor(self._executor, function, *args)


class _Watcher:
    """One watch's messages not yet sent to its client (at most MAX_PENDING)."""

    def __init__(self) -> None:
        self._pending: deque[tuple[Any, bool]] = deque()
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, message: Any, last: bool) -> None:
        if len(self._pending) >= MAX_PENDING:
            self._pending.popleft()  # a step the client was too slow for; the latest ones stay
        self._pending.append((message, last))
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    async def next(self) -> tuple[Any, bool]:
        while not self._pending:
            if self._error is not None:
                raise self._error
            self._ready.clear()
            await self._ready.wait()
        return self._pending.popleft()


class _Topic:
    """A watched transmission: its watchers, what they were last sent, and the task that updates them."""

    def __init__(self, hub: WatchHub, transmission_id: str) -> None:
        self.hub = hub
        self.transmission_id = transmission_id
        self.watchers: set[_Watcher] = set()
        self._status: dict[str, Any] | None = None  # as last read from the store
        self._steps: deque[tuple[int, int]] = deque(maxlen=MAX_PENDING)  # reported, not yet sent
        self._stale = True  # the store must be read (first watcher, a finish, a new status)
        self._woken = asyncio.Event()
        self._sent: tuple[Any, ...] | None = None  # (status, progress) of the last message
        self._last_message: tuple[Any, bool] | None = None
        self._task: asyncio.Task | None = None

    def add(self, watcher: _Watcher) -> None:
        self.watchers.add(watcher)
        if self._last_message is not None:
            watcher.put(*self._last_message)  # where the others are: the status at once
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"watch-{self.transmission_id}")

    def remove(self, watcher: _Watcher) -> None:
        self.watchers.discard(watcher)
        if not self.watchers:
            self.hub._drop(self)
            if self._task is not None and self._task is not asyncio.current_task():
                self._task.cancel()

    def progress_reported(self, step: int, steps: int) -> None:
        latest = self._steps[-1] if self._steps else None
        if latest is None or step > latest[0] or steps != latest[1]:
            self._steps.append((step, steps))
        self.wake(stale=self._status is None or self._status["status"] != JobStatus.RUNNING.value)

    def wake(self, stale: bool) -> None:
        self._stale = self._stale or stale
        self._woken.set()

    async def _run(self) -> None:
        try:
            while self.watchers:
                self._woken.clear()
                if self._stale:
                    self._stale = False
                    self._status = await self.hub._blocking(self.hub._read_status, self.transmission_id)
                if await self._send_news():
                    return
                try:
                    await asyncio.wait_for(self._woken.wait(), REFRESH_S)
                except TimeoutError:
                    self._stale = True
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - the store's errors end every watch of this topic
            for watcher in self.watchers:
                watcher.fail(error)
        finally:
            self.hub._drop(self)

    async def _send_news(self) -> bool:
        """Send each reported step of a running job, or its new status; True once it has ended."""
        status = self._status
        assert status is not None
        if status["status"] in FINISHED:
            self._steps.clear()
            image = b""
            if status["status"] == JobStatus.DONE.value:
                image = await self.hub._blocking(self.hub._read_image, self.transmission_id)
            self._send(status, image, last=True)
            return True
        if status["status"] == JobStatus.RUNNING.value and self._steps:
            while self._steps:
                step, steps = self._steps.popleft()
                self._send({**status, "progress": {"step": step, "steps": steps}}, b"", last=False)
        else:
            self._send(status, b"", last=False)
        return False

    def _send(self, status: dict[str, Any], image: bytes, last: bool) -> None:
        """Build the message once and hand it to every watcher, unless it says nothing new."""
        seen = (status["status"], repr(status.get("progress")))
        if seen == self._sent and not last:
            return
        assert self.hub._render is not None
        message = self.hub._render(status, image)
        self._sent, self._last_message = seen, (message, last)
        for watcher in self.watchers:
            watcher.put(message, last)
