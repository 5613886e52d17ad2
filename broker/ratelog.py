"""A log line that a peer can trigger at will, rate-limited: what junk on a socket costs in log
volume is bounded. At most ``burst`` lines per ``period`` seconds; past that they are counted,
and the count is logged when the next period starts (or with the next line that gets through)."""
from __future__ import annotations

import logging
import time
from typing import Callable


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, what: str, period: float = 10.0, burst: int = 5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.what, self.period, self.burst, self.clock = logger, what, period, burst, clock
        self.start = -float("inf")
        self.count = 0
        self.suppressed = 0

    def __call__(self, level: int, msg: str, *args) -> bool:
        """Log unless this period's burst is spent; True if it was logged."""
        now = self.clock()
        if now - self.start >= self.period:
            if self.suppressed:
                self.logger.log(level, "%d more %s in the last %.0f s (not logged one by one)",
                                self.suppressed, self.what, now - self.start)
            self.start, self.count, self.suppressed = now, 0, 0
        if self.count >= self.burst:
            self.suppressed += 1
            return False
        self.count += 1
        self.logger.log(level, msg, *args)
        return True
