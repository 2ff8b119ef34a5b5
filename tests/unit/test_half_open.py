"""The half-open policy: each mode's answer, the caps, and the bookkeeping behind them."""

from __future__ import annotations

import pytest

from margo_stream.transport.half_open import Decision, HalfOpenPolicy, RetryMode

A, B = "192.0.2.1", "192.0.2.2"


def fill(policy: HalfOpenPolicy, address: str, count: int, *, validated: bool = False) -> None:
    for _ in range(count):
        policy.opened(address, validated)


def test_always_retries_every_unproven_initial_and_accepts_proven_ones() -> None:
    p = HalfOpenPolicy(RetryMode.ALWAYS, max_half_open=8, max_half_open_per_address=2)
    assert p.decide(A, False, 0.0) is Decision.RETRY  # nothing half-open, still a Retry
    assert p.decide(A, True, 0.0) is Decision.ACCEPT
    fill(p, A, 5, validated=True)  # a validated client is not held to the per-address cap
    assert p.decide(A, True, 0.0) is Decision.ACCEPT
    fill(p, A, 3, validated=True)
    assert p.total == 8
    assert p.decide(A, True, 0.0) is Decision.DROP  # the total holds for everyone
    assert p.decide(B, False, 0.0) is Decision.DROP


def test_never_accepts_up_to_the_caps_and_drops_beyond() -> None:
    p = HalfOpenPolicy(RetryMode.NEVER, max_half_open=5, max_half_open_per_address=3)
    fill(p, A, 3)
    assert p.decide(A, False, 0.0) is Decision.DROP  # A is at its cap
    assert p.decide(B, False, 0.0) is Decision.ACCEPT
    fill(p, B, 2)
    assert p.decide(B, False, 0.0) is Decision.DROP  # the total
    p.closed(A, False)
    assert p.decide(A, False, 0.0) is Decision.ACCEPT
    assert p.unvalidated(A) == 2


def test_auto_retries_from_the_threshold_and_holds_for_a_while() -> None:
    p = HalfOpenPolicy(RetryMode.AUTO, max_half_open=64, max_half_open_per_address=64, hold=10)
    assert p.retry_threshold == 4  # 64 // 16
    for address in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"):
        assert p.decide(address, False, 1.0) is Decision.ACCEPT
        p.opened(address, False)
    assert p.decide(B, False, 1.0) is Decision.RETRY  # at the threshold: under load
    assert p.decide(B, True, 1.0) is Decision.ACCEPT  # a proven address still gets in
    for address in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"):
        p.closed(address, False)
    assert p.total == 0
    assert p.decide(B, False, 10.9) is Decision.RETRY  # load seen 9.9 s ago: still retrying
    assert p.decide(B, False, 11.0) is Decision.ACCEPT  # 10 s of quiet


def test_auto_retries_a_source_over_its_own_cap_while_others_get_in() -> None:
    p = HalfOpenPolicy(RetryMode.AUTO, max_half_open=1000, max_half_open_per_address=3)
    fill(p, A, 3)
    assert p.decide(A, False, 0.0) is Decision.RETRY
    assert p.decide(B, False, 0.0) is Decision.ACCEPT


def test_unproven_handshakes_never_fill_the_total_under_auto() -> None:
    """A flood from many addresses: the unproven ones stop at the threshold, the rest of the
    total stays for clients that answer a Retry."""
    p = HalfOpenPolicy(RetryMode.AUTO, max_half_open=160, max_half_open_per_address=256)
    for i in range(10_000):
        address = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        if p.decide(address, False, 0.0) is Decision.ACCEPT:
            p.opened(address, False)
    assert p.total == p.retry_threshold == 10
    assert p.decide(B, True, 0.0) is Decision.ACCEPT


def test_bookkeeping_forgets_addresses_with_nothing_half_open() -> None:
    p = HalfOpenPolicy(RetryMode.NEVER)
    fill(p, A, 2)
    p.opened(B, True)
    p.closed(A, False)
    p.closed(A, False)
    p.closed(B, True)
    assert p.total == 0 and p.unvalidated(A) == 0 and not p._unvalidated


def test_modes_parse_from_their_flag_values_and_bad_settings_are_refused() -> None:
    assert HalfOpenPolicy("never").mode is RetryMode.NEVER  # type: ignore[arg-type]
    assert HalfOpenPolicy(retry_threshold=7).retry_threshold == 7
    assert HalfOpenPolicy(max_half_open=3).retry_threshold == 1
    with pytest.raises(ValueError):
        HalfOpenPolicy("sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 1"):
        HalfOpenPolicy(max_half_open=0)
    with pytest.raises(ValueError, match=">= 0"):
        HalfOpenPolicy(hold=-1)
