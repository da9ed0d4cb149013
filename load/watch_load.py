"""Watch load: N watchers on each of M transmissions, what each received, and the receiver's
sampling throughput with and without them, in one run.

Each round sends M transmissions at once straight to the Receive of the --receiver addresses
(round robin: the replica that generates each) and waits for them: a baseline round without
watchers, then a watched round whose transmissions get --watchers WatchTransmission streams each,
opened as soon as a transmission is acknowledged and spread over the --watch addresses (default:
the receivers) other than the one generating it, when there are others: with replicas sharing
Redis, every watch follows a job generated on another replica. Rounds alternate --rounds times,
so both kinds see the same machine.

Per watcher it records: refused (RESOURCE_EXHAUSTED) or failed (any other error), the steps it
received, gaps (a step missing between the first it saw and the last of the job), and whether it
ended with the status done and the PNG. "Every step it was open for" means: no gap, and the last
step and the image received. The throughput of a round is the sampling steps of its jobs per
second, from the first job's start to the last one's end (the receiver's statuses); the report
compares the watched rounds with the baseline rounds, and the CPU seconds the receivers spent in
each (--metrics-url: the process, its gRPC event loop, its sampling thread): on a shared machine,
whose other tenants move the throughput from round to round, the CPU the watches take is the
steadier measure. The resident memory of each --metrics-url
is read before the first watched round, every 0.5 s while watches are open (the peak), and after.

    python -m load.watch_load --receiver 127.0.0.1:50052 --transmissions 4 --watchers 250 \\
        --steps 200 --sampler ddim --rounds 2 --metrics-url http://127.0.0.1:8001/metrics \\
        --report run/watch-load.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import grpc

from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from load import report
from load.grpc_load import make_payload
from shared.wire import transport

FINISHED = ("done", "failed", "cancelled")
# The receivers' CPU seconds read before and after each round: the whole process, the event loop
# serving the watches (and the rest of gRPC), the thread that samples.
CPU_SAMPLES = {"process": "process_cpu_seconds_total",
               "grpc_loop": 'gesco_thread_cpu_seconds{thread="receiver-grpc"}',
               "sampling": 'gesco_thread_cpu_seconds{thread="generation-worker"}'}
# Watch streams per client connection (HTTP/2 multiplexes them; several connections spread the
# client's reading).
STREAMS_PER_CONNECTION = 100


@dataclass
class WatcherResult:
    """What one watch received."""

    target: str
    outcome: str = "open"  # complete, incomplete, refused, failed: <code>
    messages: int = 0
    first_step: int | None = None
    last_step: int | None = None
    gaps: int = 0  # steps missing between the first and the last received
    final_status: str | None = None
    image_bytes: int = 0


@dataclass
class RoundResult:
    kind: str  # baseline or watched
    transmissions: list[str] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)
    sampling_steps_per_s: float | None = None
    seconds: float | None = None
    cpu_seconds: dict[str, dict[str, float | None]] = field(default_factory=dict)  # per --metrics-url
    client_cpu_seconds: float | None = None  # this process's: on the receivers' machine, a competitor
    watchers: list[WatcherResult] = field(default_factory=list)


class Watchers:
    """The client connections the watches share, a few streams per connection, per target."""

    def __init__(self, targets: list[str], api_key: str) -> None:
        self.targets = targets
        self.metadata = (("x-api-key", api_key),) if api_key else ()
        self._channels: dict[str, list[grpc.aio.Channel]] = {target: [] for target in targets}
        self._counts: Counter = Counter()

    def stub_for(self, target: str) -> gesco_pb2_grpc.ReceiverStub:
        channels = self._channels[target]
        if self._counts[target] % STREAMS_PER_CONNECTION == 0:
            channels.append(grpc.aio.insecure_channel(target))
        self._counts[target] += 1
        return gesco_pb2_grpc.ReceiverStub(channels[-1])

    async def close(self) -> None:
        for channels in self._channels.values():
            for channel in channels:
                await channel.close()


async def watch_one(stub: gesco_pb2_grpc.ReceiverStub, result: WatcherResult, transmission_id: str,
                    steps: int, metadata, timeout_s: float) -> None:
    request = gesco_pb2.WatchTransmissionRequest(transmission_id=transmission_id)
    try:
        async for message in stub.WatchTransmission(request, metadata=metadata, timeout=timeout_s):
            result.messages += 1
            status = message.status
            if status.status == "running" and status.HasField("progress"):
                step = status.progress.step
                if result.first_step is None:
                    result.first_step = step
                elif step > (result.last_step or 0) + 1:
                    result.gaps += step - (result.last_step or 0) - 1
                result.last_step = step
            if status.status in FINISHED:
                result.final_status, result.image_bytes = status.status, len(message.image_png)
    except grpc.aio.AioRpcError as error:
        refused = error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        result.outcome = "refused" if refused else f"failed: {error.code().name}"
        return
    complete = (result.final_status == "done" and result.image_bytes > 0 and result.gaps == 0
                and (result.last_step == steps or result.first_step is None))
    result.outcome = "complete" if complete else "incomplete"


async def send(stub: gesco_pb2_grpc.ReceiverStub, args: argparse.Namespace, index: int) -> str:
    header_template, symbols = make_payload(args)
    header = gesco_pb2.TransmissionHeader()
    header.CopyFrom(header_template)
    header.transmission_id = transport.new_transmission_id()
    header.sampling.seed = index
    await stub.Receive(transport.symbol_frames(header, symbols), timeout=args.timeout_s)
    return header.transmission_id


async def wait_finished(stub: gesco_pb2_grpc.ReceiverStub, ids: list[str], metadata, drain_s: float) -> dict[str, dict]:
    """The final statuses (as JSON-like dicts) of `ids`, read every 0.5 s until all have finished."""
    deadline = time.monotonic() + drain_s
    finished: dict[str, dict] = {}
    while len(finished) < len(ids) and time.monotonic() < deadline:
        for transmission_id in ids:
            if transmission_id in finished:
                continue
            answer = await stub.GetTransmission(gesco_pb2.GetTransmissionRequest(transmission_id=transmission_id),
                                                metadata=metadata, timeout=10)
            if answer.status.status in FINISHED:
                finished[transmission_id] = {"status": answer.status.status, "started_at": answer.status.started_at,
                                             "finished_at": answer.status.finished_at}
        await asyncio.sleep(0.5)
    return finished


def throughput(finals: dict[str, dict], steps: int) -> tuple[float | None, float | None]:
    """(sampling steps per second, seconds) from the first start to the last end of the jobs."""
    starts = [_timestamp(final["started_at"]) for final in finals.values() if final["status"] == "done"]
    ends = [_timestamp(final["finished_at"]) for final in finals.values() if final["status"] == "done"]
    if not starts or None in starts or None in ends:
        return None, None
    seconds = max(ends) - min(starts)
    return round(len(starts) * steps / seconds, 3), round(seconds, 3)


def _timestamp(iso: str) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


async def run_round(args: argparse.Namespace, kind: str, watchers: Watchers | None,
                    memory: dict[str, list[float | None]]) -> RoundResult:
    result = RoundResult(kind)
    cpu_before = await asyncio.to_thread(_cpu_seconds, args.metrics_url)
    client_before = time.process_time()
    channels = [grpc.aio.insecure_channel(receiver) for receiver in args.receiver]
    try:
        stubs = [gesco_pb2_grpc.ReceiverStub(channel) for channel in channels]
        stub = stubs[0]
        watching: list[asyncio.Task] = []

        async def send_and_watch(index: int) -> str:
            receiver = args.receiver[index % len(args.receiver)]
            transmission_id = await send(stubs[index % len(stubs)], args, index)
            if watchers is not None:
                targets = [target for target in watchers.targets if target != receiver] or watchers.targets
                for number in range(args.watchers):
                    target = targets[(index * args.watchers + number) % len(targets)]
                    watcher = WatcherResult(target)
                    result.watchers.append(watcher)
                    watching.append(asyncio.create_task(watch_one(
                        watchers.stub_for(target), watcher, transmission_id, args.steps, watchers.metadata,
                        args.drain_s)))
            return transmission_id

        sampling = asyncio.create_task(_sample_memory(args.metrics_url, memory)) if watchers is not None else None
        result.transmissions = list(await asyncio.gather(*(send_and_watch(index)
                                                           for index in range(args.transmissions))))
        metadata = watchers.metadata if watchers is not None else ()
        finals = await wait_finished(stub, result.transmissions, metadata or _metadata(args), args.drain_s)
        if watching:
            await asyncio.wait(watching, timeout=args.drain_s)
        if sampling is not None:
            sampling.cancel()
    finally:
        for channel in channels:
            await channel.close()
    cpu_after = await asyncio.to_thread(_cpu_seconds, args.metrics_url)
    result.client_cpu_seconds = round(time.process_time() - client_before, 2)
    result.cpu_seconds = {url: {part: _difference(cpu_before[url][part], cpu_after[url][part])
                                for part in CPU_SAMPLES} for url in args.metrics_url}
    result.statuses = {transmission_id: final["status"] for transmission_id, final in finals.items()}
    result.sampling_steps_per_s, result.seconds = throughput(finals, args.steps)
    return result


async def _sample_memory(urls: list[str], memory: dict[str, list[float | None]]) -> None:
    while True:
        snapshot = await asyncio.to_thread(report.memory_snapshot, urls)
        for url, value in snapshot.items():
            memory.setdefault(url, []).append(value)
        await asyncio.sleep(0.5)


def _cpu_seconds(urls: list[str]) -> dict[str, dict[str, float | None]]:
    return {url: {part: report.process_metric(url, sample) for part, sample in CPU_SAMPLES.items()} for url in urls}


def _difference(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or math.isnan(before) or math.isnan(after):
        return None
    return round(after - before, 2)


def _metadata(args: argparse.Namespace):
    return (("x-api-key", args.receiver_api_key),) if args.receiver_api_key else ()


async def run(args: argparse.Namespace) -> dict:
    targets = args.watch or args.receiver
    rounds: list[RoundResult] = []
    if args.warmup:
        await run_round(args, "warm-up", None, {})
    memory_before = report.memory_snapshot(args.metrics_url)
    during: dict[str, list[float | None]] = {}
    for _ in range(args.rounds):
        rounds.append(await run_round(args, "baseline", None, during))
        watchers = Watchers(targets, args.receiver_api_key)
        try:
            rounds.append(await run_round(args, "watched", watchers, during))
        finally:
            await watchers.close()
    memory_after = report.memory_snapshot(args.metrics_url)
    return summarise(args, rounds, memory_before, during, memory_after)


def summarise(args: argparse.Namespace, rounds: list[RoundResult], memory_before: dict, during: dict,
              memory_after: dict) -> dict:
    watched = [watcher for round_ in rounds for watcher in round_.watchers]
    outcomes = Counter(watcher.outcome for watcher in watched)
    by_kind = {kind: [round_.sampling_steps_per_s for round_ in rounds if round_.kind == kind
                      and round_.sampling_steps_per_s is not None] for kind in ("baseline", "watched")}
    medians = {kind: (statistics.median(values) if values else None) for kind, values in by_kind.items()}
    cpu = {kind: {part: [round(sum(values[part] or 0.0 for values in round_.cpu_seconds.values()), 2)
                         for round_ in rounds if round_.kind == kind and round_.cpu_seconds]
                  for part in CPU_SAMPLES} for kind in ("baseline", "watched")}
    change = None
    if medians["baseline"] and medians["watched"]:
        change = round(100.0 * (medians["watched"] - medians["baseline"]) / medians["baseline"], 2)
    memory = {url: {"before_mb": _mb(memory_before.get(url)),
                    "peak_mb": _mb(max((value for value in during.get(url, []) if value is not None), default=None)),
                    "after_mb": _mb(memory_after.get(url))} for url in args.metrics_url}
    for values in memory.values():
        if values["before_mb"] is not None and values["peak_mb"] is not None:
            values["peak_growth_mb"] = round(values["peak_mb"] - values["before_mb"], 1)
    config = {key: value for key, value in vars(args).items() if key != "receiver_api_key"}
    return {
        "config": config,
        "watches": len(watched),
        "outcomes": dict(outcomes),
        "jobs": dict(Counter(status for round_ in rounds for status in round_.statuses.values())),
        "steps_per_s": by_kind,
        "median_steps_per_s": medians,
        "watched_vs_baseline_percent": change,
        "receiver_cpu_seconds": cpu,
        "client_cpu_seconds": {kind: [round_.client_cpu_seconds for round_ in rounds if round_.kind == kind]
                               for kind in ("baseline", "watched")},
        "memory": memory,
        "rounds": [{**asdict(round_), "watchers": len(round_.watchers),
                    "watcher_outcomes": dict(Counter(watcher.outcome for watcher in round_.watchers)),
                    "watchers_by_target": dict(Counter(watcher.target for watcher in round_.watchers))}
                   for round_ in rounds],
        "incomplete_examples": [asdict(watcher) for watcher in watched if watcher.outcome != "complete"][:10],
    }


def format_summary(result: dict) -> str:
    lines = [f"watches {result['watches']}  outcomes {result['outcomes']}  jobs {result['jobs']}"]
    for kind, values in result["steps_per_s"].items():
        lines.append(f"sampling steps/s, {kind}: {values} (median {result['median_steps_per_s'][kind]})")
    lines.append(f"watched vs baseline: {result['watched_vs_baseline_percent']} %")
    lines.append(f"receivers' CPU seconds per round: {result['receiver_cpu_seconds']}")
    lines.append(f"this client's CPU seconds per round: {result['client_cpu_seconds']}")
    for url, values in result["memory"].items():
        lines.append(f"RSS {url}: {values}")
    return "\n".join(lines)


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receiver", action="append", default=[],
                        help="gRPC address of a receiver the transmissions are sent to, round robin "
                             "(repeatable; default 127.0.0.1:50052)")
    parser.add_argument("--watch", action="append", default=[],
                        help="gRPC address the watches connect to, round robin over those other than the "
                             "transmission's receiver (repeatable; default: the receivers)")
    parser.add_argument("--receiver-api-key", default="", help="the receivers' x-api-key, if they have one")
    parser.add_argument("--transmissions", type=int, default=4, help="transmissions per round, sent at once")
    parser.add_argument("--watchers", type=int, default=10, help="watches per transmission in a watched round")
    parser.add_argument("--rounds", type=int, default=1, help="baseline and watched rounds, alternating")
    parser.add_argument("--warmup", type=int, default=1, help="rounds without watchers first, counted nowhere")
    parser.add_argument("--steps", type=int, default=200, help="sampling steps per job")
    parser.add_argument("--sampler", default="ddim", help="sampler name")
    parser.add_argument("--snr-db", type=float, default=20.0, help="channel SNR in dB (the paper's PSNR)")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="deadline of each Receive")
    parser.add_argument("--drain-s", type=float, default=600.0, help="the longest a round waits for its jobs")
    parser.add_argument("--metrics-url", action="append", default=[],
                        help="a /metrics URL whose resident memory is read (repeatable)")
    parser.add_argument("--report", default="", help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    args.receiver = args.receiver or ["127.0.0.1:50052"]
    if min(args.transmissions, args.watchers, args.rounds, args.steps) < 1 or args.warmup < 0:
        parser.error("--transmissions, --watchers, --rounds and --steps must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    print(format_summary(result))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(result, indent=2) + "\n")
    complete = result["outcomes"].get("complete", 0) == result["watches"]
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
