"""The OTLP export's port: ``offer`` takes stored records without waiting, within a bounded
queue whose overflow is counted (nothing is exported here: the thread is never started);
record bodies and the resource of each device."""

from __future__ import annotations

import time
from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from controller import otlp_export
from controller.otlp_export import OtlpExport, decode_body


def test_offer_is_bounded_and_never_waits(monkeypatch):
    monkeypatch.setattr(otlp_export, "MAX_QUEUED", 5000)
    metrics = SimpleNamespace(prom=CollectorRegistry(), otlp_dropped=lambda: 0)
    export = OtlpExport("http://127.0.0.1:9", "ctl-1", metrics)  # type: ignore[arg-type]
    try:
        batch = [(i, "s", b'{"v": 1}') for i in range(1000)]
        started = time.perf_counter()
        for _ in range(10):
            export.offer("acme", "d1", batch)
        assert time.perf_counter() - started < 0.05
        assert export.dropped == 5000 and metrics.otlp_dropped() == 5000
        taken = export._take()
        assert taken is not None and len(taken) == otlp_export.BATCH
        assert taken[0] == ("acme", "d1", (0, "s", b'{"v": 1}'))
        record = export._record(*taken[0])
        assert record.resource.attributes["margo.tenant"] == "acme"
        assert record.resource.attributes["device.id"] == "d1"
        assert dict(record.log_record.attributes or {}) == {"margo.stream": "s", "margo.seq": 0}
        assert record.log_record.body == {"v": 1}
    finally:
        export.close()


def test_decode_body():
    import msgpack

    assert decode_body(b'{"a": 1}') == {"a": 1}
    assert decode_body(b"3.5") == 3.5
    assert decode_body(msgpack.packb({"b": [1, 2]})) == {"b": [1, 2]}
    assert decode_body(b"\xc1\xff") == b"\xc1\xff"
