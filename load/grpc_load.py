"""gRPC load client: Channel.Transmit at a fixed rate for a fixed time, bounded in count and time.

Open loop: request i is sent at start + i / rate whatever the latency of the others (at most
--max-in-flight at once; beyond that a send is counted failed as "client: too many in flight").
After the sending phase it drains: polls the receiver's REST status of every accepted
transmission until it is done or failed, or --drain-s has passed. Then it prints sent, accepted,
completed, rejected (RESOURCE_EXHAUSTED), failed and lost (accepted but never finished), request
and completion latency percentiles, and the resident memory growth of each --metrics-url.

    python -m load.grpc_load --rate 0.5 --duration-s 300 --max-requests 200 --steps 5 \\
        --metrics-url http://127.0.0.1:8000/metrics --metrics-url http://127.0.0.1:9051/metrics \\
        --metrics-url http://127.0.0.1:8001/metrics --report run/grpc-load.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from load import report
from shared.semantic import codec
from shared.wire import grpc_security, transport

NUM_CLASSES = 12  # CamVid: 11 classes + void


def street_label_map(height: int = 96, width: int = 128) -> np.ndarray:
    """Sky, buildings, road, a car: a label map like the bundled example, made here."""
    labels = np.full((height, width), 3, dtype=np.int64)
    labels[: height // 3] = 0
    labels[height // 3 : 2 * height // 3, : width // 2] = 1
    labels[2 * height // 3 :, width // 2 :] = 8
    return labels


def make_payload(args: argparse.Namespace) -> tuple[gesco_pb2.TransmissionHeader, np.ndarray]:
    """The header template and symbols every request sends (ids and seeds vary per request)."""
    encoded = codec.encode_label_map(street_label_map(), codec.CodecConfig(num_classes=NUM_CLASSES))
    header = gesco_pb2.TransmissionHeader(
        semantic=transport.semantic_header_to_proto(encoded.header),
        channel=gesco_pb2.ChannelRequest(model="awgn", snr_db=args.snr_db, equalize=True,
                                         snr_definition=gesco_pb2.SNR_DEFINITION_PAPER_PSNR),
        sampling=gesco_pb2.SamplingRequest(sampler=args.sampler, steps=args.steps, guidance=0.0, use_fds=True),
    )
    return header, encoded.symbols


class LoadClient:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.record = report.LoadRecord()
        self.header, self.symbols = make_payload(args)
        self.in_flight = 0
        credentials = grpc_security.channel_credentials(args.tls_ca, args.tls_cert, args.tls_key, prefix="--tls-")
        self.channel = grpc_security.open_aio_channel(args.channel, credentials)
        self.stub = gesco_pb2_grpc.ChannelStub(self.channel)

    async def send_all(self) -> None:
        """Send at the fixed rate until the duration or the request count is reached."""
        args = self.args
        start = time.monotonic()
        tasks = []
        for index in range(args.max_requests):
            scheduled = start + index / args.rate
            if scheduled - start >= args.duration_s:
                break
            await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
            self.record.record_sent()
            if self.in_flight >= args.max_in_flight:
                self.record.record_failure("client: too many in flight")
                continue
            tasks.append(asyncio.create_task(self.send_one(index)))
        await asyncio.gather(*tasks)

    async def send_one(self, index: int) -> str | None:
        """Send request `index`; its transmission id if it was accepted, else None."""
        header = gesco_pb2.TransmissionHeader()
        header.CopyFrom(self.header)
        header.transmission_id = transport.new_transmission_id()
        header.channel.seed = header.sampling.seed = index % 2**64
        self.in_flight += 1
        sent_at, started = time.time(), time.monotonic()
        try:
            await self.stub.Transmit(
                transport.symbol_frames(header, self.symbols),
                metadata=((transport.REQUEST_ID_METADATA_KEY, header.transmission_id),),
                timeout=self.args.timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.record.record_rejected()
            else:
                self.record.record_failure(f"{error.code().name}: {error.details()}")
        else:
            self.record.record_accepted(header.transmission_id, sent_at, time.monotonic() - started)
            return header.transmission_id
        finally:
            self.in_flight -= 1
        return None


async def warm_up(args: argparse.Namespace) -> None:
    """Send --warmup requests one by one, then wait for their jobs (report.warm_up), so first-use
    allocations (model buffers, thread pools) are not counted as memory growth; they count in no
    total. Sent one at a time but not waited for one by one, their jobs can share a batch."""
    if not args.warmup:
        return
    client = LoadClient(args)
    loop = asyncio.get_running_loop()

    def send(index: int) -> str | None:  # from report.warm_up's thread, on this loop
        return asyncio.run_coroutine_threadsafe(client.send_one(index), loop).result()

    try:
        await asyncio.to_thread(report.warm_up, send, args.warmup, args.receiver_url, args.drain_s,
                                api_key=args.receiver_api_key)
    finally:
        await client.channel.close()


async def run(args: argparse.Namespace) -> dict:
    await warm_up(args)
    client = LoadClient(args)
    memory_before = report.memory_snapshot(args.metrics_url)
    try:
        await asyncio.wait_for(client.send_all(), timeout=args.duration_s + args.timeout_s + 5)
    except asyncio.TimeoutError:
        client.record.record_failure("client: the sending phase overran its time bound")
    finally:
        await client.channel.close()
    statuses = await asyncio.to_thread(report.drain, args.receiver_url, list(client.record.accepted), args.drain_s,
                                       api_key=args.receiver_api_key)
    memory_after = report.memory_snapshot(args.metrics_url)
    config = {key: value for key, value in vars(args).items() if key not in ("tls_key", "receiver_api_key")}
    return report.summarise(client.record, statuses, memory_before, memory_after, config)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channel", default="127.0.0.1:50051", help="gRPC address of the channel simulator")
    parser.add_argument("--receiver-url", default="http://127.0.0.1:8001",
                        help="the receiver's REST base URL (any replica, when several share Redis)")
    parser.add_argument("--receiver-api-key", default=os.environ.get("GESCO_LOAD_RECEIVER_API_KEY", ""),
                        help="the receiver's X-API-Key, if it has one (default: $GESCO_LOAD_RECEIVER_API_KEY)")
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second")
    parser.add_argument("--duration-s", type=float, default=30.0, help="length of the sending phase")
    parser.add_argument("--max-requests", type=int, default=100, help="most requests sent")
    parser.add_argument("--max-in-flight", type=int, default=64, help="most unanswered requests at once")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="deadline of each call")
    parser.add_argument("--drain-s", type=float, default=120.0, help="how long to wait for accepted jobs to finish")
    parser.add_argument("--warmup", type=int, default=0,
                        help="requests sent (and waited for) before the run, outside every count")
    parser.add_argument("--steps", type=int, default=5, help="sampling steps per job")
    parser.add_argument("--sampler", default="", help="sampler name (empty: the receiver's default)")
    parser.add_argument("--snr-db", type=float, default=20.0, help="channel SNR in dB (the paper's PSNR)")
    parser.add_argument("--metrics-url", action="append", default=[],
                        help="a /metrics URL whose resident memory is compared before and after (repeatable)")
    parser.add_argument("--report", default="", help="also write the report as JSON to this file")
    parser.add_argument("--tls-ca", default="", help="CA of the channel's certificate (turns TLS on)")
    parser.add_argument("--tls-cert", default="", help="client certificate, for mutual TLS")
    parser.add_argument("--tls-key", default="", help="client key, for mutual TLS")
    args = parser.parse_args(argv)
    for name in ("rate", "duration_s", "timeout_s"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if args.max_requests < 1 or args.max_in_flight < 1 or args.drain_s < 0 or args.warmup < 0:
        parser.error("--max-requests and --max-in-flight must be >= 1, --drain-s and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    print(report.format_summary(result))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
