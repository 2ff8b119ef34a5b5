"""The carrier policy (agent.carrier_policy), sans-IO, with explicit clocks: QUIC first, TCP
when no QUIC handshake comes within the timeout, the fallback held (no QUIC wait on reconnect or
restart) for the retry period only when TCP worked, probes while on TCP, and the move back."""

from __future__ import annotations

import pytest

from agent.carrier_policy import Carrier, CarrierPolicy, DialQuic, DialTcp, Remembered

T0 = 1_700_000_000.0


def policy(**kw: object) -> CarrierPolicy:
    return CarrierPolicy(5.0, 300.0, now=kw.pop("now", T0), **kw)  # type: ignore[arg-type]


def fall_back(p: CarrierPolicy, now: float) -> None:
    """QUIC times out at ``now``, TCP gets through."""
    assert isinstance(p.first(now), DialQuic)
    assert isinstance(p.quic_failed(now + 5, "no answer within 5 s"), DialTcp)
    p.connected(Carrier.TCP, now + 5.1)


def test_quic_first_with_its_timeout() -> None:
    p = policy()
    dial = p.first(T0)
    assert dial == DialQuic(5.0, "QUIC first")
    assert p.probe_at() is None
    p.connected(Carrier.QUIC, T0 + 0.1)
    assert p.probe_at() is None  # nothing to probe on QUIC
    assert p.remembered() == Remembered(Carrier.QUIC)


def test_no_quic_handshake_falls_back_and_holds_for_the_retry_period() -> None:
    p = policy()
    fall_back(p, T0)
    assert p.current is Carrier.TCP
    assert p.probe_at() == T0 + 5 + 300
    assert p.remembered() == Remembered(Carrier.TCP, T0 + 5)
    p.disconnected()
    # a reconnect inside the period goes straight to TCP: no 5 s QUIC wait each time
    dial = p.first(T0 + 60)
    assert isinstance(dial, DialTcp) and "QUIC is tried again in 245 s" in dial.reason
    p.connected(Carrier.TCP, T0 + 60.1)
    assert p.probe_at() == T0 + 305  # the schedule is not pushed back by reconnects
    p.disconnected()
    # after it, QUIC first again
    assert p.first(T0 + 306) == DialQuic(5.0, "QUIC retry period over")


def test_a_controller_down_on_both_carriers_is_not_a_udp_block() -> None:
    p = policy()
    assert isinstance(p.first(T0), DialQuic)
    p.quic_failed(T0 + 5, "no answer")
    p.disconnected()  # TCP failed too
    assert isinstance(p.first(T0 + 6), DialQuic)  # no hold: QUIC first next time
    assert p.remembered() == Remembered(Carrier.QUIC)


def test_probes_while_on_tcp_and_the_move_back() -> None:
    p = policy()
    fall_back(p, T0)
    due = p.probe_at()
    assert due == T0 + 305
    p.probe_failed(due + 5)  # UDP still blocked
    assert p.probe_at() == T0 + 310 + 300
    assert p.current is Carrier.TCP
    p.probe_succeeded(T0 + 615)
    assert p.probe_at() is None
    assert not p.holding(T0 + 615)
    p.disconnected()  # the driver ends the TCP session ...
    p.connected(Carrier.QUIC, T0 + 615.2)  # ... and runs the next one on the probe's connection
    assert p.remembered() == Remembered(Carrier.QUIC)
    assert isinstance(p.first(T0 + 700), DialQuic)


def test_a_restart_remembers_the_fallback_for_the_retry_period_only() -> None:
    p = policy()
    fall_back(p, T0)
    memory = Remembered.from_json(p.remembered().to_json())
    assert memory == Remembered(Carrier.TCP, T0 + 5)
    restarted = policy(now=T0 + 100, remembered=memory)
    assert isinstance(restarted.first(T0 + 100), DialTcp)
    restarted.connected(Carrier.TCP, T0 + 100.1)
    assert restarted.probe_at() == T0 + 305
    # too old, or from the future (a clock stepped back): QUIC first
    for now in (T0 + 306, T0 - 10):
        assert isinstance(policy(now=now, remembered=memory).first(now), DialQuic)
    assert isinstance(policy(remembered=Remembered(Carrier.QUIC)).first(T0), DialQuic)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"carrier": "sctp"}',
        b'{"carrier": "tcp", "quic_failed_at": "yesterday"}',
        b'{"carrier": "tcp", "quic_failed_at": 1, "pad": "' + b"x" * 5000 + b'"}',
    ],
)
def test_a_damaged_memory_is_ignored(data: bytes) -> None:
    assert Remembered.from_json(data) is None


def test_tcp_without_a_recorded_failure_still_probes() -> None:
    p = policy()
    p.connected(Carrier.TCP, T0)  # e.g. a memory of TCP whose timestamp was dropped
    assert p.probe_at() == T0 + 300


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        CarrierPolicy(0, 300, now=T0)
