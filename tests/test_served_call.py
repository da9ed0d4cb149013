"""served_call: a request the client got wrong is INVALID_ARGUMENT; any other exception is the
server's bug, INTERNAL, logged with its traceback, whatever its type (a ValueError included)."""
from __future__ import annotations

import logging

import grpc
import pytest

from shared.limits import InvalidRequestError, LimitError, SamplingOptions
from shared.wire import transport
from shared.wire.grpc_service import CallRejected, served_call


class Aborted(Exception):
    pass


class FakeContext:
    """What served_call uses of a grpc.ServicerContext; abort raises, as gRPC's does."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: tuple = ()

    def invocation_metadata(self):
        return ()

    def set_trailing_metadata(self, trailing) -> None:
        self.trailing = trailing

    def abort(self, code: grpc.StatusCode, details: str):
        self.code, self.details = code, details
        raise Aborted(details)


def serve(error: Exception, caplog) -> FakeContext:
    context = FakeContext()
    with caplog.at_level(logging.INFO, logger="test.served_call"), pytest.raises(Aborted):
        with served_call(context, logging.getLogger("test.served_call"), "transmit", "the test server"):
            raise error
    return context


def _bad_sampling() -> None:
    SamplingOptions(guidance=-1.0)


@pytest.mark.parametrize("make_error", [
    lambda: InvalidRequestError("semantic.num_classes must be in 1..1024, got 0"),
    lambda: LimitError("steps", "must be in 1..1000, got 5000"),
])
def test_a_validation_error_is_invalid_argument(make_error, caplog) -> None:
    error = make_error()
    context = serve(error, caplog)
    assert context.code is grpc.StatusCode.INVALID_ARGUMENT and context.details == str(error)
    assert not [r for r in caplog.records if r.exc_info]


def test_the_wire_formats_and_the_limits_refusals_are_validation_errors() -> None:
    with pytest.raises(InvalidRequestError, match="transmission_id"):
        transport.validate_transmission_id("../etc")
    with pytest.raises(InvalidRequestError, match="guidance"):
        _bad_sampling()


@pytest.mark.parametrize("error", [ValueError("math domain error"), KeyError("sampler"), ZeroDivisionError()])
def test_any_other_exception_is_internal_and_logged_with_its_traceback(error, caplog) -> None:
    context = serve(error, caplog)
    assert context.code is grpc.StatusCode.INTERNAL and context.details == "internal error in the test server"
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and logged[0].exc_info[1] is error


def test_a_rejected_call_keeps_its_code_and_retry_after(caplog) -> None:
    context = serve(CallRejected(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", retry_after_s=3), caplog)
    assert context.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert context.trailing == (("retry-after", "3"),)
