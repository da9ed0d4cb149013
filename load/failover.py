"""Failover under load: replicas sharing Redis, one SIGKILLed and Redis restarted mid-run.

Starts Redis (append-only file on), N receivers, the channel and the sender on free loopback ports
(gesco/stack.py), optionally measures the replicas' capacity first, then runs `load/grpc_load.py`
at `--load-factor` times that capacity (or at `--rate`) for `--duration-s`, SIGKILLs one replica at
`--kill-at-s` and restarts Redis (SIGTERM, or SIGKILL with `--redis-kill`) at `--redis-restart-at-s`
for `--redis-down-s`. Then it checks what the issue asks: every accepted transmission ended done
(none failed, none lost), each was recorded done by exactly one replica (their JSON logs), and it
counts the jobs handed over. Bounded: every phase has a time limit, everything runs on 127.0.0.1.

    python -m load.failover --receivers 3 --steps 5 --duration-s 120 --load-factor 1.2 \\
        --kill-at-s 30 --redis-restart-at-s 70 --report docs/load-runs/failover.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import redis

from gesco.stack import REDIS_SERVER, Ports, RunningStack, services
from shared.paths import REPO_ROOT

PREFIX = "gesco:receiver:"  # the receivers' default key prefix


def redis_config(directory: Path, port: int) -> Path:
    """Loopback, append-only file fsynced every second, as the launcher and compose run Redis."""
    path = directory / "redis.conf"
    path.write_text("\n".join([f"port {port}", "bind 127.0.0.1", f'dir "{directory}"', "appendonly yes",
                               "appendfsync everysec", 'save ""', "maxmemory-policy noeviction",
                               f'logfile "{directory / "redis.log"}"']) + "\n")
    return path


def run_load(ports: Ports, rate: float, duration_s: float, steps: int, drain_s: float, report: Path) -> subprocess.Popen:
    receiver_url = f"http://127.0.0.1:{ports.receiver_http}"  # receiver-1, never the victim
    return subprocess.Popen(
        [sys.executable, "-m", "load.grpc_load", "--channel", f"127.0.0.1:{ports.channel}", "--receiver-url",
         receiver_url, "--rate", f"{rate:.3f}", "--duration-s", str(duration_s), "--max-requests",
         str(int(rate * duration_s) + 1), "--steps", str(steps), "--drain-s", str(drain_s), "--report", str(report)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished_per_second(client: redis.Redis, since: float, until: float) -> float:
    """Jobs finished done between the two times (epoch seconds), per second: the capacity while
    the replicas were saturated."""
    done = 0
    for member in client.zrange(f"{PREFIX}index", 0, -1):
        raw = client.hget(f"{PREFIX}tx:{member.decode()}", "record")
        record = json.loads(raw) if raw else {}
        if record.get("status") == "done" and since <= (record.get("finished_at") or 0) <= until:
            done += 1
    return done / (until - since)


def finishes(stack: RunningStack, replicas: list[str]) -> Counter:
    """How often each transmission was logged `job finished` as done, over every replica."""
    done: Counter = Counter()
    for name in replicas:
        for line in stack.log(name).splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("msg") == "job finished" and entry.get("status") == "done":
                    done[entry["transmission_id"]] += 1
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receivers", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="sampling steps per job")
    parser.add_argument("--rate", type=float, default=0.0, help="requests per second; 0: measure the capacity first")
    parser.add_argument("--load-factor", type=float, default=1.2, help="the rate as a multiple of the capacity")
    parser.add_argument("--probe-rate", type=float, default=6.0, help="rate that saturates the replicas")
    parser.add_argument("--probe-s", type=float, default=45.0, help="length of the capacity measurement")
    parser.add_argument("--duration-s", type=float, default=120.0, help="length of the sending phase")
    parser.add_argument("--kill-at-s", type=float, default=30.0, help="SIGKILL the last replica then")
    parser.add_argument("--redis-restart-at-s", type=float, default=70.0, help="stop Redis then")
    parser.add_argument("--redis-down-s", type=float, default=3.0, help="and start it again this much later")
    parser.add_argument("--redis-kill", action="store_true", help="SIGKILL Redis instead of SIGTERM")
    parser.add_argument("--lease-s", type=float, default=5.0, help="the receivers' Redis lease")
    parser.add_argument("--drain-s", type=float, default=300.0)
    parser.add_argument("--report", default="", help="write the report as JSON to this file")
    args = parser.parse_args(argv)
    if shutil.which(REDIS_SERVER) is None:
        print(f"{REDIS_SERVER} is not installed")
        return 2

    work = Path(tempfile.mkdtemp(prefix="gesco-failover-"))
    ports = Ports.free(receivers=args.receivers, redis=True)
    replicas = [f"receiver-{index + 1}" for index in range(args.receivers)]
    settings = {"receiver": {"GESCO_RECEIVER_STORE_DIR": str(work / "unused-store"), "GESCO_RECEIVER_DEVICE": "cpu",
                             "GESCO_RECEIVER_TORCH_THREADS": "1", "GESCO_RECEIVER_QUEUE_SIZE": "8",
                             "GESCO_RECEIVER_MAX_BATCH_SIZE": "4", "GESCO_RECEIVER_REDIS_LEASE_S": str(args.lease_s),
                             "GESCO_RECEIVER_LOG_LEVEL": "INFO"},
                "channel": {"GESCO_CHANNEL_LOG_LEVEL": "WARNING"}, "sender": {"GESCO_SENDER_LOG_LEVEL": "WARNING"}}
    stack = RunningStack(services(ports, redis_config=redis_config(work, ports.redis), settings=settings),
                         work / "logs", timeout_s=600)
    client = redis.Redis(host="127.0.0.1", port=ports.redis, socket_timeout=5)
    events: list[dict] = []
    try:
        rate = args.rate
        capacity = None
        if not rate:
            started = time.time()
            probe = run_load(ports, args.probe_rate, args.probe_s, args.steps, args.drain_s, work / "probe.json")
            probe.communicate(timeout=args.probe_s + args.drain_s + 120)
            capacity = finished_per_second(client, started + 15.0, started + args.probe_s)
            rate = round(args.load_factor * capacity, 3)
            print(f"capacity {capacity:.3f} jobs/s (done per second from 15 s to {args.probe_s:.0f} s of a "
                  f"{args.probe_rate} req/s probe); load {rate} req/s", flush=True)

        report_path = work / "load.json"
        started = time.monotonic()
        load = run_load(ports, rate, args.duration_s, args.steps, args.drain_s, report_path)

        def at(offset_s: float) -> None:
            time.sleep(max(0.0, started + offset_s - time.monotonic()))

        def disrupt() -> None:
            for offset, action in sorted([(args.kill_at_s, "kill"), (args.redis_restart_at_s, "redis")]):
                at(offset)
                if action == "kill":
                    victim = replicas[-1]
                    held = len(client.smembers(f"{PREFIX}owned:{victim}"))
                    stack.procs[victim].send_signal(signal.SIGKILL)
                    events.append({"at_s": round(time.monotonic() - started, 1), "event": f"SIGKILL {victim}",
                                   "jobs_it_held": held})
                else:
                    proc = stack.procs["redis"]
                    proc.send_signal(signal.SIGKILL if args.redis_kill else signal.SIGTERM)
                    proc.wait(timeout=30)
                    events.append({"at_s": round(time.monotonic() - started, 1),
                                   "event": "redis stopped" + (" (SIGKILL)" if args.redis_kill else " (SIGTERM)")})
                    time.sleep(args.redis_down_s)
                    stack.start("redis")
                    events.append({"at_s": round(time.monotonic() - started, 1), "event": "redis answers again"})
            print("; ".join(f"{event['at_s']} s: {event['event']}" for event in events), flush=True)

        disruptor = threading.Thread(target=disrupt, daemon=True)
        disruptor.start()
        output, _ = load.communicate(timeout=args.duration_s + args.drain_s + 300)
        disruptor.join(timeout=60)
        print(output, flush=True)
        load_report = json.loads(report_path.read_text())
        load_report["config"].pop("report", None)  # a temporary file, gone with the run
        done_counts = finishes(stack, replicas)
        handed_over = sum(1 for member in client.zrange(f"{PREFIX}index", 0, -1)
                          if json.loads(client.hget(f"{PREFIX}tx:{member.decode()}", "record") or "{}").get("handovers"))
        accepted, completed, lost = load_report["accepted"], load_report["completed"], load_report["lost"]
        summary = {
            "command": " ".join(["python -m load.failover", *(argv if argv is not None else sys.argv[1:])]),
            "receivers": args.receivers, "steps": args.steps, "lease_s": args.lease_s,
            "capacity_jobs_per_s": capacity, "rate": rate, "duration_s": args.duration_s, "events": events,
            "accepted": accepted, "completed": completed, "accepted_then_failed": accepted - completed - lost,
            "lost": lost, "refused_at_admission": load_report["rejected"],
            "request_failures": load_report["failure_reasons"],
            "jobs_handed_over": handed_over,
            "done_recorded_twice": sorted(tid for tid, count in done_counts.items() if count > 1),
            "load_report": load_report,
        }
        print(json.dumps({key: value for key, value in summary.items() if key != "load_report"}, indent=2))
        if args.report:
            Path(args.report).write_text(json.dumps(summary, indent=2) + "\n")
        ok = completed == accepted and lost == 0 and not summary["done_recorded_twice"]
        return 0 if ok else 1
    finally:
        stack.stop()
        client.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
