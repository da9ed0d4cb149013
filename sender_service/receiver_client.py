"""Waiting for the receiver's image over its REST API (the sender's wait=true mode).

The sender never imports the receiver: it polls the public status URL, as any client would, with
a long poll (`wait_s`): the receiver answers when the job finishes, so a waiting request costs the
receiver one status request, not one per poll interval while it samples. A receiver that goes
away mid-wait ends the wait at once with `ReceiverUnavailableError`. When the waiting client goes
away instead, `cancel` tells the receiver not to spend its sampling on it.
"""
from __future__ import annotations

import asyncio

import httpx

# A status request gets this long beyond its long poll; a slower receiver counts as a missed poll.
POLL_REQUEST_TIMEOUT_S = 10.0
# A freshly acknowledged transmission may be unknown to the receiver's REST API for a moment.
MAX_NOT_FOUND_POLLS = 5
DONE_STATUSES = frozenset({"done", "succeeded", "completed"})
FAILED_STATUSES = frozenset({"failed", "error", "cancelled"})


class ReceiverUnavailableError(Exception):
    """The receiver's REST API cannot be reached (refused, reset, DNS...)."""


class GenerationFailedError(Exception):
    """The receiver reports the transmission failed, lost it, or answered nonsense."""


class WaitTimeoutError(Exception):
    """The image was not ready within the wait timeout."""


def status_url(base_url: str, transmission_id: str) -> str:
    return f"{base_url}/v1/transmissions/{transmission_id}"


def image_url(base_url: str, transmission_id: str) -> str:
    return f"{status_url(base_url, transmission_id)}/image"


async def wait_for_image(
    client: httpx.AsyncClient,
    base_url: str,
    transmission_id: str,
    timeout_s: float,
    poll_interval_s: float,
    long_poll_s: float = 0.0,
) -> bytes:
    """Poll the status until done, then return the PNG bytes of the generated image.

    Each status request asks the receiver to hold it for up to `long_poll_s` (0: plain polling);
    `poll_interval_s` separates the requests that come back with the job unfinished.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    not_found = 0
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise WaitTimeoutError(f"the image was not ready within {timeout_s:g} s")
        response = await _get(client, status_url(base_url, transmission_id), remaining, long_poll_s)
        if response is not None:
            if response.status_code == 404:
                not_found += 1
                if not_found >= MAX_NOT_FOUND_POLLS:
                    raise GenerationFailedError(
                        "the receiver does not know this transmission (it may have restarted "
                        "without its store)"
                    )
            else:
                state, error = _parse_status(response)
                if state in DONE_STATUSES:
                    return await _fetch_image(client, base_url, transmission_id, deadline - loop.time())
                if state in FAILED_STATUSES:
                    raise GenerationFailedError(f"the receiver reports {state}: {error or 'no detail'}")
        await asyncio.sleep(max(0.0, min(poll_interval_s, deadline - loop.time())))


async def _get(client: httpx.AsyncClient, url: str, remaining_s: float, long_poll_s: float) -> httpx.Response | None:
    """GET `url`; None for a poll that timed out, ReceiverUnavailableError when unreachable."""
    wait_s = min(long_poll_s, remaining_s)
    params = {"wait_s": f"{wait_s:.3f}"} if wait_s > 0 else None
    try:
        return await client.get(url, params=params,
                                timeout=min(wait_s + POLL_REQUEST_TIMEOUT_S, max(remaining_s, 0.1)))
    except httpx.TimeoutException:
        return None
    except httpx.TransportError as error:
        raise ReceiverUnavailableError(
            f"the receiver at {url} cannot be reached: {type(error).__name__}: {error}"
        ) from error


async def cancel(client: httpx.AsyncClient, base_url: str, transmission_id: str) -> str:
    """Ask the receiver to cancel the transmission; what it answered, for the log (never raises)."""
    url = f"{status_url(base_url, transmission_id)}/cancel"
    try:
        response = await client.post(url, timeout=POLL_REQUEST_TIMEOUT_S)
    except httpx.HTTPError as error:
        return f"the receiver at {url} cannot be reached: {type(error).__name__}"
    return f"HTTP {response.status_code}"


def _parse_status(response: httpx.Response) -> tuple[str, str]:
    if response.status_code != 200:
        raise GenerationFailedError(
            f"the receiver answered HTTP {response.status_code} to a status request: "
            f"{response.text[:300]}"
        )
    try:
        body = response.json()
        state = str(body["status"]).lower()
    except (ValueError, KeyError, TypeError) as error:
        raise GenerationFailedError(f"the receiver's status is not understood: {response.text[:300]}") from error
    detail = body.get("error") or ""
    return state, detail if isinstance(detail, str) else str(detail)


async def _fetch_image(
    client: httpx.AsyncClient, base_url: str, transmission_id: str, remaining_s: float
) -> bytes:
    url = image_url(base_url, transmission_id)
    try:
        response = await client.get(url, timeout=max(remaining_s, 1.0))
    except httpx.TimeoutException as error:
        raise WaitTimeoutError(f"fetching {url} timed out") from error
    except httpx.TransportError as error:
        raise ReceiverUnavailableError(
            f"the receiver at {url} cannot be reached: {type(error).__name__}: {error}"
        ) from error
    if response.status_code != 200 or not response.content.startswith(b"\x89PNG"):
        raise GenerationFailedError(
            f"the receiver answered HTTP {response.status_code} without a PNG for {url}"
        )
    return response.content
