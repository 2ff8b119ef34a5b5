"""Reconnect delays: capped exponential backoff with full jitter.

Full jitter (a uniform draw between zero and the capped exponential) spreads a fleet that lost
its controller at the same instant over the whole window, so a restarted controller sees a
steady trickle of handshakes instead of a synchronized storm.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    base: float = 0.5
    cap: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2 ** min(self.attempt, 32)))
        self.attempt += 1
        return self.rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        self.attempt = 0
