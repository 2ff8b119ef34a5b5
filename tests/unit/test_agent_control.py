"""The agent's control-stream core: the hello's answer, then pings, errors and the end."""

from __future__ import annotations

import pytest

from margo_stream.errors import LocalProtocolError
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode
from margo_stream.protocol.control import (
    AgentControl,
    ControlEnded,
    ControlState,
    HelloAccepted,
    HelloRefused,
    PeerError,
    SendPong,
)


def ack(keepalive_s: float = 15.0) -> m.HelloAck:
    return m.HelloAck(tenant="acme", device_id="d1", server_time=1.0, keepalive_s=keepalive_s)


def test_an_ack_opens_the_session_with_the_controllers_keepalive() -> None:
    c = AgentControl()
    reply = ack(15.0)
    assert c.hello_answer(reply) == HelloAccepted(reply, 15.0)
    assert c.state is ControlState.OPEN and c.ack is reply


def test_the_agents_own_keepalive_wins() -> None:
    assert AgentControl(keepalive_s=0.5).hello_answer(ack(15.0)).keepalive_s == 0.5


def test_an_error_answer_refuses_with_its_code() -> None:
    c = AgentControl()
    with pytest.raises(HelloRefused) as info:
        c.hello_answer(m.Error(code=ErrorCode.IDENTITY_REFUSED, reason="not on the list"))
    assert info.value.code == ErrorCode.IDENTITY_REFUSED
    assert "not on the list" in str(info.value)
    assert c.state is ControlState.REFUSED
    with pytest.raises(LocalProtocolError):
        c.hello_answer(ack())


@pytest.mark.parametrize("reply", [m.Ping(n=1), None])
def test_anything_else_is_an_unexpected_answer(reply: object) -> None:
    with pytest.raises(HelloRefused) as info:
        AgentControl().hello_answer(reply)
    assert info.value.code == ErrorCode.UNEXPECTED_MESSAGE


def test_messages_once_open() -> None:
    c = AgentControl()
    c.hello_answer(ack())
    assert c.received(m.Ping(n=7)) == SendPong(m.Pong(n=7))
    assert c.received(m.Error(code=1, reason="x")) == PeerError(1, "x")
    assert c.received(m.Pong(n=3)) is None
    assert c.state is ControlState.OPEN
    assert c.received(None) == ControlEnded()
    assert c.state is ControlState.ENDED
    with pytest.raises(LocalProtocolError):
        c.received(m.Ping(n=8))


def test_no_message_before_the_answer() -> None:
    with pytest.raises(LocalProtocolError):
        AgentControl().received(m.Ping(n=1))
