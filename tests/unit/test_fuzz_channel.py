"""Fuzzing of the frame decoder and ``ChannelCore`` in the suite (bounded: a few seconds).

Arbitrary bytes, split at arbitrary points, on arbitrary stream ids, interleaved with ends and
resets from either side: only the documented exception (``RemoteProtocolError`` from the
decoder, ``LocalProtocolError`` from our own sends) and the documented events come out, and the
core stays within its bounds after every step (``bench.fuzz_channel.run_session`` checks each
one). The long run (a million inputs) is ``margo-bench fuzz``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz_channel import exception_objects, fuzz, run_session, sample_messages, seeds
from margo_stream.errors import RemoteProtocolError
from margo_stream.protocol.channel import ChannelCore
from margo_stream.protocol.codes import ErrorCode, Sender
from margo_stream.protocol.frames import HEADER_SIZE, FrameDecoder

SEEDS = seeds()
WIRES = [s.wire for s in SEEDS]
MESSAGES = sample_messages()
FUZZ = settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    """Valid streams, cut, spliced and corrupted by hypothesis, or plain noise."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=600))
    wire = draw(st.sampled_from(WIRES))
    start = draw(st.integers(0, len(wire)))
    end = draw(st.integers(start, len(wire)))
    piece = bytearray(wire[start:end] if draw(st.booleans()) else wire)
    for _ in range(draw(st.integers(0, 3))):
        if not piece:
            break
        i = draw(st.integers(0, len(piece) - 1))
        piece[i] = draw(st.integers(0, 255))
    return draw(st.binary(max_size=8)) + bytes(piece) + draw(st.binary(max_size=8))


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@FUZZ
@given(
    data=hostile_bytes(),
    cuts=st.lists(st.integers(0, 700), max_size=6),
    limit=st.sampled_from([64, 512, 1 << 20]),
)
def test_decoder_raises_only_its_error_and_holds_at_most_a_frame(data, cuts, limit):
    decoder = FrameDecoder(limit)
    try:
        for chunk in splits(data, cuts):
            decoder.feed(chunk)
            assert decoder.buffered < HEADER_SIZE + limit
        decoder.finish()
    except RemoteProtocolError as exc:
        assert exc.code in (
            ErrorCode.FRAME_TOO_LARGE,
            ErrorCode.MALFORMED_FRAME,
            ErrorCode.TRUNCATED_STREAM,
        )
        assert decoder.failed and decoder.buffered == 0
        for again in (lambda: decoder.feed(b"x"), decoder.finish):  # sticky
            try:
                again()
            except RemoteProtocolError as sticky:
                assert sticky.code == exc.code
            else:
                raise AssertionError("a failed decoder accepted more") from None
    assert exception_objects(decoder) == []


stream_ids = st.integers(0, 11)
codes = st.sampled_from([0, *map(int, ErrorCode), 2**62 - 1])
operations = st.one_of(
    st.tuples(st.just("recv"), stream_ids, hostile_bytes(), st.booleans()),
    st.tuples(st.just("recv"), stream_ids, hostile_bytes(), st.booleans()),
    st.tuples(st.just("recv"), stream_ids, hostile_bytes(), st.booleans()),
    st.tuples(st.just("reset"), stream_ids, codes),
    st.tuples(st.just("fail"), stream_ids, codes),
    st.tuples(st.just("end"), stream_ids),
    st.tuples(st.just("forget"), stream_ids),
    st.tuples(st.just("send"), stream_ids, st.sampled_from(MESSAGES)),
)
bounds = st.one_of(
    st.just({}),
    st.fixed_dictionaries(
        {
            "max_frame": st.sampled_from([64, 512]),
            "buffer_budget": st.integers(0, 2000),
            "max_failed_streams": st.integers(0, 6),
            "max_failed_total": st.integers(0, 12),
        }
    ),
)


@settings(FUZZ, max_examples=1000)
@given(role=st.sampled_from(list(Sender)), limits=bounds, ops=st.lists(operations, max_size=30))
def test_channel_core_survives_any_interleaving(role, limits, ops):
    core = ChannelCore(role, **limits)
    run_session(core, ops)  # raises on any undocumented exception, event or broken bound
    assert exception_objects(core) == []


@FUZZ
@given(
    role=st.sampled_from(list(Sender)),
    sid=stream_ids,
    seed=st.sampled_from(SEEDS),
    cuts=st.lists(st.integers(0, 700), max_size=8),
)
def test_valid_streams_decode_at_any_split(role, sid, seed, cuts):
    """Unmutated seeds on the right side: never a failure, whatever the split."""
    if seed.role is not role or not seed.valid:
        return
    core = ChannelCore(role, inflate=role is Sender.AGENT)  # as in production
    ops = [("send", sid, msg) for msg in seed.local] + ([("end", sid)] if seed.local_end else [])
    ops += [("recv", sid, chunk, False) for chunk in splits(seed.wire, cuts)]
    run_session(core, ops)
    events = core.receive(sid, b"", end_stream=True)
    assert core.failed_total == 0 and core.failed_streams == 0
    assert all(type(e).__name__ != "StreamFailed" for e in events)


def test_mutation_fuzzer_short_run():
    stats = fuzz(3000, seed=14, progress=None)
    assert stats.crashes == []
    assert stats.events["MessageReceived"] > 100  # the seeds reach the parser, not only errors
    assert stats.events["ConnectionFailed:stream-limit"] > 0


def test_mutation_fuzzer_reports_a_crash_with_a_reproducer(monkeypatch):
    """The fuzzer finds a planted bug (an escape from ``receive``) and its reproducer replays it."""
    real = ChannelCore.receive

    def buggy(self, stream_id, data, end_stream=False):
        if b"\xc1" in data:
            raise IndexError("planted")
        return real(self, stream_id, data, end_stream)

    monkeypatch.setattr(ChannelCore, "receive", buggy)
    stats = fuzz(500, seed=3, progress=None)
    assert stats.crashes and "IndexError: planted" in stats.crashes[0]["error"]
    repro = stats.crashes[0]["repro"]
    try:
        exec(compile(repro, "<repro>", "exec"), {})
    except IndexError as exc:
        assert str(exc) == "planted"
    else:
        raise AssertionError("the reproducer did not reproduce")
