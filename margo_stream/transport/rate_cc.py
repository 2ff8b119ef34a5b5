"""A rate-based congestion controller for lossy links ("rate": BBR's model, simplified).

Loss-based controllers (NewReno, CUBIC) read every lost packet as congestion and shrink their
window. On the links our devices live on (cellular, Wi-Fi at the edge of a plant, long
industrial radio hops) packets are lost at random, not because a queue overflowed: at 2 % loss
and 100 ms round trips aioquic's CUBIC moved 1.1 Mbit/s where the kernel's TCP moved 6-9 on the
same emulated link (bench/RESULTS.md, "networks"). This controller models the path instead,
as BBR does:

- **Bottleneck bandwidth**: every acknowledged packet gives a delivery-rate sample, the bytes
  delivered between the packet's sending and its acknowledgement over that time; the estimate
  is the largest sample of the last ``BW_WINDOW_RTTS`` round trips (at least ``BW_WINDOW_MIN``
  seconds), so one slow round does not pull it down.
- **Minimum round trip**: the smallest RTT sample since the last RTT probe. Every
  ``PROBE_RTT_EVERY`` seconds the window drops to ``MIN_WINDOW_PACKETS`` for ``PROBE_RTT_TIME``
  (BBR's PROBE_RTT), the queue the controller itself built drains, and the smallest sample of
  that probe becomes the new minimum: without it, a standing queue would raise the minimum,
  the window with it, and the queue again.
- **Window**: ``CWND_GAIN`` times the bandwidth-delay product (at least ``MIN_WINDOW_PACKETS``).
  aioquic paces at window / smoothed RTT, so the path is offered about twice what it was seen
  to deliver: enough to find more bandwidth when there is some, bounded so the queue it builds
  is at most about one round trip.
- **Start-up**: like slow start, the window grows by every acknowledged byte until the
  bandwidth estimate stops growing by a quarter over ``FULL_PIPE_ROUNDS`` round trips.
- **Application-limited**: a packet sent while less than half the window was in flight (a
  small push, a status, a ping) says how fast we had something to send, not how fast the path
  is: its delivery-rate sample may raise the estimate but never lowers it, a round of such
  packets does not end start-up, and an RTT probe falling due while there is no queue of ours
  to drain just takes the fresh sample as the minimum (BBR's rules for idle and app-limited
  flows). Without this an idle device's connection shrank to the minimum window.
- **Pacing** (:class:`ModelPacer`, put in place of aioquic's by ``mtls_hook.use_own_pacer``): aioquic
  paces at window / *smoothed* RTT, and the smoothed RTT of a connection that is mostly idle is
  whatever a busy moment left in it (a controller answering 1,000 handshakes at once: 100 ms
  and more, decaying by an eighth per ping): a push's third packet then waited 20-40 ms on a
  loopback link. Ours paces at window / the model's *minimum* RTT (the window is twice the
  bandwidth-delay product, so that is twice the bandwidth estimate, BBR's start-up gain) and
  lets a burst of up to the initial window leave at once after idle (RFC 9002, 7.7).
- **Loss**: a lost packet is not a signal by itself. When more than ``HEAVY_LOSS`` of what was
  sent in the last round trip is lost (a policer, a queue really overflowing), the bandwidth
  estimate is cut to what the last round delivered; persistent congestion (RFC 9002 7.6)
  starts over from the minimum window.

The controller is sans-IO like the rest of aioquic's recovery: it is told of packets sent,
acknowledged, lost and of RTT samples, with the time, and keeps per-packet state only for
packets in flight. ``--congestion-control rate`` on either end selects it for what that end
sends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aioquic.quic.congestion.base import (
    K_INITIAL_WINDOW,
    QuicCongestionControl,
    register_congestion_control,
)
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.quic.recovery import QuicPacketPacer

NAME = "rate"
CWND_GAIN = 2.0
STARTUP_GAIN = 2.89  # 2 / ln 2: doubles the delivery rate every round in start-up
MIN_WINDOW_PACKETS = 4
BW_WINDOW_RTTS = 10
BW_WINDOW_MIN = 1.0  # seconds
PROBE_RTT_EVERY = 10.0  # seconds
PROBE_RTT_TIME = 0.2  # seconds
FULL_PIPE_ROUNDS = 3
FULL_PIPE_GROWTH = 1.25
HEAVY_LOSS = 0.2  # share of a round trip's packets lost that counts as congestion
MAX_TRACKED = 100_000  # packets in flight we keep sending-time state for (bounded)
APP_LIMITED_SHARE = 0.5  # sent with less than this share of the window in flight
MIN_PACING_RTT = 0.001  # seconds: the pacing rate never assumes a shorter round trip


@dataclass(slots=True)
class _SendState:
    delivered: int  # bytes delivered when the packet was sent
    delivered_time: float  # when that count was last raised
    app_limited: bool  # sent with little in flight: its sample may not lower the estimate


class RateCongestionControl(QuicCongestionControl):
    """See the module note."""

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._mss = max_datagram_size
        self._delivered = 0
        self._delivered_time = 0.0
        self._sent: dict[int, _SendState] = {}
        self._bw_samples: deque[tuple[float, float]] = deque()  # (time, bytes per second)
        self._min_rtt: float | None = None
        self._probe_rtt_at: float | None = None  # the next RTT probe (set by the first sample)
        self._probing_until: float | None = None  # while an RTT probe lasts
        self._probe_min = 0.0  # the smallest sample of the probe under way
        self._bw = 0.0
        self._startup = True
        self._full_bw = 0.0
        self._full_bw_rounds = 0
        self._round_end = 0.0  # a round ends when a packet sent after this time is acked
        self._round_sent = 0  # bytes sent and lost in the current round
        self._round_lost = 0
        self.congestion_window = K_INITIAL_WINDOW * max_datagram_size

    # --- aioquic's interface -----------------------------------------------------------------
    def on_packet_sent(self, *, packet: QuicSentPacket) -> None:
        self.bytes_in_flight += packet.sent_bytes
        self._round_sent += packet.sent_bytes
        if len(self._sent) < MAX_TRACKED:
            if self._delivered_time == 0.0 and packet.sent_time is not None:
                self._delivered_time = packet.sent_time
            app_limited = self.bytes_in_flight < APP_LIMITED_SHARE * self.congestion_window
            self._sent[id(packet)] = _SendState(self._delivered, self._delivered_time, app_limited)

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        self.bytes_in_flight -= packet.sent_bytes
        self._delivered += packet.sent_bytes
        self._delivered_time = now
        state = self._sent.pop(id(packet), None)
        if state is not None and now > state.delivered_time:
            rate = (self._delivered - state.delivered) / (now - state.delivered_time)
            if not state.app_limited or rate > self._bw:
                self._add_bandwidth(now, rate)
        if packet.sent_time is not None and packet.sent_time >= self._round_end:  # a round trip
            self._new_round(now, app_limited=state is not None and state.app_limited)
        if self._startup:
            self.congestion_window += packet.sent_bytes  # slow start, until the pipe is full
        self._set_window()

    def on_packets_expired(self, *, packets: Iterable[QuicSentPacket]) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            self._sent.pop(id(packet), None)

    def on_packets_lost(self, *, now: float, packets: Iterable[QuicSentPacket]) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            self._round_lost += packet.sent_bytes
            self._sent.pop(id(packet), None)
        if self._round_sent and self._round_lost > HEAVY_LOSS * self._round_sent:
            # more lost than random loss explains: believe the path delivers less
            self._bw = max(self._bw * (1 - HEAVY_LOSS), MIN_WINDOW_PACKETS * self._mss)
            self._bw_samples.clear()
            self._bw_samples.append((now, self._bw))
            self._startup = False
            self._round_sent = self._round_lost = 0
            self._set_window()

    def on_persistent_congestion(self) -> None:
        self._bw_samples.clear()
        self._bw = 0.0
        self._startup = False
        self.congestion_window = MIN_WINDOW_PACKETS * self._mss

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        if self._probing_until is not None:
            self._probe_min = min(self._probe_min, rtt)
            if now >= self._probing_until:  # the probe is over: its minimum is the path's
                self._min_rtt = self._probe_min
                self._probing_until = None
                self._probe_rtt_at = now + PROBE_RTT_EVERY
                self._set_window()
            return
        if self._min_rtt is None or rtt < self._min_rtt:
            self._min_rtt = rtt
        if self._probe_rtt_at is None:
            self._probe_rtt_at = now + PROBE_RTT_EVERY
        elif now >= self._probe_rtt_at and self.bytes_in_flight < MIN_WINDOW_PACKETS * self._mss:
            # nothing of ours queued (an idle or application-limited connection): this sample
            # is the path's round trip, as the probe would have measured it
            self._min_rtt = rtt
            self._probe_rtt_at = now + PROBE_RTT_EVERY
        elif now >= self._probe_rtt_at and not self._startup:
            self._probing_until = now + max(PROBE_RTT_TIME, self._min_rtt)
            self._probe_min = rtt
            self.congestion_window = MIN_WINDOW_PACKETS * self._mss

    def make_pacer(self) -> ModelPacer:
        """The pacer connections running this controller use (``mtls_hook.use_own_pacer``)."""
        return ModelPacer(self, max_datagram_size=self._mss)

    @property
    def min_rtt(self) -> float | None:
        """The path's round trip as the model knows it (None before the first sample)."""
        return self._min_rtt

    def get_log_data(self) -> dict[str, Any]:
        data = super().get_log_data()
        data.update(
            bandwidth=int(self._bw),
            min_rtt=self._min_rtt,
            startup=self._startup,
            probing_rtt=self._probing_until is not None,
        )
        return data

    # --- the model ---------------------------------------------------------------------------
    def _add_bandwidth(self, now: float, rate: float) -> None:
        samples = self._bw_samples
        while samples and samples[-1][1] <= rate:
            samples.pop()  # a monotonic deque: the front is the window's maximum
        samples.append((now, rate))
        window = max(BW_WINDOW_MIN, BW_WINDOW_RTTS * (self._min_rtt or 0.0))
        while samples[0][0] < now - window:
            samples.popleft()
        self._bw = samples[0][1]

    def _new_round(self, now: float, *, app_limited: bool = False) -> None:
        self._round_end = now
        self._round_sent = self._round_lost = 0
        if not self._startup or app_limited:  # a round we did not fill says nothing of the pipe
            return
        if self._bw >= self._full_bw * FULL_PIPE_GROWTH:
            self._full_bw = self._bw
            self._full_bw_rounds = 0
        else:
            self._full_bw_rounds += 1
            if self._full_bw_rounds >= FULL_PIPE_ROUNDS:
                self._startup = False

    def _set_window(self) -> None:
        if self._min_rtt is None or self._bw <= 0 or self._probing_until is not None:
            return
        gain = STARTUP_GAIN if self._startup else CWND_GAIN
        model = int(gain * self._bw * self._min_rtt)
        floor = MIN_WINDOW_PACKETS * self._mss
        if self._startup:
            self.congestion_window = max(self.congestion_window, model, floor)
        else:
            self.congestion_window = max(model, floor)


class ModelPacer(QuicPacketPacer):
    """aioquic's token bucket, fed the model's round trip instead of the smoothed one, with
    room for a burst of the initial window (see the module note)."""

    def __init__(self, cc: RateCongestionControl, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._cc = cc
        self._mss = max_datagram_size

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        rtt = self._cc.min_rtt
        rtt = smoothed_rtt if rtt is None else min(smoothed_rtt, max(rtt, MIN_PACING_RTT))
        # aioquic takes its first RTT sample unfloored, and uvloop's clock ticks in whole
        # milliseconds: a loopback handshake can measure 0.0
        rtt = max(rtt, MIN_PACING_RTT)
        super().update_rate(congestion_window=congestion_window, smoothed_rtt=rtt)
        rate = congestion_window / rtt
        self.bucket_max = max(self.bucket_max, K_INITIAL_WINDOW * self._mss / rate)


register_congestion_control(NAME, RateCongestionControl)
