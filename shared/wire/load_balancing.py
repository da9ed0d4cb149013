"""Client-side load balancing of a gRPC channel over server replicas: gRPC's own `round_robin`
policy with client-side health checking, configured through the channel's service config.

An address names the replicas in one of three ways:

- `dns:///name:port`: every address the name resolves to (a headless Service in Kubernetes, a
  compose service scaled to N replicas); gRPC resolves it again when a connection fails or a
  server closes it (the servers close their connections after SERVER_MAX_CONNECTION_AGE_MS, so
  replicas added since are picked up);
- `host:port`: the same (gRPC's default resolver is DNS), one replica in the usual case;
- `ip:port,ip:port,...`: a fixed list of IP addresses, as gRPC's `ipv4:` (or `ipv6:`) target.

Each call goes to the next replica in turn among those that are connected and healthy: the
channel watches every replica's standard health service (grpc.health.v1 Health.Watch) for the
named service, so a replica that says NOT_SERVING (its model still loading, or shutting down) or
cannot be reached leaves the rotation until it serves again. A server without the health service
counts as serving (gRPC's rule).
"""
from __future__ import annotations

import ipaddress
import json

# Servers close each client connection after this long, so that clients resolve the replicas'
# names again and spread over new ones too; calls under way get the grace to finish (as long as
# the sender's longest wait for an image).
SERVER_MAX_CONNECTION_AGE_MS = 30 * 1000
SERVER_MAX_CONNECTION_AGE_GRACE_MS = 10 * 60 * 1000


def grpc_target(address: str, setting: str = "address") -> str:
    """The gRPC target for `address` (see the module's docstring); ValueError naming `setting`
    for a list that is not all IPv4 or all IPv6 addresses with ports."""
    address = address.strip()
    if "," not in address:
        if not address:
            raise ValueError(f"{setting} is empty")
        return address
    parts = [part.strip() for part in address.split(",")]
    families = set()
    for part in parts:
        host, _, port = part.rpartition(":")
        try:
            ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
            valid_port = port.isdigit() and 1 <= int(port) <= 65535
        except ValueError:
            ip, valid_port = None, False
        if ip is None or not valid_port or (ip.version == 6 and not host.startswith("[")):
            raise ValueError(f"{setting}: a list takes IP addresses with ports (ip:port, [ipv6]:port), "
                             f"got {part[:60]!r}; name replicas by DNS with dns:///name:port")
        families.add(ip.version)
    if len(families) > 1:
        raise ValueError(f"{setting}: a list takes IPv4 or IPv6 addresses, not both")
    return f"ipv{families.pop()}:" + ",".join(parts)


def balancing_options(health_service: str) -> tuple[tuple[str, str | int], ...]:
    """Channel options: round_robin over the target's addresses, each watched through the health
    service for `health_service` (the full gRPC service name, e.g. gesco.v1.Receiver)."""
    config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": health_service},
    }
    return (
        ("grpc.service_config", json.dumps(config)),
        # This configuration holds whatever a DNS TXT record might say.
        ("grpc.service_config_disable_resolution", 1),
    )


def server_options() -> tuple[tuple[str, int], ...]:
    """Server options that make clients resolve replicas again now and then (see the constants)."""
    return (
        ("grpc.max_connection_age_ms", SERVER_MAX_CONNECTION_AGE_MS),
        ("grpc.max_connection_age_grace_ms", SERVER_MAX_CONNECTION_AGE_GRACE_MS),
    )
