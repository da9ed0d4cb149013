"""`gesco`: a command line client of the running services.

    gesco send street.jpg --snr-db 5 --channel rayleigh -o out.png
    gesco sweep street.jpg --snrs 1,5,10,20 -o strip.png
    gesco status ID [--wait 30]
    gesco cancel ID

`--via` picks the protocol (TRANSPORTS maps a name to its client). With `rest`, the default, it
talks to the sender only (`--url`, default $GESCO_URL or http://127.0.0.1:8000): transmissions are
posted there and the receiver's status, image and maps are read through the sender's relay
(/receiver/v1/...), so one address and one API key (`--api-key`, or $GESCO_API_KEY) suffice. With
`grpc`, send and status call the gRPC APIs: Sender.Transmit (`--grpc-sender`, default
$GESCO_GRPC_SENDER or 127.0.0.1:50050) and the receiver's GetTransmission and WatchTransmission
(`--grpc-receiver`, default $GESCO_GRPC_RECEIVER or 127.0.0.1:50052), the API key in the
`x-api-key` metadata, over TLS with `--grpc-ca-file` (and a client certificate for mutual TLS;
GRPC_ENVIRONMENT lists their variables); its output is the same JSON. sweep needs the sender's REST-only preview and analog image.
gRPC has no cancel call: `--via grpc cancel` posts to the receiver's REST API, at the status URL
the receiver reports.

stdout carries the result a script reads (the transmission id, printed as soon as the sender has
accepted it, or JSON with --json and for status); progress and errors go to stderr, errors as one
line `gesco: error: ...`. Ctrl-C, or --timeout passing, while `send` or `sweep` follows its
transmissions cancels them at the receiver. Exit codes:

    0  success                          5  busy: queue full (HTTP 429); retry later
    1  unexpected error                 6  a service is unreachable or unavailable (503)
    2  bad command line                 7  the transmission failed or was cancelled
    3  the request was refused (400,    8  timed out (504, or --timeout passed)
       413, 422: the message names      9  no such transmission (404)
       the field)                      10  another error answer of a service (5xx)
    4  API key missing or wrong (401)   130 interrupted (Ctrl-C) with no transmission to cancel

gRPC status codes map to the same: INVALID_ARGUMENT 3, UNAUTHENTICATED 4, RESOURCE_EXHAUSTED 5,
UNAVAILABLE 6, DEADLINE_EXCEEDED 8, NOT_FOUND 9, any other 10.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import ssl
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import httpx
from google.protobuf import json_format
from google.protobuf.message import Message

from gesco.options import (
    DEFAULT_LINK,
    DEFAULT_RICIAN_K_DB,
    LINK_TITLES,
    SAMPLER_DEFAULT_STEPS,
    ChannelModel,
    Link,
    SnrDefinition,
    names,
)
from gesco.v1 import gesco_pb2, gesco_pb2_grpc

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_GRPC_SENDER = "127.0.0.1:50050"
DEFAULT_GRPC_RECEIVER = "127.0.0.1:50052"
# The variables the --via grpc options default to, by option. The health probe of the sender's gRPC
# API (shared/wire/health_probe.py) reads the TLS files and the sender's address from them too.
GRPC_ENVIRONMENT = {"grpc_sender": "GESCO_GRPC_SENDER", "grpc_receiver": "GESCO_GRPC_RECEIVER",
                    "grpc_ca_file": "GESCO_GRPC_CA_FILE", "grpc_cert_file": "GESCO_GRPC_CERT_FILE",
                    "grpc_key_file": "GESCO_GRPC_KEY_FILE"}
FINISHED = frozenset({"done", "failed", "cancelled"})
# The form field of the channel SNR in the sender's POST /v1/transmissions.
SNR_FIELD = "snr_db"
# A request to the sender gets this long beyond any long poll it asks for.
REQUEST_TIMEOUT_S = 60.0

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_REFUSED, EXIT_AUTH = 0, 1, 2, 3, 4
EXIT_BUSY, EXIT_UNAVAILABLE, EXIT_FAILED, EXIT_TIMEOUT, EXIT_NOT_FOUND, EXIT_SERVER = 5, 6, 7, 8, 9, 10
EXIT_INTERRUPTED = 130  # the shells' 128 + SIGINT
_EXIT_BY_STATUS = {400: EXIT_REFUSED, 401: EXIT_AUTH, 404: EXIT_NOT_FOUND, 409: EXIT_FAILED, 413: EXIT_REFUSED,
                   422: EXIT_REFUSED, 429: EXIT_BUSY, 503: EXIT_UNAVAILABLE, 504: EXIT_TIMEOUT}
_EXIT_BY_GRPC_CODE = {grpc.StatusCode.INVALID_ARGUMENT: EXIT_REFUSED, grpc.StatusCode.UNAUTHENTICATED: EXIT_AUTH,
                      grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_BUSY,
                      grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_TIMEOUT}
# The gRPC APIs' error details start with the request field they blame: "snr_db: ...".
_FIELD_OF_DETAILS = re.compile(r"^([a-z_]+): ")
# Images come back inside messages: room beyond gRPC's default 4 MiB.
MAX_GRPC_MESSAGE_BYTES = 64 * 1024 * 1024


class CliError(Exception):
    """Ends the command with `exit_code` and a one-line message on stderr."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


class WaitTimeout(CliError):
    """--timeout passed while following a transmission (which is still under way)."""

    def __init__(self, transmission_id: str, timeout_s: float) -> None:
        super().__init__(EXIT_TIMEOUT, f"transmission {transmission_id} had not finished after {timeout_s:g} s")


@dataclass(frozen=True)
class Upload:
    name: str
    data: bytes
    kind: str


class Client(Protocol):
    """What the commands need of a protocol: RestClient and GrpcClient."""

    def transmit(self, upload: Upload, fields: dict[str, str]) -> dict[str, Any]: ...
    def status(self, transmission_id: str, wait_s: float = 0.0) -> dict[str, Any]: ...
    def watch(self, transmission_id: str, timeout_s: float, often: bool) -> Iterator[dict[str, Any]]: ...
    def image(self, transmission_id: str) -> bytes: ...
    def label_map(self, transmission_id: str, stage: str) -> bytes: ...
    def cancel(self, transmission_id: str) -> dict[str, Any]: ...
    def preview(self, upload: Upload, fields: dict[str, str]) -> dict[str, Any]: ...
    def analog(self, upload: Upload, fields: dict[str, str]) -> dict[str, Any]: ...
    def close(self) -> None: ...


class RestClient:
    """The sender's REST API and its relay of the receiver's."""

    def __init__(self, url: str, api_key: str | None) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=REQUEST_TIMEOUT_S)
        self.url = url

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RestClient:
        return cls(args.url, args.api_key)

    def transmit(self, upload: Upload, fields: dict[str, str]) -> dict[str, Any]:
        return self._json("POST", "/v1/transmissions", files=self._files(upload), data=fields)

    def status(self, transmission_id: str, wait_s: float = 0.0) -> dict[str, Any]:
        params = {"wait_s": f"{wait_s:g}"} if wait_s > 0 else None
        return self._json("GET", f"/receiver/v1/transmissions/{transmission_id}", params=params,
                          timeout=REQUEST_TIMEOUT_S + wait_s)

    def watch(self, transmission_id: str, timeout_s: float, often: bool) -> Iterator[dict[str, Any]]:
        """The status after each long poll until it has finished (short polls when `often`, for a
        progress bar; else one per 20 s); WaitTimeout after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        wait_s = 0.5 if often else 20.0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(transmission_id, timeout_s)
            status = self.status(transmission_id, wait_s=min(wait_s, remaining))
            yield status
            if status.get("status") in FINISHED:
                return

    def image(self, transmission_id: str) -> bytes:
        return self._request("GET", f"/receiver/v1/transmissions/{transmission_id}/image").content

    def label_map(self, transmission_id: str, stage: str) -> bytes:
        """The receiver's `stage` ("received" or "fds") label map in the class palette."""
        path = f"/receiver/v1/transmissions/{transmission_id}/maps/{stage}_labels.png"
        return self._request("GET", path, params={"colour": "true"}).content

    def cancel(self, transmission_id: str) -> dict[str, Any]:
        """The receiver's cancel, through the sender's relay: the status it answers."""
        return self._json("POST", f"/receiver/v1/transmissions/{transmission_id}/cancel")

    def preview(self, upload: Upload, fields: dict[str, str]) -> dict[str, Any]:
        return self._json("POST", "/v1/preview", files=self._files(upload), data=fields)

    def analog(self, upload: Upload, fields: dict[str, str]) -> dict[str, Any]:
        return self._json("POST", "/v1/analog", files=self._files(upload), data=fields)

    def close(self) -> None:
        self._http.close()

    @staticmethod
    def _files(upload: Upload) -> dict[str, tuple[str, bytes]]:
        return {"file": (upload.name, upload.data)}

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise CliError(EXIT_SERVER, f"{method} {path} answered {response.status_code} without JSON") from None

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise CliError(EXIT_TIMEOUT, f"{method} {self.url}{path} timed out") from None
        except httpx.TransportError as error:
            raise CliError(EXIT_UNAVAILABLE, f"the sender at {self.url} cannot be reached: "
                                             f"{type(error).__name__}: {error}") from None
        if response.is_success:
            return response
        raise api_error(response)


def api_error(response: httpx.Response) -> CliError:
    """The API's own message, with the field it blames, as a CliError of the matching exit code."""
    message, field = response.reason_phrase, None
    try:
        body = response.json()
        if isinstance(body.get("error"), dict):
            message = body["error"].get("message") or message
            field = body["error"].get("field")
        elif "detail" in body:
            message = body["detail"] if isinstance(body["detail"], str) else json.dumps(body["detail"])
    except (ValueError, AttributeError):
        pass
    text = f"HTTP {response.status_code}: {message}"
    if field:
        text += f" (field: {field})"
    if "retry-after" in response.headers:
        text += f"; retry after {response.headers['retry-after']} s"
    code = _EXIT_BY_STATUS.get(response.status_code)
    if code is None:
        code = EXIT_SERVER if response.status_code >= 500 else EXIT_REFUSED
    return CliError(code, text)


class GrpcClient:
    """The sender's Sender.Transmit and the receiver's GetTransmission and WatchTransmission.

    Answers come back as the REST API's JSON (the messages' fields have the same names).
    """

    def __init__(self, sender: str, receiver: str, api_key: str | None,
                 credentials: grpc.ChannelCredentials | None = None, ca_file: str | None = None) -> None:
        options = (("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_BYTES),)
        open_channel = (lambda target: grpc.secure_channel(target, credentials, options)) if credentials else (
            lambda target: grpc.insecure_channel(target, options))
        self._channels = [open_channel(sender), open_channel(receiver)]
        self._sender = gesco_pb2_grpc.SenderStub(self._channels[0])
        self._receiver = gesco_pb2_grpc.ReceiverStub(self._channels[1])
        self._addresses = {"sender": sender, "receiver": receiver}
        self._metadata = (("x-api-key", api_key),) if api_key else ()
        self._api_key = api_key
        self._ca_file = ca_file

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GrpcClient:
        return cls(args.grpc_sender, args.grpc_receiver, args.api_key,
                   tls_credentials(args.grpc_ca_file, args.grpc_cert_file, args.grpc_key_file), args.grpc_ca_file)

    def transmit(self, upload: Upload, fields: dict[str, str]) -> dict[str, Any]:
        request = gesco_pb2.TransmitRequest(image=upload.data)
        for name, text in fields.items():
            field = request.DESCRIPTOR.fields_by_name.get(name)
            if field is None:
                raise CliError(EXIT_USAGE, f"the gRPC API has no {name} field; use --via rest")
            setattr(request, name, _field_value(field, text))
        return message_json(self._call("sender", self._sender.Transmit, request, REQUEST_TIMEOUT_S))

    def status(self, transmission_id: str, wait_s: float = 0.0) -> dict[str, Any]:
        """The status now, or with `wait_s` once it has finished or after `wait_s` seconds."""
        if wait_s > 0:
            with contextlib.suppress(WaitTimeout):
                *_, finished = self._watch(transmission_id, wait_s)
                return finished
        return message_json(self._get(transmission_id, include_image=False).status)  # not finished (yet)

    def watch(self, transmission_id: str, timeout_s: float, often: bool) -> Iterator[dict[str, Any]]:
        """Each change of the status (every sampling step) until it has finished; WaitTimeout after
        `timeout_s`."""
        return self._watch(transmission_id, timeout_s)

    def image(self, transmission_id: str) -> bytes:
        answer = self._get(transmission_id, include_image=True)
        if not answer.image_png:
            raise CliError(EXIT_FAILED, f"transmission {transmission_id} is {answer.status.status}: it has no image")
        return answer.image_png

    def label_map(self, transmission_id: str, stage: str) -> bytes:
        raise CliError(EXIT_USAGE, "the label maps are served over REST only: use --via rest")

    def cancel(self, transmission_id: str) -> dict[str, Any]:
        """The receiver's gRPC API has no cancel call: a POST to its REST API, at the status URL
        it reports (with the same API key, and the CA file for https)."""
        url = self._get(transmission_id, include_image=False).status.urls["status"] + "/cancel"
        headers = {"X-API-Key": self._api_key} if self._api_key else None
        try:
            response = httpx.post(url, headers=headers, timeout=REQUEST_TIMEOUT_S, verify=self._verify())
        except httpx.TransportError as error:
            raise CliError(EXIT_UNAVAILABLE, f"the receiver at {url} cannot be reached: "
                                             f"{type(error).__name__}: {error}") from None
        if not response.is_success:
            raise api_error(response)
        return response.json()

    def _verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=self._ca_file) if self._ca_file else True

    def preview(self, upload: Upload, fields: dict[str, str]) -> dict[str, Any]:
        raise CliError(EXIT_USAGE, "the preview is served over REST only: use --via rest")

    def analog(self, upload: Upload, fields: dict[str, str]) -> dict[str, Any]:
        raise CliError(EXIT_USAGE, "the analog image is served over REST only: use --via rest")

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def _watch(self, transmission_id: str, timeout_s: float) -> Iterator[dict[str, Any]]:
        request = gesco_pb2.WatchTransmissionRequest(transmission_id=transmission_id)
        stream = self._call("receiver", self._receiver.WatchTransmission, request, timeout_s)
        try:
            for message in stream:
                yield message_json(message.status)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise WaitTimeout(transmission_id, timeout_s) from None
            raise grpc_error(error, "receiver", self._addresses["receiver"]) from None
        finally:
            stream.cancel()  # a watch left early: the job goes on

    def _get(self, transmission_id: str, include_image: bool) -> gesco_pb2.GetTransmissionResponse:
        request = gesco_pb2.GetTransmissionRequest(transmission_id=transmission_id, include_image=include_image)
        return self._call("receiver", self._receiver.GetTransmission, request, REQUEST_TIMEOUT_S)

    def _call(self, service: str, method: Callable, request: Message, timeout_s: float) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=timeout_s)
        except grpc.RpcError as error:
            raise grpc_error(error, service, self._addresses[service]) from None


def tls_credentials(ca_file: str | None, cert_file: str | None, key_file: str | None) -> grpc.ChannelCredentials | None:
    """TLS with the servers' CA (None: plaintext); with a certificate and key, mutual TLS."""
    if not (ca_file or cert_file or key_file):
        return None
    if not ca_file or bool(cert_file) != bool(key_file):
        raise CliError(EXIT_USAGE, "TLS needs --grpc-ca-file, and --grpc-cert-file with --grpc-key-file for mutual TLS")
    pem = {}
    for name, path in (("ca", ca_file), ("cert", cert_file), ("key", key_file)):
        try:
            pem[name] = Path(path).read_bytes() if path else None
        except OSError as error:
            raise CliError(EXIT_USAGE, f"cannot read {path}: {error.strerror or error}") from None
    return grpc.ssl_channel_credentials(pem["ca"], pem["key"], pem["cert"])


def message_json(message: Message) -> dict[str, Any]:
    """A message as the REST API's JSON: the same names, null for an unset optional field or
    message, numbers as numbers (the proto3 JSON mapping would quote 64-bit integers)."""
    answer: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        kind = field.message_type
        if kind is not None and kind.GetOptions().map_entry:
            answer[field.name] = dict(value)
        elif field.is_repeated:
            answer[field.name] = [message_json(item) for item in value] if kind is not None else list(value)
        elif field.has_presence and not message.HasField(field.name):
            answer[field.name] = None
        elif kind is not None and kind.full_name == "google.protobuf.Struct":
            answer[field.name] = json_format.MessageToDict(value)
        elif kind is not None:
            answer[field.name] = message_json(value)
        else:
            answer[field.name] = value
    return answer


def _field_value(field, text: str) -> Any:
    """A form value (text) as the value of `field` in the request."""
    if field.type == field.TYPE_BOOL:
        return text.lower() in ("true", "1", "yes", "on")
    if field.type in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
        return float(text)
    if field.type == field.TYPE_STRING:
        return text
    return int(text)


def grpc_error(error: grpc.RpcError, service: str, address: str) -> CliError:
    """The API's details, with the field they blame, as a CliError of the matching exit code."""
    code, details = error.code(), error.details() or ""
    field = _FIELD_OF_DETAILS.match(details)
    if field:
        text = f"gRPC {code.name}: {details[field.end():]} (field: {field.group(1)})"
    elif code == grpc.StatusCode.UNAVAILABLE:
        text = f"gRPC {code.name} from the {service} at {address}: {details}"
    else:
        text = f"gRPC {code.name}: {details}"
    retry_after = dict(error.trailing_metadata() or ()).get("retry-after")
    if retry_after:
        text += f"; retry after {retry_after} s"
    return CliError(_EXIT_BY_GRPC_CODE.get(code, EXIT_SERVER), text)


TRANSPORTS: dict[str, Callable[[argparse.Namespace], Client]] = {"rest": RestClient.from_args,
                                                                 "grpc": GrpcClient.from_args}


# --- progress ------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr, redrawn in place; silent when disabled."""

    WIDTH = 30

    def __init__(self, enabled: bool, stream=sys.stderr) -> None:
        self.enabled = enabled
        self.stream = stream
        self._last = ""

    def show(self, status: dict[str, Any]) -> None:
        if not self.enabled:
            return
        progress = status.get("progress") or {}
        step, steps = progress.get("step"), progress.get("steps")
        state = status.get("status", "?")
        if state == "running" and steps:
            filled = round(self.WIDTH * step / steps)
            line = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] sampling step {step}/{steps}"
        elif state == "done":
            line = f"[{'#' * self.WIDTH}] done"
        else:
            line = f"[{'.' * self.WIDTH}] {state}"
        if line != self._last:
            self.stream.write("\r" + line.ljust(len(self._last)))
            self.stream.flush()
            self._last = line

    def end(self) -> None:
        if self.enabled and self._last:
            self.stream.write("\n")
            self.stream.flush()


def follow(client: Client, transmission_id: str, timeout_s: float, progress: Progress) -> dict[str, Any]:
    """Follow the status until the transmission has finished; WaitTimeout after `timeout_s`."""
    status: dict[str, Any] = {}
    for status in client.watch(transmission_id, timeout_s, often=progress.enabled):
        progress.show(status)
    return status


@contextlib.contextmanager
def cancelled_if_abandoned(client: Client, pending: list[str]) -> Iterator[None]:
    """Cancel the transmissions still in `pending` when the command gives up on them (Ctrl-C, or
    --timeout passing): nobody would fetch their images, and the receiver's sampling time goes to
    jobs still wanted. Ctrl-C before any was accepted leaves nothing to cancel."""
    try:
        yield
    except KeyboardInterrupt:
        if not pending:
            raise
        raise CliError(EXIT_FAILED, f"interrupted; {cancel_all(client, pending)}") from None
    except WaitTimeout as error:
        raise CliError(EXIT_TIMEOUT, f"{error.message}; {cancel_all(client, pending)}") from None


def cancel_all(client: Client, transmission_ids: list[str]) -> str:
    """Ask the receiver to cancel each transmission; what it answered, for the error message."""
    outcomes = []
    for transmission_id in transmission_ids:
        try:
            client.cancel(transmission_id)
            outcomes.append(f"transmission {transmission_id} cancelled")
        except CliError as error:
            outcomes.append(f"transmission {transmission_id} not cancelled ({error.message})")
    return "; ".join(outcomes)


def accepted(args: argparse.Namespace, sent: dict[str, Any]) -> str:
    """The id of a transmission the sender accepted, told at once: on stdout (unless --json), and
    with the progress bar on stderr too, where a person watching reads it."""
    transmission_id = sent["id"]
    if not args.json:
        print(transmission_id, flush=True)
    if args.progress:
        print(f"transmission {transmission_id} accepted, queue position {sent.get('queue_position')}; "
              "Ctrl-C cancels it", file=sys.stderr, flush=True)
    return transmission_id


def require_done(status: dict[str, Any]) -> None:
    if status.get("status") != "done":
        detail = f": {status['error']}" if status.get("error") else ""
        raise CliError(EXIT_FAILED, f"transmission {status.get('id')} {status.get('status')}{detail}")


# --- commands ------------------------------------------------------------------------------------


def read_upload(path: str, kind: str | None) -> Upload:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise CliError(EXIT_USAGE, f"cannot read {path}: {error.strerror or error}") from None
    return Upload(Path(path).name, data, kind or guess_kind(data))


def guess_kind(data: bytes) -> str:
    """label_map for an 8-bit greyscale or palette PNG (what label maps are), photo otherwise."""
    is_png = data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR"
    if is_png and len(data) >= 26:
        bit_depth, colour_type = data[24], data[25]
        if bit_depth == 8 and colour_type in (0, 3):
            return "label_map"
    return "photo"


def transmission_fields(args: argparse.Namespace, kind: str) -> dict[str, str]:
    fields = {
        "kind": kind,
        SNR_FIELD: args.snr_db,
        "snr_definition": args.snr_definition,
        "channel": args.channel,
        "sampler": args.sampler,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "downsample_factor": args.downsample_factor,
        "compression": args.compression,
        "jpeg_quality": args.jpeg_quality,
        "budget": args.budget,
        "link": args.link,
        "scheme": args.scheme,
        "rician_k_db": args.rician_k_db,
        "equalize": None if args.equalize else "false",
        "use_fds": None if args.fds else "false",
    }
    return {name: str(value) for name, value in fields.items() if value is not None}


def cmd_send(client: Client, args: argparse.Namespace) -> int:
    upload = read_upload(args.file, args.kind)
    check_writable(args.output)
    sent = client.transmit(upload, transmission_fields(args, upload.kind))
    transmission_id = accepted(args, sent)
    progress = Progress(args.progress)
    try:
        with cancelled_if_abandoned(client, [transmission_id]):
            status = follow(client, transmission_id, args.timeout, progress)
    finally:
        progress.end()
    require_done(status)
    if args.output:
        _write(args.output, client.image(transmission_id))
    if args.json:
        # The sender's choice of coding for a budget is in its answer only, not in the status.
        print(json.dumps({**status, "budget": sent["budget"]} if sent.get("budget") else status, indent=2))
    return EXIT_OK


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    print(json.dumps(client.status(args.id, wait_s=args.wait), indent=2))
    return EXIT_OK


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    print(json.dumps(client.cancel(args.id), indent=2))
    return EXIT_OK


def cmd_sweep(client: Client, args: argparse.Namespace) -> int:
    from gesco import grid  # numpy and OpenCV, for this command only

    upload = read_upload(args.file, args.kind)
    check_writable(args.output)
    snrs = parse_snrs(args.snrs)
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "big")  # one seed for every SNR
    fields = transmission_fields(args, upload.kind)
    preview = client.preview(upload, {"kind": upload.kind, **_only(fields, "downsample_factor")})
    analog = client.analog(upload, {"kind": upload.kind, "snrs_db": ",".join(f"{s:g}" for s in snrs),
                                    **_only(fields, "channel", "snr_definition", "seed")})
    ids: list[str] = []
    pending: list[str] = []  # accepted and not finished: what Ctrl-C cancels
    progress = Progress(args.progress)
    rows = []
    try:
        with cancelled_if_abandoned(client, pending):
            for snr in snrs:
                ids.append(accepted(args, client.transmit(upload, {**fields, SNR_FIELD: f"{snr:g}"})))
                pending.append(ids[-1])
            statuses = []
            for transmission_id in ids:
                statuses.append(follow(client, transmission_id, args.timeout, progress))
                pending.remove(transmission_id)
        for snr, transmission_id, status, analog_result in zip(snrs, ids, statuses, analog["results"]):
            require_done(status)
            rows.append(grid.SweepRow(
                snr_db=snr,
                measured_snr_db=status["channel"]["measured_snr_db"],
                received=client.label_map(transmission_id, "received"),
                fds=client.label_map(transmission_id, "fds"),
                generated=client.image(transmission_id),
                analog=grid.data_url_bytes(analog_result["png"]),
            ))
    finally:
        progress.end()
    _write(args.output, grid.sweep_grid(grid.data_url_bytes(preview["segmentation_png"]), rows))
    if args.json:
        print(json.dumps({"output": args.output, "seed": args.seed, "ids": {f"{snr:g}": tid for snr, tid in zip(snrs, ids)}}))
    return EXIT_OK


def parse_snrs(text: str) -> list[float]:
    try:
        snrs = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CliError(EXIT_USAGE, f"--snrs must be comma-separated numbers, got {text!r}") from None
    if not snrs:
        raise CliError(EXIT_USAGE, "--snrs needs at least one SNR")
    return snrs


def _only(fields: dict[str, str], *names: str) -> dict[str, str]:
    return {name: fields[name] for name in names if name in fields}


def check_writable(path: str | None) -> None:
    """Refuse an output file that cannot be written before anything is sent, rather than after
    a whole transmission."""
    if path is None:
        return
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        problem = "it is a directory"
    elif not folder.is_dir():
        problem = f"no directory {folder}"
    elif not os.access(target if target.exists() else folder, os.W_OK):
        problem = "permission denied"
    else:
        return
    raise CliError(EXIT_USAGE, f"cannot write {path}: {problem}")


def _write(path: str, data: bytes) -> None:
    try:
        Path(path).write_bytes(data)
    except OSError as error:
        raise CliError(EXIT_USAGE, f"cannot write {path}: {error.strerror or error}") from None


# --- command line --------------------------------------------------------------------------------


def _transmission_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a photo (PNG, JPEG, WebP, BMP) or a label-map PNG of class ids")
    parser.add_argument("--kind", choices=("photo", "label_map"),
                        help="what FILE is (default: label_map for an 8-bit greyscale/palette PNG, else photo)")
    parser.add_argument("--snr-definition", choices=names(SnrDefinition))
    parser.add_argument("--channel", choices=names(ChannelModel))
    parser.add_argument("--sampler", help=f"a sampler of the receiver ({', '.join(SAMPLER_DEFAULT_STEPS)}); "
                                          "default: the receiver's")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the sampler's)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, help="channel noise and sampler seed (default: random)")
    parser.add_argument("--rician-k-db", type=float, help=f"Rician K-factor in dB (default: {DEFAULT_RICIAN_K_DB:g})")
    parser.add_argument("--no-equalize", dest="equalize", action="store_false",
                        help="no zero-forcing equalisation of a fading channel")
    parser.add_argument("--downsample-factor", type=int, help="area downsampling of the maps (default: the sender's)")
    parser.add_argument("--compression", help="compression of the maps, one the sender's GET /v1/options lists "
                                              "(default: the sender's)")
    parser.add_argument("--jpeg-quality", type=int, help="JPEG quality of --compression jpeg, 1 to 100 "
                                                         "(default: the sender's)")
    parser.add_argument("--budget", help="channel-use budget: complex channel uses (3072) or a bandwidth ratio "
                                         "(1/12); the sender picks the map coding with the best expected mIoU "
                                         "within it (docs/rate-quality.md)")
    parser.add_argument("--link", choices=names(Link), help="how the scene travels: " + "; ".join(
        f"{link.value}: {title}" for link, title in LINK_TITLES.items()) + f" (default: {DEFAULT_LINK.value}; auto "
        "needs --budget)")
    parser.add_argument("--scheme", help="the digital link's modulation and code rate, one the sender's GET "
                                         "/v1/options lists, e.g. '16-QAM r=1/2' (default: the scheme for the SNR)")
    parser.add_argument("--no-fds", dest="fds", action="store_false", help="condition on the noisy maps")
    parser.add_argument("-o", "--output", help="write the PNG here")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for the image (600); then the transmission is cancelled")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the bare id(s)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                        help="a progress bar on stderr (default: when stderr is a terminal)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gesco", description="Send images through the gesco link and read the results.",
        epilog="Exit codes: 0 ok, 1 unexpected, 2 usage, 3 refused (400/413/422), 4 API key (401), "
               "5 busy (429), 6 unavailable (503, unreachable), 7 transmission failed or cancelled, "
               "8 timed out, 9 not found (404), 10 other server error, 130 interrupted with nothing to cancel.")
    parser.add_argument("--url", default=os.environ.get("GESCO_URL", DEFAULT_URL),
                        help=f"the sender's base URL (default: $GESCO_URL or {DEFAULT_URL})")
    parser.add_argument("--api-key", default=os.environ.get("GESCO_API_KEY"),
                        help="sent as X-API-Key (default: $GESCO_API_KEY)")
    parser.add_argument("--via", choices=sorted(TRANSPORTS), default="rest",
                        help="protocol (default: rest; grpc: send, status and cancel)")
    grpc_options = parser.add_argument_group("--via grpc")
    for option, default, help_text in (
        ("grpc_sender", DEFAULT_GRPC_SENDER, "the sender's gRPC API"),
        ("grpc_receiver", DEFAULT_GRPC_RECEIVER, "the receiver's gRPC API"),
        ("grpc_ca_file", None, "PEM CA of the servers' certificates: TLS (none: plaintext)"),
        ("grpc_cert_file", None, "PEM client certificate, for mutual TLS"),
        ("grpc_key_file", None, "PEM key of that certificate"),
    ):
        variable = GRPC_ENVIRONMENT[option]
        grpc_options.add_argument("--" + option.replace("_", "-"), default=os.environ.get(variable, default),
                                  help=f"{help_text} (default: ${variable}" + (f" or {default})" if default else ")"))
    commands = parser.add_subparsers(dest="command", required=True)

    send = commands.add_parser("send", help="send one image; save the generated PNG with -o")
    _transmission_options(send)
    send.add_argument("--snr-db", type=float, help="channel SNR in dB (default: the sender's, 100)")
    send.set_defaults(run=cmd_send)

    sweep = commands.add_parser("sweep", help="the same image at several SNRs: a PNG grid of the stages")
    _transmission_options(sweep)
    sweep.add_argument("--snrs", default="1,5,10,20,100", help="comma-separated SNRs in dB (1,5,10,20,100)")
    sweep.set_defaults(run=cmd_sweep, snr_db=None)

    status = commands.add_parser("status", help="print a transmission's status JSON")
    status.add_argument("id", help="the transmission id")
    status.add_argument("--wait", type=float, default=0.0, help="long poll: wait up to this many seconds "
                                                                   "for it to finish (at most 60)")
    status.set_defaults(run=cmd_status)

    cancel = commands.add_parser("cancel", help="cancel a transmission: a queued one at once, a running one at its "
                                                "next sampling step; print its status JSON")
    cancel.add_argument("id", help="the transmission id")
    cancel.set_defaults(run=cmd_cancel)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "sweep" and not args.output:
        build_parser().error("sweep needs -o/--output")
    try:
        client = TRANSPORTS[args.via](args)
    except CliError as error:
        print(f"gesco: error: {error.message}", file=sys.stderr)
        return error.exit_code
    try:
        return args.run(client, args)
    except CliError as error:
        print(f"gesco: error: {error.message}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("gesco: interrupted (no transmission of its own under way to cancel)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        client.close()
