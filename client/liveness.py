"""The client's view of the broker's liveness: when to ping it and when to give it up.

Shared by ``Client`` and ``AsyncClient``; pure (no I/O, the time is handed in). Any message from
the broker counts as a sign of life. While requests are in flight, a client that has heard
nothing for ``window / 5`` seconds sends a ``Ping`` (again every ``window / 5`` seconds); after
``window`` seconds of silence the broker is lost and every request in flight fails with the
retryable ``BrokerUnavailable``, however long its own timeout (the Paranoid Pirate's liveness,
from the client's side: a SIGKILLed broker costs seconds, not the requests' timeouts).

A broker restarted within the window answers the pings, but it never heard of the requests in
flight: each broker start has its own instance id (in ``Accepted`` and ``Pong``), and a request
accepted by another instance than the one now answering fails the same way.
"""
from __future__ import annotations

import math

from broker.protocol import Code

from .errors import BrokerUnavailable, InvalidRequest

PINGS_PER_WINDOW = 5


def check_window(window: object) -> float:
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not math.isfinite(window) \
            or window <= 0:
        raise InvalidRequest(Code.INVALID_REQUEST, f"invalid liveness={window!r}: expected a number "
                                                   "of seconds > 0")
    return float(window)


class Liveness:
    def __init__(self, window: float, now: float) -> None:
        self.window = check_window(window)
        self.every = self.window / PINGS_PER_WINDOW
        self.heard = now                 # the last message from the broker (or the start of a wait)
        self.pinged = -math.inf

    def on_message(self, now: float) -> None:
        self.heard = now

    def start_waiting(self, now: float) -> None:
        """Requests went in flight after none were: silence before this point does not count."""
        self.heard = max(self.heard, now)

    def ping_due(self, now: float) -> bool:
        """Whether to ping now (then counted as sent)."""
        if now - self.heard >= self.every and now - self.pinged >= self.every:
            self.pinged = now
            return True
        return False

    def restarted(self, accepted_by: dict, instance: object) -> list:
        """The requests (ids, from ``accepted_by``: request id -> instance) that a broker answering
        as ``instance`` cannot have: they were accepted by another broker process."""
        if not isinstance(instance, str) or not instance:
            return []
        return [rid for rid, by in accepted_by.items() if by and by != instance]

    def restart_error(self, address: str, request_id: str) -> BrokerUnavailable:
        return BrokerUnavailable(f"the broker at {address} restarted and lost request {request_id}; "
                                 "retry it", request_id)

    def lost(self, now: float) -> bool:
        return now - self.heard >= self.window

    def next_check(self, now: float) -> float:
        """Seconds until ``ping_due`` or ``lost`` may turn true."""
        due = min(max(self.heard, self.pinged) + self.every, self.heard + self.window)
        return max(0.001, due - now)

    def error(self, address: str, request_id: str) -> BrokerUnavailable:
        return BrokerUnavailable(f"the broker at {address} stopped answering: nothing heard for "
                                 f"{self.window:g} s (the client's liveness window) while request "
                                 f"{request_id} was in flight; retry it", request_id)
