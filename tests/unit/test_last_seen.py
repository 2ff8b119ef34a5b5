"""The last-seen batches (controller.registry.last_seen_changes): only the sessions that received
something since their time was last stored are handed to the store; a batch the store refused
is handed over again."""

from __future__ import annotations

from dataclasses import dataclass, field

from controller.registry import SessionRegistry, SessionView


@dataclass
class FakeConn:
    last_received: float = 0.0  # the loop clock


@dataclass
class FakeHandle:
    conn: FakeConn = field(default_factory=FakeConn)


def _registry(n: int) -> tuple[SessionRegistry, list[FakeHandle]]:
    registry = SessionRegistry()
    handles = [FakeHandle(FakeConn(10.0)) for _ in range(n)]
    for i, handle in enumerate(handles):
        registry.register(
            SessionView(
                tenant="acme",
                device_id=f"d{i}",
                remote="127.0.0.1:1",
                connected_since=1000.0,
                last_seen=1000.0,
                handle=handle,  # type: ignore[arg-type]
            )
        )
    return registry, handles


def test_only_sessions_that_received_since_the_last_batch_are_in_it():
    registry, handles = _registry(4)
    first = registry.last_seen_changes(now_wall=1100.0, now_loop=20.0)
    assert sorted(v.device_id for v in first) == ["d0", "d1", "d2", "d3"]
    assert {v.last_seen for v in first} == {1090.0}  # 10 s before now, on the wall clock
    assert registry.last_seen_changes(now_wall=1105.0, now_loop=25.0) == []
    handles[2].conn.last_received = 24.0
    again = registry.last_seen_changes(now_wall=1110.0, now_loop=30.0)
    assert [(v.device_id, v.last_seen) for v in again] == [("d2", 1104.0)]
    assert registry.get("acme", "d0").last_seen == 1090.0  # untouched


def test_a_refused_batch_is_handed_over_again():
    registry, handles = _registry(2)
    batch = registry.last_seen_changes(now_wall=1100.0, now_loop=20.0)
    registry.last_seen_unstored(batch)
    retry = registry.last_seen_changes(now_wall=1105.0, now_loop=25.0)
    assert sorted(v.device_id for v in retry) == ["d0", "d1"]
    assert {v.last_seen for v in retry} == {1090.0}


def test_a_session_without_a_handle_is_skipped():
    registry, _ = _registry(1)
    registry.get("acme", "d0").handle = None
    assert registry.last_seen_changes(now_wall=1100.0, now_loop=20.0) == []
