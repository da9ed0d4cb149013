"""The launcher (scripts/launch.py) and the health probe it shares with the compose health checks
(shared/wire/health_probe.py): readiness checks against health servers over TLS and mutual TLS with
certificates made by the tests, and how the launcher reports a service it stopped."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from channel_sim.settings import ChannelSettings
from gesco import cli, stack
from scripts import launch
from receiver_service.settings import ReceiverSettings
from sender_service.settings import SenderSettings
from shared.wire import grpc_security, health_probe
from shared.paths import REPO_ROOT
from tests.service_procs import free_port

# server -> (the server's TLS variables' prefix, its client's TLS variables' prefix)
PREFIXES = {
    "channel": ("GESCO_CHANNEL_TLS_", "GESCO_SENDER_CHANNEL_TLS_"),
    "receiver": ("GESCO_RECEIVER_TLS_", "GESCO_CHANNEL_RECEIVER_TLS_"),
}


@contextmanager
def health_server(credentials: grpc.ServerCredentials | None, serving: bool = True) -> Iterator[int]:
    """A gRPC health service on a free loopback port (yielded), over TLS when credentials are given."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = grpc_security.add_port(server, "127.0.0.1:0", credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


@pytest.fixture()
def clean_env(monkeypatch):
    """No GESCO_ variable of the machine running the tests leaks into the checks."""
    for key in list(os.environ):
        if key.startswith("GESCO_"):
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
@pytest.mark.parametrize("server", ["channel", "receiver"])
def test_the_launcher_checks_a_tls_server_with_its_clients_files(pki, clean_env, server, mutual) -> None:
    server_prefix, client_prefix = PREFIXES[server]
    cert = getattr(pki, server)
    credentials = grpc_security.server_credentials(cert.cert, cert.key, pki.ca.ca_file if mutual else "")
    with health_server(credentials) as port:
        all_services = launch.services(launch.Ports(free_port(), free_port(), port, port))
        service = dataclasses.replace(next(s for s in all_services if s.name == server), http_ready=None)

        def ready() -> bool:
            return launch.is_ready(service, "127.0.0.1", launch.probe_env(all_services))

        assert not ready()  # a plaintext check never passes a TLS server
        clean_env.setenv(f"{server_prefix}CERT_FILE", cert.cert)
        clean_env.setenv(f"{server_prefix}KEY_FILE", cert.key)
        assert f"{client_prefix}CA_FILE" in launch.tls_probe_error(all_services)
        clean_env.setenv(f"{client_prefix}CA_FILE", pki.ca.ca_file)
        if mutual:
            clean_env.setenv(f"{server_prefix}CLIENT_CA_FILE", pki.ca.ca_file)
            assert not ready()  # no client certificate: refused
            client = pki.sender_client if server == "channel" else pki.channel_client
            clean_env.setenv(f"{client_prefix}CERT_FILE", client.cert)
            clean_env.setenv(f"{client_prefix}KEY_FILE", client.key)
        assert launch.tls_probe_error(all_services) is None
        assert ready()


def test_the_probe_checks_the_name_its_client_dials(pki) -> None:
    credentials = grpc_security.server_credentials(pki.receiver.cert, pki.receiver.key)
    env = {"GESCO_RECEIVER_TLS_CERT_FILE": pki.receiver.cert, "GESCO_CHANNEL_RECEIVER_TLS_CA_FILE": pki.ca.ca_file}
    with health_server(credentials) as port, health_server(credentials, serving=False) as idle_port:
        target = f"127.0.0.1:{port}"
        assert health_probe.grpc_serving(target, health_probe.probe_for("receiver", env))
        # The certificate names localhost and 127.0.0.1: a client dialing localhost trusts it...
        named = {**env, "GESCO_CHANNEL_RECEIVER_ADDRESS": "localhost:50052"}
        assert health_probe.grpc_serving(target, health_probe.probe_for("receiver", named))
        # ...one dialing another name does not, so neither does the check that stands in for it.
        other = {**env, "GESCO_CHANNEL_RECEIVER_ADDRESS": "receiver:50052"}
        assert not health_probe.grpc_serving(target, health_probe.probe_for("receiver", other))
        assert not health_probe.grpc_serving(f"127.0.0.1:{idle_port}", health_probe.probe_for("receiver", env))


def test_the_compose_probe_command(pki) -> None:
    credentials = grpc_security.server_credentials(pki.channel.cert, pki.channel.key, pki.ca.ca_file)
    tls = {"GESCO_CHANNEL_TLS_CERT_FILE": pki.channel.cert, "GESCO_SENDER_CHANNEL_TLS_CA_FILE": pki.ca.ca_file,
           "GESCO_SENDER_CHANNEL_TLS_CERT_FILE": pki.sender_client.cert,
           "GESCO_SENDER_CHANNEL_TLS_KEY_FILE": pki.sender_client.key}
    env = {key: value for key, value in os.environ.items() if not key.startswith("GESCO_")}
    with health_server(credentials) as port:
        def probe(extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "shared.wire.health_probe", "channel", f"127.0.0.1:{port}", *args],
                                  cwd=REPO_ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=60)

        assert probe(tls).returncode == 0
        no_ca = probe({"GESCO_CHANNEL_TLS_CERT_FILE": pki.channel.cert})
        assert no_ca.returncode == 2 and "GESCO_SENDER_CHANNEL_TLS_CA_FILE" in no_ca.stderr
        assert probe(tls, "--ready-url", f"http://127.0.0.1:{free_port()}/readyz").returncode == 1


def test_the_probe_reads_real_settings() -> None:
    """A misspelt variable would make the probe speak plaintext to a TLS server: catch it here."""
    fields = {"GESCO_SENDER_": SenderSettings.model_fields, "GESCO_CHANNEL_": ChannelSettings.model_fields,
              "GESCO_RECEIVER_": ReceiverSettings.model_fields,
              # the gesco command's, for the sender's gRPC API
              "GESCO_GRPC_": {name.removeprefix("GESCO_GRPC_").lower() for name in cli.GRPC_ENVIRONMENT.values()}}
    for hop in health_probe.HOPS.values():
        client_files = [f"{hop.client_prefix}{name}" for name in ("CA_FILE", "CERT_FILE", "KEY_FILE")]
        names = [hop.server_cert, hop.client_address, *client_files]
        for name in names:
            prefix = next(p for p in fields if name.startswith(p))
            assert name[len(prefix):].lower() in fields[prefix], name


def sleeper(code: str) -> subprocess.Popen:
    """A child in its own session (as `up` starts the services) that runs `code`, then sleeps."""
    proc = subprocess.Popen([sys.executable, "-c", f"{code}; import time; print(flush=True); time.sleep(30)"],
                            stdout=subprocess.PIPE, start_new_session=True)
    proc.stdout.readline()  # its signal handler, if any, is in place
    return proc


def test_the_launcher_reports_how_its_child_stopped() -> None:
    clean = sleeper("import signal, sys; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))")
    assert launch.stop_pid(clean.pid, 10) == "stopped, exit code 0"
    killed = sleeper("pass")
    assert launch.stop_pid(killed.pid, 10) == "stopped, killed by SIGTERM"
    for proc in (clean, killed):
        proc.stdout.close()


# ---------------------------------------------------------------- several receivers sharing Redis


def test_several_receivers_share_redis_and_the_channel_spreads_over_them(clean_env) -> None:
    clean_env.setenv("GESCO_RECEIVER_API_KEY", "receiver-key")
    ports = launch.Ports(8000, 8001, 50052, 50051, receivers=3, redis=6390)
    by_name = {service.name: service for service in launch.services(ports)}
    assert list(by_name) == ["redis", "receiver-1", "receiver-2", "receiver-3", "channel", "sender"]
    assert by_name["redis"].argv()[1:] == [str(launch.REDIS_DIR / "redis.conf")]
    replicas = [by_name[f"receiver-{index}"] for index in (1, 2, 3)]
    assert [launch.process_env(r)["GESCO_RECEIVER_HTTP_PORT"] for r in replicas] == ["8001", "8002", "8003"]
    assert [launch.process_env(r)["GESCO_RECEIVER_GRPC_PORT"] for r in replicas] == ["50052", "50053", "50054"]
    assert {launch.process_env(r)["GESCO_RECEIVER_REDIS_REPLICA_ID"] for r in replicas} == {
        "receiver-1", "receiver-2", "receiver-3"}
    assert {launch.process_env(r)["GESCO_RECEIVER_REDIS_URL"] for r in replicas} == {"redis://127.0.0.1:6390/0"}
    assert all(r.probe == "receiver" for r in replicas)
    channel_env = launch.process_env(by_name["channel"])
    assert channel_env["GESCO_CHANNEL_RECEIVER_ADDRESS"] == "127.0.0.1:50052,127.0.0.1:50053,127.0.0.1:50054"
    ChannelSettings(receiver_address=channel_env["GESCO_CHANNEL_RECEIVER_ADDRESS"])  # a valid setting
    sender_env = launch.process_env(by_name["sender"])
    assert sender_env["GESCO_SENDER_RECEIVER_PUBLIC_URL"] == "http://127.0.0.1:8001"
    assert sender_env["GESCO_SENDER_RECEIVER_API_KEY"] == "receiver-key"
    assert set(ports.in_use().values()) == {8000, 50050, 50051, 9051, 8001, 8002, 8003, 50052, 50053, 50054, 6390}


def test_serving_replicas_take_the_clients_and_the_channel_and_run_niced(clean_env) -> None:
    ports = launch.Ports(8000, 8001, 50052, 50051, receivers=3, redis=6390, serving=1)
    by_name = {service.name: service for service in launch.services(ports)}
    sampling, serving = [by_name[f"receiver-{index}"] for index in (1, 2)], by_name["receiver-3"]
    assert launch.process_env(serving)["GESCO_RECEIVER_SAMPLING"] == "false"
    assert serving.argv()[:3] == ["nice", "-n", "10"] and serving.argv()[3:5] == [sys.executable, "-m"]
    assert all("GESCO_RECEIVER_SAMPLING" not in launch.process_env(r) and r.argv()[0] == sys.executable
               for r in sampling)
    assert launch.process_env(by_name["channel"])["GESCO_CHANNEL_RECEIVER_ADDRESS"] == "127.0.0.1:50054"
    assert launch.process_env(by_name["sender"])["GESCO_SENDER_RECEIVER_PUBLIC_URL"] == "http://127.0.0.1:8003"
    clean_env.setenv("GESCO_RECEIVER_REDIS_URL", "redis://redis.example.test:6379/0")
    assert launch.up_problem(launch.Ports(8000, 8001, 50052, 50051, receivers=2, serving=1)) is None
    assert "--serving" in launch.up_problem(launch.Ports(8000, 8001, 50052, 50051, receivers=2, serving=2))


def test_the_channel_metrics_port_follows_the_channel_port_so_two_stacks_do_not_collide(clean_env) -> None:
    defaults = ChannelSettings()
    assert launch.Ports(8000, 8001, 50052, defaults.port).channel_metrics_port == defaults.metrics_port
    first, second = launch.Ports(8000, 8001, 50052, 50051), launch.Ports(18000, 18001, 18052, 50061, sender_grpc=18050)
    assert not set(first.in_use().values()) & set(second.in_use().values())
    channel = {service.name: service for service in launch.services(second)}["channel"]
    assert launch.process_env(channel)["GESCO_CHANNEL_METRICS_PORT"] == "9061"
    assert launch.Ports(8000, 8001, 50052, 2000).channel_metrics_port == 0  # no follower: any free port
    assert launch.Ports(8000, 8001, 50052, 50051, channel_metrics=9999).in_use()["channel metrics"] == 9999


def test_one_receiver_keeps_the_plain_wiring(clean_env) -> None:
    by_name = {s.name: s for s in launch.services(launch.Ports(8000, 8001, 50052, 50051, sender_grpc=50060))}
    assert list(by_name) == ["receiver", "channel", "sender"]
    # The sender is ready once /readyz answers and its gRPC API's health says SERVING.
    assert by_name["sender"].grpc_port == 50060 and launch.process_env(by_name["sender"])["GESCO_SENDER_GRPC_PORT"] == "50060"
    assert by_name["channel"].wiring["GESCO_CHANNEL_RECEIVER_ADDRESS"] == "127.0.0.1:50052"
    assert "GESCO_RECEIVER_REDIS_URL" not in launch.process_env(by_name["receiver"])


def test_several_receivers_need_a_shared_store(clean_env) -> None:
    assert "shared job store" in launch.up_problem(launch.Ports(8000, 8001, 50052, 50051, receivers=2))
    clean_env.setenv("GESCO_RECEIVER_REDIS_URL", "redis://redis.example.test:6379/0")
    assert launch.up_problem(launch.Ports(8000, 8001, 50052, 50051, receivers=2)) is None
    assert "--receivers" in launch.up_problem(launch.Ports(8000, 8001, 50052, 50051, receivers=0))


def test_the_redis_password_stays_in_an_owner_only_file(clean_env, tmp_path) -> None:
    clean_env.setattr(launch, "REDIS_DIR", tmp_path / "redis")
    clean_env.setenv("GESCO_RECEIVER_REDIS_PASSWORD", "pw-123")
    launch.write_redis_config(launch.Ports(8000, 8001, 50052, 50051, redis=6390), "127.0.0.1")
    config = tmp_path / "redis" / "redis.conf"
    lines = config.read_text().splitlines()
    assert {"port 6390", "bind 127.0.0.1", "appendonly yes", "maxmemory-policy noeviction",
            'requirepass "pw-123"'} <= set(lines)
    assert config.stat().st_mode & 0o777 == 0o600
    clean_env.setenv("GESCO_RECEIVER_REDIS_PASSWORD", 'pw" 1')
    with pytest.raises(ValueError, match="GESCO_RECEIVER_REDIS_PASSWORD"):
        launch.write_redis_config(launch.Ports(8000, 8001, 50052, 50051, redis=6390), "127.0.0.1")


@pytest.mark.processes
@pytest.mark.skipif(launch.shutil.which(launch.REDIS_SERVER) is None, reason="redis-server is not installed")
def test_the_launchers_redis_answers_with_its_password_and_is_found_by_its_pid(clean_env, tmp_path) -> None:
    """The configuration `up --redis` writes starts a redis-server that answers PING only with the
    password, and `down` finds it by its pid file although redis-server rewrites its command line."""
    clean_env.setattr(launch, "REDIS_DIR", tmp_path / "redis")
    clean_env.setattr(launch, "RUN_DIR", tmp_path)
    clean_env.setenv("GESCO_RECEIVER_REDIS_PASSWORD", "pw-123")
    ports = launch.Ports(free_port(), free_port(), free_port(), free_port(), redis=free_port())
    launch.write_redis_config(ports, "127.0.0.1")
    redis_service = launch.services(ports)[0]
    proc = subprocess.Popen(redis_service.argv(), stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        launch.pid_file(redis_service).write_text(f"{proc.pid}\n")
        env = launch.probe_env([redis_service])
        deadline = time.monotonic() + 10
        while not launch.is_ready(redis_service, "127.0.0.1", env):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        assert not stack.redis_answers(redis_service.redis_ready, "wrong")
        assert launch.read_pid(redis_service) == proc.pid
    finally:
        assert launch.stop_pid(proc.pid, 10).startswith("stopped")
    assert (tmp_path / "redis" / "appendonlydir").is_dir()  # persistence on
