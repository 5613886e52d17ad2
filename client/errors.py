"""The exceptions a client call raises. This module does no I/O.

Everything derives from ``ClientError``. A broker ``Error`` becomes ``RequestFailed`` (or a
subclass picked by its code) with the broker's code, message and retryable flag unchanged.
"""
from __future__ import annotations

from typing import Optional

from broker.protocol import Code


class ClientError(Exception):
    """Base class of every error raised by the client library."""


class RequestFailed(ClientError):
    """The request failed: the broker answered ``Error``, or its answer broke the protocol."""

    def __init__(self, code: str, message: str, retryable: bool = False,
                 request_id: Optional[str] = None) -> None:
        self.code = code
        self.message = message
        self.retryable = retryable
        self.request_id = request_id
        where = f"request {request_id} failed" if request_id else "request failed"
        super().__init__(f"{where}: {code}: {message}" + (" (retryable)" if retryable else ""))


class Overloaded(RequestFailed):
    """The broker's queue is full (code OVERLOADED); retry later."""


class InvalidRequest(RequestFailed):
    """Bad input (code INVALID_REQUEST), caught locally before sending or reported by the broker."""


class RequestTimeout(ClientError):
    """The call's timeout passed; the client has sent ``Cancel`` so the broker frees the request."""

    def __init__(self, message: str, request_id: Optional[str] = None) -> None:
        self.request_id = request_id
        super().__init__(message)


class BrokerUnavailable(ClientError):
    """The broker did not answer: a ping or a submitted request within the timeout, or nothing at
    all (not even a ``Pong``) within the client's liveness window while requests were in flight.
    Retryable: the broker may be back (a restart) by the time the caller tries again."""

    retryable = True

    def __init__(self, message: str, request_id: Optional[str] = None) -> None:
        self.request_id = request_id
        super().__init__(message)


_BY_CODE = {Code.OVERLOADED: Overloaded, Code.INVALID_REQUEST: InvalidRequest}


def failure(code: str, message: str, retryable: bool = False,
            request_id: Optional[str] = None) -> RequestFailed:
    """The exception for a broker error code: ``Overloaded``, ``InvalidRequest`` or ``RequestFailed``."""
    return _BY_CODE.get(code, RequestFailed)(code, message, retryable, request_id)
