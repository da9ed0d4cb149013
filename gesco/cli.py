"""`gesco`: a command line client of the running services.

    gesco send street.jpg --snr-db 5 --channel rayleigh -o out.png
    gesco sweep street.jpg --snrs 1,5,10,20 -o strip.png
    gesco status ID [--wait 30]

It talks to the sender only (`--url`, default $GESCO_URL or http://127.0.0.1:8000): transmissions
are posted there and the receiver's status, image and maps are read through the sender's relay
(/receiver/v1/...), so one address and one API key (`--api-key`, or $GESCO_API_KEY) suffice.
`--via` picks the protocol; `rest` is the one there is (TRANSPORTS maps a name to its client).

stdout carries the result a script reads (the transmission id, or JSON with --json and for
status); progress and errors go to stderr, errors as one line `gesco: error: ...`. Exit codes:

    0  success                          5  busy: queue full (HTTP 429); retry later
    1  unexpected error                 6  a service is unreachable or unavailable (503)
    2  bad command line                 7  the transmission failed or was cancelled
    3  the request was refused (400,    8  timed out (504, or --timeout passed)
       413, 422: the message names      9  no such transmission (404)
       the field)                      10  another error answer of a service (5xx)
    4  API key missing or wrong (401)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
FINISHED = frozenset({"done", "failed", "cancelled"})
# The form field of the channel SNR in the sender's POST /v1/transmissions.
SNR_FIELD = "snr_db"
# A request to the sender gets this long beyond any long poll it asks for.
REQUEST_TIMEOUT_S = 60.0

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_REFUSED, EXIT_AUTH = 0, 1, 2, 3, 4
EXIT_BUSY, EXIT_UNAVAILABLE, EXIT_FAILED, EXIT_TIMEOUT, EXIT_NOT_FOUND, EXIT_SERVER = 5, 6, 7, 8, 9, 10
_EXIT_BY_STATUS = {400: EXIT_REFUSED, 401: EXIT_AUTH, 404: EXIT_NOT_FOUND, 409: EXIT_FAILED, 413: EXIT_REFUSED,
                   422: EXIT_REFUSED, 429: EXIT_BUSY, 503: EXIT_UNAVAILABLE, 504: EXIT_TIMEOUT}


class CliError(Exception):
    """Ends the command with `exit_code` and a one-line message on stderr."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


@dataclass(frozen=True)
class Upload:
    name: str
    data: bytes
    kind: str


class Client(Protocol):
    """What the commands need of a protocol; a gRPC client implements the same methods."""

    def transmit(self, upload: Upload, fields: dict[str, str]) -> dict[str, Any]: ...
    def status(self, transmission_id: str, wait_s: float = 0.0) -> dict[str, Any]: ...
    def image(self, transmission_id: str) -> bytes: ...
    def label_map(self, transmission_id: str, stage: str) -> bytes: ...
    def preview(self, upload: Upload, fields: dict[str, str]) -> dict[str, Any]: ...
    def analog(self, upload: Upload, fields: dict[str, str]) -> dict[str, Any]: ...
    def close(self) -> None: ...


class RestClient:
    """The sender's REST API and its relay of the receiver's."""

    def __init__(self, url: str, api_key: str | None) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=REQUEST_TIMEOUT_S)
        self.url = url

    def transmit(self, upload: Upload, fields: dict[str, str]) -> dict[str, Any]:
        return self._json("POST", "/v1/transmissions", files=self._files(upload), data=fields)

    def status(self, transmission_id: str, wait_s: float = 0.0) -> dict[str, Any]:
        params = {"wait_s": f"{wait_s:g}"} if wait_s > 0 else None
        return self._json("GET", f"/receiver/v1/transmissions/{transmission_id}", params=params,
                          timeout=REQUEST_TIMEOUT_S + wait_s)

    def image(self, transmission_id: str) -> bytes:
        return self._request("GET", f"/receiver/v1/transmissions/{transmission_id}/image").content

    def label_map(self, transmission_id: str, stage: str) -> bytes:
        """The receiver's `stage` ("received" or "fds") label map in the class palette."""
        path = f"/receiver/v1/transmissions/{transmission_id}/maps/{stage}_labels.png"
        return self._request("GET", path, params={"colour": "true"}).content

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


TRANSPORTS: dict[str, Callable[[str, str | None], Client]] = {"rest": RestClient}


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
    """Poll the status until the transmission has finished; CliError on timeout."""
    deadline = time.monotonic() + timeout_s
    # With a progress bar, short long polls redraw it; without, one long poll per 20 s.
    wait_s = 0.5 if progress.enabled else 20.0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CliError(EXIT_TIMEOUT, f"transmission {transmission_id} had not finished after {timeout_s:g} s")
        status = client.status(transmission_id, wait_s=min(wait_s, remaining))
        progress.show(status)
        if status.get("status") in FINISHED:
            return status


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
        "use_fds": None if args.fds else "false",
    }
    return {name: str(value) for name, value in fields.items() if value is not None}


def cmd_send(client: Client, args: argparse.Namespace) -> int:
    upload = read_upload(args.file, args.kind)
    sent = client.transmit(upload, transmission_fields(args, upload.kind))
    transmission_id = sent["id"]
    progress = Progress(args.progress)
    try:
        status = follow(client, transmission_id, args.timeout, progress)
    finally:
        progress.end()
    require_done(status)
    if args.output:
        _write(args.output, client.image(transmission_id))
    print(json.dumps(status, indent=2) if args.json else transmission_id)
    return EXIT_OK


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    print(json.dumps(client.status(args.id, wait_s=args.wait), indent=2))
    return EXIT_OK


def cmd_sweep(client: Client, args: argparse.Namespace) -> int:
    from gesco import grid  # numpy and OpenCV, for this command only

    upload = read_upload(args.file, args.kind)
    snrs = parse_snrs(args.snrs)
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "big")  # one seed for every SNR
    fields = transmission_fields(args, upload.kind)
    preview = client.preview(upload, {"kind": upload.kind, **_only(fields, "downsample_factor")})
    analog = client.analog(upload, {"kind": upload.kind, "snrs_db": ",".join(f"{s:g}" for s in snrs),
                                    **_only(fields, "channel", "snr_definition", "seed")})
    ids = [client.transmit(upload, {**fields, SNR_FIELD: f"{snr:g}"})["id"] for snr in snrs]
    progress = Progress(args.progress)
    rows = []
    try:
        for snr, transmission_id, analog_result in zip(snrs, ids, analog["results"]):
            status = follow(client, transmission_id, args.timeout, progress)
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
    print(json.dumps({"output": args.output, "seed": args.seed, "ids": {f"{snr:g}": tid for snr, tid in zip(snrs, ids)}})
          if args.json else "\n".join(ids))
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
    parser.add_argument("--snr-definition", choices=("paper_psnr", "average_power"))
    parser.add_argument("--channel", choices=("awgn", "rayleigh", "rician", "tdl_ofdm"))
    parser.add_argument("--sampler", help="a sampler of the receiver (ddim, ddpm, dpmpp2m); default: the receiver's")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the sampler's)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, help="channel noise and sampler seed (default: random)")
    parser.add_argument("--downsample-factor", type=int, help="area downsampling of the maps")
    parser.add_argument("--no-fds", dest="fds", action="store_false", help="condition on the noisy maps")
    parser.add_argument("-o", "--output", help="write the PNG here")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the image (600)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the bare id(s)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                        help="a progress bar on stderr (default: when stderr is a terminal)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gesco", description="Send images through the gesco link and read the results.",
        epilog="Exit codes: 0 ok, 1 unexpected, 2 usage, 3 refused (400/413/422), 4 API key (401), "
               "5 busy (429), 6 unavailable (503, unreachable), 7 transmission failed or cancelled, "
               "8 timed out, 9 not found (404), 10 other server error.")
    parser.add_argument("--url", default=os.environ.get("GESCO_URL", DEFAULT_URL),
                        help=f"the sender's base URL (default: $GESCO_URL or {DEFAULT_URL})")
    parser.add_argument("--api-key", default=os.environ.get("GESCO_API_KEY"),
                        help="sent as X-API-Key (default: $GESCO_API_KEY)")
    parser.add_argument("--via", choices=sorted(TRANSPORTS), default="rest", help="protocol (default: rest)")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "sweep" and not args.output:
        build_parser().error("sweep needs -o/--output")
    client = TRANSPORTS[args.via](args.url, args.api_key)
    try:
        return args.run(client, args)
    except CliError as error:
        print(f"gesco: error: {error.message}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("gesco: interrupted", file=sys.stderr)
        return 130
    finally:
        client.close()
