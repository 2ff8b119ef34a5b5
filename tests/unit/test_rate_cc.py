"""The rate-based congestion controller, driven sans-IO over a simulated bottleneck against
aioquic's own CUBIC: random loss must not collapse it, heavy loss and persistent congestion
must."""

from __future__ import annotations

import heapq
import random

from aioquic.quic import recovery  # noqa: F401 - registers aioquic's own "cubic" and "reno"
from aioquic.quic.congestion.base import QuicCongestionControl, create_congestion_control
from aioquic.quic.packet_builder import QuicSentPacket

from margo_stream.transport import congestion  # noqa: F401 - registers "rate"
from margo_stream.transport.rate_cc import MIN_WINDOW_PACKETS, RateCongestionControl

MSS = 1200


def packet(number: int, now: float) -> QuicSentPacket:
    return QuicSentPacket(
        epoch=3,  # type: ignore[arg-type]
        in_flight=True,
        is_ack_eliciting=True,
        is_crypto_packet=False,
        packet_number=number,
        packet_type=0,  # type: ignore[arg-type]
        sent_time=now,
        sent_bytes=MSS,
    )


def simulate(
    cc: QuicCongestionControl,
    *,
    rate: float = 1_000_000,  # the bottleneck, bytes per second
    rtt: float = 0.1,
    loss: float = 0.0,
    seconds: float = 20.0,
    seed: int = 1,
) -> float:
    """Run a bulk sender limited by ``cc`` over one bottleneck; returns delivered bytes/s.
    A lost packet is declared lost when the next one is acknowledged (reordering threshold
    aside, what aioquic does once three later packets are acknowledged)."""
    rng = random.Random(seed)
    now, free_at, number, delivered = 0.0, 0.0, 0, 0
    events: list[tuple[float, int, bool, QuicSentPacket]] = []
    pending_lost: list[QuicSentPacket] = []
    while now < seconds:
        while cc.bytes_in_flight + MSS <= cc.congestion_window:
            p = packet(number, now)
            number += 1
            cc.on_packet_sent(packet=p)
            free_at = max(free_at, now) + MSS / rate  # queued at the bottleneck
            heapq.heappush(events, (free_at + rtt, p.packet_number, rng.random() < loss, p))
        at, _, lost, p = heapq.heappop(events)
        now = at
        if lost:
            pending_lost.append(p)
            continue
        cc.on_rtt_measurement(now=now, rtt=now - (p.sent_time or 0.0))
        cc.on_packet_acked(now=now, packet=p)
        delivered += MSS
        if pending_lost:
            cc.on_packets_lost(now=now, packets=pending_lost)
            pending_lost = []
    return delivered / now


def test_without_loss_it_fills_the_bottleneck() -> None:
    got = simulate(RateCongestionControl(max_datagram_size=MSS))
    assert got > 0.9 * 1_000_000


def test_random_loss_does_not_collapse_it_as_it_collapses_cubic() -> None:
    rate_got = simulate(RateCongestionControl(max_datagram_size=MSS), loss=0.02)
    cubic_got = simulate(create_congestion_control("cubic", max_datagram_size=MSS), loss=0.02)
    assert rate_got > 0.85 * 1_000_000
    assert rate_got > 2 * cubic_got, (rate_got, cubic_got)


def test_the_window_stays_near_twice_the_path_not_unbounded() -> None:
    """Its own standing queue never raises its idea of the round trip (the RTT probes)."""
    cc = RateCongestionControl(max_datagram_size=MSS)
    got = simulate(cc, seconds=60.0)
    bdp = 1_000_000 * 0.1
    assert cc._min_rtt is not None and cc._min_rtt < 0.11
    assert cc.congestion_window <= 2.2 * bdp
    assert got > 0.9 * 1_000_000  # the probes cost little


def test_heavy_loss_cuts_the_bandwidth_estimate() -> None:
    cc = RateCongestionControl(max_datagram_size=MSS)
    simulate(cc, seconds=10.0)
    before = cc.congestion_window
    sent = [packet(n, 10.0) for n in range(100_000, 100_020)]
    for p in sent:
        cc.on_packet_sent(packet=p)
    cc.on_packets_lost(now=10.05, packets=sent[:10])  # half of a round lost
    assert cc.congestion_window < before


def test_persistent_congestion_starts_over_from_the_minimum() -> None:
    cc = RateCongestionControl(max_datagram_size=MSS)
    simulate(cc, seconds=5.0)
    cc.on_persistent_congestion()
    assert cc.congestion_window == MIN_WINDOW_PACKETS * MSS


def test_state_is_kept_only_for_packets_in_flight() -> None:
    cc = RateCongestionControl(max_datagram_size=MSS)
    simulate(cc, seconds=5.0, loss=0.05)
    in_flight = cc.bytes_in_flight // MSS
    assert len(cc._sent) <= in_flight + 1
