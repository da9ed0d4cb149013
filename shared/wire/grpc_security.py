"""TLS and mutual TLS for the two gRPC hops (sender -> channel, channel -> receiver).

Every setting is a PEM file path, empty meaning "off", so plaintext stays the default on
loopback. A server with a certificate and key speaks TLS; given a client CA as well, it requires
every client to present a certificate signed by that CA (mutual TLS). A client with a CA file
speaks TLS and verifies the server against that CA; given a certificate and key as well, it
presents them. Relative paths are taken from the repository root. Key material is read once at
startup and never logged.
"""
from __future__ import annotations

import grpc

from shared.paths import resolve_repo_path


def read_pem(path: str, setting: str) -> bytes:
    """The bytes of the PEM file a setting names; ValueError naming the setting if unreadable."""
    resolved = resolve_repo_path(path)
    try:
        data = resolved.read_bytes()
    except OSError as error:
        raise ValueError(f"{setting}: cannot read {resolved}: {error.strerror or error}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{setting}: {resolved} is not a PEM file")
    return data


def server_credentials(
    cert_file: str, key_file: str, client_ca_file: str = "", prefix: str = ""
) -> grpc.ServerCredentials | None:
    """TLS credentials for a server (None: plaintext); mutual TLS when client_ca_file is set.

    `prefix` (e.g. "GESCO_CHANNEL_TLS_") names the settings in error messages.
    """
    if not (cert_file or key_file or client_ca_file):
        return None
    if not (cert_file and key_file):
        raise ValueError(f"{prefix}CERT_FILE and {prefix}KEY_FILE must be set together")
    pair = (read_pem(key_file, f"{prefix}KEY_FILE"), read_pem(cert_file, f"{prefix}CERT_FILE"))
    client_ca = read_pem(client_ca_file, f"{prefix}CLIENT_CA_FILE") if client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def channel_credentials(
    ca_file: str, cert_file: str = "", key_file: str = "", prefix: str = ""
) -> grpc.ChannelCredentials | None:
    """TLS credentials for a client (None: plaintext); with cert and key it presents them (mTLS)."""
    if not (ca_file or cert_file or key_file):
        return None
    if not ca_file:
        raise ValueError(f"{prefix}CA_FILE must be set to use TLS (a client certificate alone is not enough)")
    if bool(cert_file) != bool(key_file):
        raise ValueError(f"{prefix}CERT_FILE and {prefix}KEY_FILE must be set together")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca_file, f"{prefix}CA_FILE"),
        private_key=read_pem(key_file, f"{prefix}KEY_FILE") if key_file else None,
        certificate_chain=read_pem(cert_file, f"{prefix}CERT_FILE") if cert_file else None,
    )


def add_port(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind `server` to `address`, with TLS when credentials are given; OSError if it cannot."""
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


def open_channel(
    address: str, credentials: grpc.ChannelCredentials | None, options=()
) -> grpc.Channel:
    """A blocking gRPC channel to `address`, secure when credentials are given."""
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


def open_aio_channel(
    address: str, credentials: grpc.ChannelCredentials | None, options=()
) -> grpc.aio.Channel:
    """An asyncio gRPC channel to `address`, secure when credentials are given."""
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials, options=options)
