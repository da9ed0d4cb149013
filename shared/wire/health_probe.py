"""The gRPC health check of a gesco server, over TLS when the server speaks TLS.

Both the launcher's readiness check and the docker-compose health checks use it, so a server
configured for TLS (or mutual TLS) is checked the way its real client reaches it. A server speaks
TLS once its certificate is set (GESCO_CHANNEL_TLS_CERT_FILE, GESCO_RECEIVER_TLS_CERT_FILE,
GESCO_SENDER_GRPC_TLS_CERT_FILE). The probe then uses the client-side files of that hop:
GESCO_SENDER_CHANNEL_TLS_* for the channel, GESCO_CHANNEL_RECEIVER_TLS_* for the receiver, the
gesco command's GESCO_GRPC_CA_FILE, _CERT_FILE and _KEY_FILE for the sender's gRPC API. The
server's certificate must name the host of that client's address (GESCO_SENDER_CHANNEL_ADDRESS,
GESCO_CHANNEL_RECEIVER_ADDRESS, GESCO_GRPC_SENDER), which need not be the address the probe dials
(127.0.0.1 inside a container).

    python -m shared.wire.health_probe receiver 127.0.0.1:50052 [--ready-url http://127.0.0.1:8001/readyz]

exits 0 when the server says SERVING (and the URL, if given, answers 200), 1 when not, 2 when the
TLS settings are unusable.
"""
from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.wire import grpc_security


@dataclass(frozen=True)
class Hop:
    """The variables that say how a server is reached: its own TLS switch and its client's files."""

    server_cert: str  # set: the server speaks TLS
    client_prefix: str  # the client's {prefix}CA_FILE, {prefix}CERT_FILE, {prefix}KEY_FILE
    client_address: str  # the client's address of the server; its host is the name TLS checks


HOPS = {
    "channel": Hop("GESCO_CHANNEL_TLS_CERT_FILE", "GESCO_SENDER_CHANNEL_TLS_", "GESCO_SENDER_CHANNEL_ADDRESS"),
    "receiver": Hop("GESCO_RECEIVER_TLS_CERT_FILE", "GESCO_CHANNEL_RECEIVER_TLS_", "GESCO_CHANNEL_RECEIVER_ADDRESS"),
    # The sender's gRPC API; its clients are the gesco command's (gesco/cli.py's GRPC_ENVIRONMENT).
    "sender": Hop("GESCO_SENDER_GRPC_TLS_CERT_FILE", "GESCO_GRPC_", "GESCO_GRPC_SENDER"),
}


@dataclass(frozen=True)
class Probe:
    """How to reach one server: plaintext (no credentials) or TLS, checking `server_name`."""

    credentials: grpc.ChannelCredentials | None = None
    server_name: str = ""  # empty: the host dialed


def probe_for(server: str, env: Mapping[str, str]) -> Probe:
    """The probe of `server` ("channel", "receiver" or "sender") under `env`; ValueError naming the variable
    when the server speaks TLS but the client's files are missing or unusable."""
    hop = HOPS[server]
    if not env.get(hop.server_cert):
        return Probe()
    ca_file, cert_file, key_file = (env.get(f"{hop.client_prefix}{name}", "") for name in ("CA_FILE", "CERT_FILE", "KEY_FILE"))
    if not ca_file:
        raise ValueError(f"{hop.server_cert} makes the {server} speak TLS: set {hop.client_prefix}CA_FILE (and for "
                         f"mutual TLS {hop.client_prefix}CERT_FILE and {hop.client_prefix}KEY_FILE) to check its health")
    credentials = grpc_security.channel_credentials(ca_file, cert_file, key_file, prefix=hop.client_prefix)
    return Probe(credentials, _host(env.get(hop.client_address, "")))


def grpc_serving(target: str, probe: Probe, timeout_s: float = 2.0) -> bool:
    """The gRPC health check of `target` (host:port) says SERVING."""
    options = (("grpc.ssl_target_name_override", probe.server_name),) if probe.credentials and probe.server_name else ()
    with grpc_security.open_channel(target, probe.credentials, options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """`url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _host(address: str) -> str:
    """"receiver:50052" -> "receiver", "[::1]:50052" -> "::1", "dns:///receiver:50052" ->
    "receiver", a list of replicas: its first one's; "" stays empty."""
    address = address.split(",")[0].strip()
    if address.startswith("dns:"):
        address = address.rsplit("/", 1)[-1]
    return address.rpartition(":")[0].strip("[]") if ":" in address else address


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("server", choices=sorted(HOPS))
    parser.add_argument("target", help="host:port of its gRPC server")
    parser.add_argument("--ready-url", help="an HTTP URL that must answer 200 as well")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds per check")
    args = parser.parse_args(argv)
    try:
        probe = probe_for(args.server, os.environ)
    except ValueError as error:
        print(f"health probe: {error}", file=sys.stderr)
        return 2
    if args.ready_url and not http_ok(args.ready_url, args.timeout):
        return 1
    return 0 if grpc_serving(args.target, probe, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
