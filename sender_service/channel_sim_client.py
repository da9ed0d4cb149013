"""The sender's client of the channel simulator (its gRPC Channel.Transmit): one header-first
frame stream per transmission."""
from __future__ import annotations

import grpc
import numpy as np

from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from shared.wire import grpc_security, transport


class ChannelSimCallError(Exception):
    """Channel.Transmit failed; `code` is the gRPC status the HTTP layer maps to a status code."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_s: int | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after_s = retry_after_s


class ChannelSimClient:
    """The channel simulator's client: an asyncio gRPC channel, opened once per process."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address
        self._channel = grpc_security.open_aio_channel(address, credentials, options=transport.CLIENT_CHANNEL_OPTIONS)
        self._stub = gesco_pb2_grpc.ChannelStub(self._channel)

    async def transmit(
        self,
        header: gesco_pb2.TransmissionHeader,
        channel: gesco_pb2.ChannelRequest,
        symbols: np.ndarray,
        timeout_s: float,
    ) -> gesco_pb2.TransmissionAck:
        """Stream the transmission through the channel `channel` asks for (set into the header),
        with its id as x-request-id and a deadline of `timeout_s`."""
        header.channel.CopyFrom(channel)
        frames = transport.symbol_frames(header, symbols)
        metadata = ((transport.REQUEST_ID_METADATA_KEY, header.transmission_id),)
        try:
            return await self._stub.Transmit(frames, metadata=metadata, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise ChannelSimCallError(
                error.code(), error.details() or "", _retry_after(error.trailing_metadata())
            ) from error

    async def close(self) -> None:
        await self._channel.close()


def _retry_after(metadata: grpc.aio.Metadata | None) -> int | None:
    for key, value in metadata or ():
        if key == transport.RETRY_AFTER_METADATA_KEY:
            try:
                return max(1, int(float(value)))
            except (TypeError, ValueError):
                return None
    return None
