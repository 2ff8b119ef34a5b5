"""The controller's end of the control stream, sans-IO, with explicit times."""

from __future__ import annotations

from margo_stream.protocol import messages as m
from margo_stream.protocol.control_server import (
    ControllerControl,
    HelloReceived,
    HelloTimedOut,
    IdentityMismatch,
    PeerError,
    SendPong,
    ServerControlState,
    StatsReported,
)


def hello(device: str = "press-01") -> m.Hello:
    return m.Hello(device_id=device, agent_version="1", capabilities=m.Capabilities(id=device))


def control(now: float = 100.0) -> ControllerControl:
    return ControllerControl("press-01", now=now, hello_timeout=10.0)


def test_the_hello_opens_the_session_and_settles_the_deadline() -> None:
    c = control()
    assert c.deadline == 110.0
    event = c.received(hello())
    assert isinstance(event, HelloReceived) and c.hello is event.hello
    assert c.state is ServerControlState.OPEN and c.deadline is None
    assert c.timer(500.0) is None


def test_no_hello_in_time_times_out_once() -> None:
    c = control()
    assert c.timer(109.9) is None
    event = c.timer(110.0)
    assert isinstance(event, HelloTimedOut) and "10 s" in event.reason
    assert c.timer(111.0) is None and c.state is ServerControlState.REFUSED
    assert c.received(hello()) is None  # too late: nothing opens


def test_a_hello_for_another_device_is_an_identity_mismatch() -> None:
    c = control()
    event = c.received(hello("press-02"))
    assert isinstance(event, IdentityMismatch)
    assert "'press-02'" in event.reason and "'press-01'" in event.reason
    assert c.hello is None and c.deadline is None
    assert c.received(m.Ping(n=1)) is None


def test_open_session_answers_pings_and_reports_stats_and_errors() -> None:
    c = control()
    c.received(hello())
    assert c.received(m.Ping(n=7)) == SendPong(m.Pong(n=7))
    assert c.received(m.Stats(values={"a": 1})) == StatsReported({"a": 1})
    assert c.received(m.Error(code=0x100, reason="x")) == PeerError(0x100, "x")
    assert c.received(hello()) is None  # a second hello changes nothing
    assert c.received(m.Pong(n=1)) is None


def test_nothing_but_a_hello_counts_before_the_hello() -> None:
    c = control()
    assert c.received(m.Ping(n=1)) is None
    assert c.state is ServerControlState.AWAITING_HELLO
