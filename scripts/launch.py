"""Run the three gesco services as local processes, without Docker.

    python scripts/launch.py up [--foreground]   start receiver, channel and sender; wait until ready
    python scripts/launch.py up --receivers 3 --redis
                                                 Debian's redis-server and three receivers sharing it
    python scripts/launch.py up --receivers 2 --serving 1 --redis
                                                 one sampling receiver and a serving replica in front
                                                 of it, for many watches (docs/scale-out.md)
    python scripts/launch.py status              which are running and ready
    python scripts/launch.py demo                send the bundled example, save the generated image
    python scripts/launch.py down                SIGTERM, then SIGKILL after a grace period

Ports come from the flags, else from the services' own variables (GESCO_SENDER_PORT,
GESCO_SENDER_GRPC_PORT, GESCO_RECEIVER_HTTP_PORT, GESCO_RECEIVER_GRPC_PORT, GESCO_CHANNEL_PORT),
else 8000, 50050, 8001, 50052, 50051; receiver i of N listens on those receiver ports + i - 1, Redis on --redis-port (6380).
The channel's metrics port (--channel-metrics-port, else GESCO_CHANNEL_METRICS_PORT) follows the
channel port unless set (9051 beside 50051); 0 picks a free one. The port map says which. The
launcher wires the addresses between the services unless those are set explicitly: the channel
spreads over every receiver (a list of their gRPC addresses), the receivers share the Redis job
store (its password, if any, from GESCO_RECEIVER_REDIS_PASSWORD; persistence on, under run/redis),
and the sender hands out the first receiver's URL (any replica answers for any transmission).
Several receivers need a shared store: --redis, or GESCO_RECEIVER_REDIS_URL naming one. With
--serving N the last N receivers are serving replicas (GESCO_RECEIVER_SAMPLING=false, at nice 10):
the channel spreads over them only and the sender hands out the first of them.
Pid files, logs, the port map and the demo output live under run/ (git-ignored). Run it with the
project's virtual environment (`make up` does). The gRPC readiness checks speak TLS to a server
configured for it, with its client's files (shared/wire/health_probe.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, it imports the project's packages beside it

from gesco.options import DEFAULT_SNR_DEFINITION, SnrDefinition, names  # noqa: E402 - standard library only
from gesco.stack import (  # noqa: E402 - standard library only, so `down` runs without the venv
    CHANNEL_METRICS_OFFSET,
    REDIS_SERVER,
    Ports,
    Service,
    free_port,
    is_ready,
    probe_env,
    process_env,
    tls_probe_error,
    url_host,
)
from gesco.stack import services as stack_services  # noqa: E402
from shared.paths import REPO_ROOT  # noqa: E402 - standard library only

RUN_DIR = REPO_ROOT / "run"
PORTS_FILE = RUN_DIR / "ports.json"
REDIS_DIR = RUN_DIR / "redis"  # its configuration (with the password: owner-only) and append-only file
MAX_RECEIVERS = 16
DEFAULT_EXAMPLES = {
    "photo": REPO_ROOT / "examples" / "street_photo.jpg",
    "label_map": REPO_ROOT / "examples" / "street_labels.png",
}


def write_redis_config(ports: Ports, host: str) -> None:
    """redis-server's configuration: loopback (or --host), persistence on (append-only file under
    run/redis, so done transmissions survive a restart), the store bounds itself (noeviction), and
    the password of GESCO_RECEIVER_REDIS_PASSWORD if set (in this owner-only file, never on a
    command line)."""
    REDIS_DIR.mkdir(parents=True, exist_ok=True)
    lines = [f"port {ports.redis}", f"bind {host}", f'dir "{REDIS_DIR}"', "appendonly yes",
             "appendfsync everysec", 'save ""', "maxmemory-policy noeviction", "daemonize no", 'logfile ""']
    password = os.environ.get("GESCO_RECEIVER_REDIS_PASSWORD", "")
    if password:
        if any(character in password for character in "\"\n\r "):
            raise ValueError("GESCO_RECEIVER_REDIS_PASSWORD must not contain quotes, spaces or newlines")
        lines.append(f'requirepass "{password}"')
    config = REDIS_DIR / "redis.conf"
    config.touch(mode=0o600)
    config.chmod(0o600)
    config.write_text("\n".join(lines) + "\n")


def services(ports: Ports, host: str = "127.0.0.1") -> list[Service]:
    """The services `up` starts, in order (gesco/stack.py), with the launcher's Redis configuration."""
    return stack_services(ports, host, redis_config=REDIS_DIR / "redis.conf")


def pid_file(service: Service) -> Path:
    return RUN_DIR / f"{service.name}.pid"


def log_file(service: Service) -> Path:
    return RUN_DIR / f"{service.name}.log"


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


# --- process bookkeeping ------------------------------------------------------------------------


def read_pid(service: Service) -> int | None:
    """The pid in the service's pid file if that process is alive and is this service."""
    try:
        pid = int(pid_file(service).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        cmdline = None
    if cmdline is not None:  # a program may rewrite its command line (redis-server does)
        return pid if any(service.module.encode() in argument for argument in cmdline) else None
    try:  # no /proc (macOS): trust a live pid
        os.kill(pid, 0)
    except OSError:
        return None
    return pid


def stop_pid(pid: int, grace_s: float) -> str:
    """SIGTERM the process group, then SIGKILL after `grace_s`; say how it ended (with its exit
    status when it is this process's child, as in `up --foreground`)."""
    _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        alive, exit_code = _alive(pid)
        if not alive:
            return "stopped" if exit_code is None else f"stopped, {describe_exit(exit_code)}"
        time.sleep(0.1)
    _signal(pid, signal.SIGKILL)
    time.sleep(0.2)
    return "killed after the grace period"


def describe_exit(exit_code: int) -> str:
    """A Popen-style exit code in words: a negative one is the signal that ended the process."""
    if exit_code < 0:
        try:
            return f"killed by {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"killed by signal {-exit_code}"
    return f"exit code {exit_code}"


def _signal(pid: int, signum: int) -> None:
    try:
        if os.getpgid(pid) == pid:  # started by us in its own session: take its children too
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> tuple[bool, int | None]:
    """Whether `pid` still runs, and its exit code once it has ended if it was our child."""
    try:
        finished, status = os.waitpid(pid, os.WNOHANG)  # reap our own child, if it is one
        if finished == pid:
            return False, os.waitstatus_to_exitcode(status)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    try:  # a zombie is as good as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z", None
    except (OSError, IndexError):
        return True, None


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- commands -----------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    ports = Ports(args.sender_port, args.receiver_http_port, args.receiver_grpc_port, args.channel_port,
                  receivers=args.receivers, redis=args.redis_port if args.redis else 0, serving=args.serving,
                  sender_grpc=args.sender_grpc_port, channel_metrics=args.channel_metrics_port)
    if ports.channel_metrics_port == 0:  # any free port: picked here, so the port map can tell it
        ports = dataclasses.replace(ports, channel_metrics=free_port())
    if problem := up_problem(ports):
        print(problem)
        return 1
    all_services = services(ports, args.host)
    RUN_DIR.mkdir(exist_ok=True)
    running = [s.name for s in all_services if read_pid(s)]
    if running:
        print(f"already running: {', '.join(running)} (see `status`; `down` stops them)")
        return 1
    busy = [f"{name} port {port}" for name, port in ports.in_use().items() if port_in_use(args.host, port)]
    if busy:
        print(f"ports in use: {', '.join(busy)}; free them or choose others with the --*-port flags")
        return 1
    if problem := tls_probe_error(all_services):
        print(problem)
        return 1
    if ports.redis:
        try:
            write_redis_config(ports, args.host)
        except ValueError as error:
            print(error)
            return 1
    PORTS_FILE.write_text(json.dumps({"host": args.host, **vars(ports)}, indent=2) + "\n")

    started: list[tuple[Service, subprocess.Popen]] = []
    for service in all_services:
        output = None if args.foreground else log_file(service).open("ab")
        proc = subprocess.Popen(
            service.argv(),
            cwd=REPO_ROOT,
            env=process_env(service),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            start_new_session=not args.foreground,
        )
        if output:
            output.close()
        pid_file(service).write_text(f"{proc.pid}\n")
        started.append((service, proc))
        print(f"started {service.name} (pid {proc.pid})" + ("" if args.foreground else f", log {_rel(log_file(service))}"))

    if not _wait_ready(started, args.host, args.timeout, probe_env(all_services)):
        for service, proc in reversed(started):
            stop_pid(proc.pid, args.grace)
            pid_file(service).unlink(missing_ok=True)
        return 1
    print_urls(ports, args.host)
    if not args.foreground:
        print("stop them with: python scripts/launch.py down   (or: make down)")
        return 0
    return _supervise(started, args.grace)


def up_problem(ports: Ports) -> str | None:
    """Why `up` cannot start these services, if so."""
    if not 1 <= ports.receivers <= MAX_RECEIVERS:
        return f"--receivers must be 1 to {MAX_RECEIVERS}"
    if not 0 <= ports.serving < ports.receivers:
        return (f"--serving must be 0 to {ports.receivers - 1}: of the {ports.receivers} receivers, at least one "
                "samples (add --receivers)")
    if ports.redis and shutil.which(REDIS_SERVER) is None:
        return (f"--redis needs Debian's {REDIS_SERVER}: `make redis` (or apt-get install redis-server) "
                "installs it")
    if ports.receivers > 1 and not (ports.redis or os.environ.get("GESCO_RECEIVER_REDIS_URL")):
        return ("several receivers need a shared job store: add --redis, or set GESCO_RECEIVER_REDIS_URL "
                "to a Redis of yours")
    return None


def _wait_ready(
    started: list[tuple[Service, subprocess.Popen]], host: str, timeout_s: float, env: dict[str, str]
) -> bool:
    deadline = time.monotonic() + timeout_s
    pending = [service for service, _ in started]
    procs = {service.name: proc for service, proc in started}
    while pending:
        for service in list(pending):
            proc = procs[service.name]
            if proc.poll() is not None:
                print(f"{service.name} exited ({describe_exit(proc.returncode)}); last log lines:")
                print(tail(log_file(service)))
                return False
            if is_ready(service, host, env):
                print(f"{service.name} is ready")
                pending.remove(service)
        if pending and time.monotonic() > deadline:
            names = ", ".join(s.name for s in pending)
            print(f"not ready after {timeout_s:.0f} s: {names}; last log lines:")
            for service in pending:
                print(f"--- {service.name}\n{tail(log_file(service))}")
            return False
        time.sleep(0.3)
    return True


def _supervise(started: list[tuple[Service, subprocess.Popen]], grace_s: float) -> int:
    """Foreground mode: wait for Ctrl-C (or any service exiting), then stop them all."""
    stop = False

    def request_stop(signum, frame) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    print("running in the foreground; Ctrl-C stops them all")
    code = 0
    while not stop:
        for service, proc in started:
            if proc.poll() is not None:
                print(f"{service.name} exited ({describe_exit(proc.returncode)}); stopping the others")
                stop, code = True, 1
                break
        time.sleep(0.3)
    for service, proc in reversed(started):
        if proc.poll() is None:
            print(f"{service.name}: {stop_pid(proc.pid, grace_s)}")
        pid_file(service).unlink(missing_ok=True)
    return code


def cmd_down(args: argparse.Namespace) -> int:
    ports = load_ports(args)
    stopped_any = False
    for service in reversed(services(ports, args.host)):
        pid = read_pid(service)
        if pid is None:
            print(f"{service.name}: not running")
        else:
            print(f"{service.name} (pid {pid}): {stop_pid(pid, args.grace)}")
            stopped_any = True
        pid_file(service).unlink(missing_ok=True)
    if not stopped_any:
        print("nothing was running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Each service's state (exit 0 when all are ready, 3 otherwise). With none running, one line
    says so: the port map of an earlier `up` (several receivers, Redis) is no list of what runs."""
    ports = load_ports(args)
    all_services = services(ports, args.host)
    if problem := tls_probe_error(all_services):
        print(problem)
        return 2
    pids = {service.name: read_pid(service) for service in all_services}
    if not any(pids.values()):
        print("nothing is running: `make up` (python scripts/launch.py up) starts the services")
        return 3
    all_up = True
    for service in all_services:
        pid = pids[service.name]
        if pid is None:
            state, all_up = "not running", False
        elif is_ready(service, args.host, probe_env(all_services)):
            state = f"ready (pid {pid})"
        else:
            state, all_up = f"running, not ready (pid {pid})", False
        print(f"{service.name:11s} {state}")
    if all_up:
        print_urls(ports, args.host)
    return 0 if all_up else 3


def cmd_demo(args: argparse.Namespace) -> int:
    import httpx

    ports = load_ports(args)
    sender_url = args.sender_url or f"http://{args.host}:{ports.sender}"
    source = Path(args.input) if args.input else DEFAULT_EXAMPLES[args.kind]
    fields = {"kind": args.kind, "snr_db": str(args.snr_db), "snr_definition": args.snr_definition,
              "seed": str(args.seed), "wait": "true"}
    if args.steps:
        fields["steps"] = str(args.steps)
    steps = f"{args.steps} sampling steps" if args.steps else "the receiver's default sampling"
    print(f"sending {_rel(source)} as a {args.kind} to {sender_url} at {args.snr_db:g} dB ({args.snr_definition}), "
          f"{steps} (this can take a while on a CPU)...")
    started = time.monotonic()
    try:
        response = httpx.post(
            f"{sender_url}/v1/transmissions",
            files={"file": (source.name, source.read_bytes())},
            data=fields,
            headers={"X-API-Key": api_key} if (api_key := os.environ.get("GESCO_SENDER_API_KEY")) else None,
            timeout=args.timeout,
        )
    except httpx.HTTPError as error:
        print(f"the sender at {sender_url} cannot be reached ({error}); start the services with "
              "`python scripts/launch.py up` (or `make up`)")
        return 1
    if response.status_code != 200 or response.headers.get("content-type") != "image/png":
        print(f"the demo failed: HTTP {response.status_code}: {response.text[:1000]}")
        return 1
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(response.content)
    transmission_id = response.headers.get("x-transmission-id", "?")
    receiver_url = f"http://{args.host}:{ports.receiver_http}"
    print(f"transmission {transmission_id} done in {time.monotonic() - started:.1f} s")
    print(f"status:             {receiver_url}/v1/transmissions/{transmission_id}")
    print(f"denoised label map: {receiver_url}/v1/transmissions/{transmission_id}/maps/fds_labels.png")
    print(f"generated image saved to {output.resolve()}")
    return 0


def load_ports(args: argparse.Namespace) -> Ports:
    """The ports of the last `up` (run/ports.json), overridden by flags given explicitly."""
    try:
        saved = json.loads(PORTS_FILE.read_text())
    except (OSError, ValueError):
        saved = {}
    explicit = {name: getattr(args, f"{name}_port") for name in _PORT_DEFAULTS}
    metrics = saved.get("channel_metrics")
    return Ports(**{name: value if value is not None else int(saved.get(name, _default_port(name)))
                    for name, value in explicit.items()},
                 receivers=int(saved.get("receivers", 1)), redis=int(saved.get("redis", 0)),
                 serving=int(saved.get("serving", 0)),
                 channel_metrics=None if metrics is None else int(metrics))


def print_urls(ports: Ports, host: str) -> None:
    host = url_host(host)
    print(f"sender REST      http://{host}:{ports.sender}   (API docs: http://{host}:{ports.sender}/docs)")
    print(f"sender gRPC      {host}:{ports.sender_grpc}")
    for index in range(ports.receivers):
        http_port = ports.receiver_http + index
        role = ", serving replica" if index >= ports.receivers - ports.serving else ""
        print(f"receiver REST    http://{host}:{http_port}   (API docs: http://{host}:{http_port}/docs{role})")
    print(f"channel gRPC     {host}:{ports.channel}")
    print(f"channel metrics  http://{host}:{ports.channel_metrics_port}/metrics")
    for index in range(ports.receivers):
        print(f"receiver gRPC    {host}:{ports.receiver_grpc + index}")
    if ports.redis:
        print(f"redis            redis://{host}:{ports.redis}/0   (data in {_rel(REDIS_DIR)})")


_PORT_DEFAULTS = {
    "sender": ("GESCO_SENDER_PORT", 8000),
    "sender_grpc": ("GESCO_SENDER_GRPC_PORT", 50050),
    "receiver_http": ("GESCO_RECEIVER_HTTP_PORT", 8001),
    "receiver_grpc": ("GESCO_RECEIVER_GRPC_PORT", 50052),
    "channel": ("GESCO_CHANNEL_PORT", 50051),
}


def _default_port(name: str) -> int:
    variable, default = _PORT_DEFAULTS[name]
    return int(os.environ.get(variable, default))


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser, port_defaults: bool) -> None:
        sub.add_argument("--host", default="127.0.0.1", help="interface the services bind and are reached on")
        for name, (variable, default) in _PORT_DEFAULTS.items():
            flag = "--" + name.replace("_", "-") + "-port"
            value = int(os.environ.get(variable, default)) if port_defaults else None
            sub.add_argument(flag, type=int, default=value, help=f"default ${variable} or {default}")
        sub.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")

    up = commands.add_parser("up", help="start the three services and wait until they are ready")
    common(up, port_defaults=True)
    up.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops all")
    up.add_argument("--receivers", type=int, default=1,
                    help="receiver replicas on consecutive ports, the channel spreading over them (default 1)")
    up.add_argument("--serving", type=int, default=0,
                    help="of the receivers, this many (the last ones) are serving replicas: they take the channel's "
                         "streams and the clients' calls and watches, and hand every job to the others through "
                         "Redis, at nice 10 (docs/scale-out.md; default 0)")
    up.add_argument("--redis", action="store_true",
                    help="run Debian's redis-server as the receivers' shared job store (persistence on; "
                         "password from GESCO_RECEIVER_REDIS_PASSWORD if set)")
    up.add_argument("--redis-port", type=int, default=6380,
                    help="port of that redis-server (default 6380, beside a system Redis on 6379)")
    metrics_port = os.environ.get("GESCO_CHANNEL_METRICS_PORT")
    up.add_argument("--channel-metrics-port", type=int, default=None if metrics_port is None else int(metrics_port),
                    help="the channel's Prometheus port (default $GESCO_CHANNEL_METRICS_PORT, else the channel "
                         f"port {CHANNEL_METRICS_OFFSET:+d}: 9051 beside 50051); 0: any free port")
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")
    up.set_defaults(handler=cmd_up)

    down = commands.add_parser("down", help="stop the services started by `up`")
    common(down, port_defaults=False)
    down.set_defaults(handler=cmd_down)

    status = commands.add_parser("status", help="show which services run and are ready")
    common(status, port_defaults=False)
    status.set_defaults(handler=cmd_status)

    demo = commands.add_parser("demo", help="send the bundled example and save the generated image")
    common(demo, port_defaults=False)
    demo.add_argument("--kind", choices=sorted(DEFAULT_EXAMPLES), default="photo")
    demo.add_argument("--input", help="file to send instead of the bundled example")
    demo.add_argument("--snr-db", type=float, default=20.0, help="channel SNR in dB")
    demo.add_argument("--snr-definition", choices=names(SnrDefinition), default=DEFAULT_SNR_DEFINITION.value)
    demo.add_argument("--steps", type=int, default=0, help="sampling steps (0: the receiver's default)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--sender-url", help="default: the sender started by `up`")
    demo.add_argument("--output", default=str(RUN_DIR / "demo-output.png"))
    demo.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the image")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
