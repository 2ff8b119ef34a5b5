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
    drain: bool = False,
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
    while drain and events:  # the sender stops: what is in flight is acknowledged (or lost)
        at, _, lost, p = heapq.heappop(events)
        if lost:
            cc.on_packets_lost(now=at, packets=[p])
        else:
            cc.on_rtt_measurement(now=at, rtt=at - (p.sent_time or 0.0))
            cc.on_packet_acked(now=at, packet=p)
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


def test_an_application_limited_connection_keeps_its_window() -> None:
    """Small sends long apart (a push now and then, pings) neither shrink the estimate nor
    start RTT probes that would drop the window to the minimum."""
    cc = RateCongestionControl(max_datagram_size=MSS)
    simulate(cc, seconds=5.0, drain=True)
    assert cc.bytes_in_flight == 0
    window = cc.congestion_window
    now, number = 100.0, 10_000_000
    for _ in range(20):  # one small packet every 20 s, acknowledged one round trip later
        p = packet(number, now)
        number += 1
        cc.on_packet_sent(packet=p)
        cc.on_rtt_measurement(now=now + 0.1, rtt=0.1)
        cc.on_packet_acked(now=now + 0.1, packet=p)
        now += 20.0
    assert cc.congestion_window >= 0.95 * window  # (the minimum RTT refreshed: 0.1 s)
    assert cc._probing_until is None


def test_an_idle_rtt_probe_takes_the_fresh_sample() -> None:
    cc = RateCongestionControl(max_datagram_size=MSS)
    simulate(cc, seconds=5.0, rtt=0.05, drain=True)
    assert cc.min_rtt is not None and cc.min_rtt < 0.06
    cc.on_rtt_measurement(now=1000.0, rtt=0.08)  # the path got longer while we were idle
    assert cc.min_rtt == 0.08 and cc._probing_until is None


def test_the_pacer_paces_on_the_models_round_trip_and_allows_an_initial_burst() -> None:
    """A connection whose smoothed RTT is stale (a busy moment long ago) still sends a small
    push at once: aioquic's pacer would space its packets by a quarter of that RTT."""
    cc = RateCongestionControl(max_datagram_size=MSS)
    cc.on_rtt_measurement(now=0.0, rtt=0.0004)  # loopback
    pacer = cc.make_pacer()
    pacer.update_rate(congestion_window=MIN_WINDOW_PACKETS * MSS, smoothed_rtt=0.2)
    now = 10.0
    sent = 0
    while pacer.next_send_time(now) is None and sent < 20:
        pacer.update_after_send(now)
        sent += 1
    assert sent >= 10  # the initial window leaves in one burst
    assert pacer.packet_time is not None and pacer.packet_time <= 0.001

    stock = recovery.QuicPacketPacer(max_datagram_size=MSS)
    stock.update_rate(congestion_window=MIN_WINDOW_PACKETS * MSS, smoothed_rtt=0.2)
    assert stock.packet_time is not None and stock.packet_time > 0.04  # what it replaced


def test_a_first_round_trip_measured_as_zero_paces_as_one_millisecond() -> None:
    """aioquic takes its first RTT sample unfloored and uvloop's clock ticks in milliseconds:
    a handshake on loopback can hand the pacer a smoothed RTT of 0.0 (it divided by it)."""
    cc = RateCongestionControl(max_datagram_size=MSS)
    cc.on_rtt_measurement(now=0.0, rtt=0.0)
    pacer = cc.make_pacer()
    pacer.update_rate(congestion_window=MIN_WINDOW_PACKETS * MSS, smoothed_rtt=0.0)
    floor = cc.make_pacer()
    floor.update_rate(congestion_window=MIN_WINDOW_PACKETS * MSS, smoothed_rtt=0.001)
    assert pacer.packet_time == floor.packet_time and pacer.bucket_max == floor.bucket_max


def test_connections_running_it_get_its_pacer() -> None:
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from margo_stream.transport.mtls_hook import use_own_pacer
    from margo_stream.transport.rate_cc import ModelPacer

    for algorithm, own in (("rate", True), ("cubic", False)):
        quic = QuicConnection(
            configuration=QuicConfiguration(is_client=True, congestion_control_algorithm=algorithm)
        )
        use_own_pacer(quic)
        assert isinstance(quic._loss._pacer, ModelPacer) is own
