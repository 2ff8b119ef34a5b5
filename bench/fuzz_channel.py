"""Mutation fuzzing of the frame decoder and ``ChannelCore``: what a hostile peer can feed in.

    margo-bench fuzz [--inputs 1000000] [--seed 1] [--out DIR]
    python -m bench.fuzz_channel ...

Seeds are valid streams as a real peer writes them: every message type of the protocol, each
stream kind's usual sequence, for both roles. An *input* is one seed after one to four
stacked mutations (bit flips, interesting bytes, inserted, deleted or duplicated ranges,
splices of two seeds, length prefixes rewritten to 0 / the limit / the limit + 1 / 2**32 - 1,
message types swapped, truncation), delivered on a stream id from a small pool, split at random
points, with or without the end of stream, sometimes followed by the peer's reset, our reset,
our end or a forget; ``SESSION`` inputs share one core, so streams interleave and the
per-connection bounds are reached (half the sessions use small bounds that trip often).

After every operation the checker asserts what the core promises: only the documented events
come out (``LocalProtocolError`` only from our own ``encode``/``end``), unparsed bytes stay
within the budget and agree with the decoders, failed streams stay within their bound, and a
connection failure leaves nothing behind; now and then it walks everything the core references
and asserts that no exception, traceback or frame object is among it. Any other outcome is a
crash: it is printed with a reproducer (the seed number and the operations as Python
literals) and written to ``--out`` if given. Deterministic for a given ``--seed``.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
import types
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from margo_stream.errors import LocalProtocolError
from margo_stream.protocol import messages as m
from margo_stream.protocol.channel import (
    ChannelCore,
    ConnectionFailed,
    MessageReceived,
    StreamEnded,
    StreamFailed,
)
from margo_stream.protocol.codes import DEFAULT_MAX_FRAME, ErrorCode, Sender, StreamKind
from margo_stream.protocol.frames import HEADER_SIZE, FrameDecoder, encode_frame

SESSION = (16, 128)  # inputs per core (or until the core fails the connection)
FRAME_SIZES = (512, 4096, DEFAULT_MAX_FRAME)  # the cores' frame limits
DIGEST = "sha256:" + "ab" * 32

# an operation: ("recv", sid, data, end) | ("reset", sid, code) | ("fail", sid, code)
#               | ("end", sid) | ("send", sid, message) | ("forget", sid)
Op = tuple[Any, ...]


def sample_messages() -> list[BaseModel]:
    """One valid instance of every message type."""
    caps = m.Capabilities(id="press-01", cpus=[m.Cpu(cores=2, architecture="x86_64")])
    return [
        m.Hello(device_id="press-01", agent_version="1.0", capabilities=caps, blobs=[DIGEST]),
        m.HelloAck(tenant="acme", device_id="press-01", server_time=1.5, keepalive_s=15),
        m.Ping(n=1),
        m.Pong(n=1),
        m.Stats(values={"buffer_bytes": 10, "ratio": 0.5, "mode": "x", "none": None}),
        m.Error(code=0x100, reason="bad"),
        m.Desired(version=3, manifest=b"{}", signature=b"s" * 64, blobs=[DIGEST]),
        m.Blob(digest=DIGEST, data=b"\x00" * 40, more=True),
        m.DesiredResult(version=3, ok=False, code="rollback", reason="older"),
        m.Status(
            seq=1,
            deployment_id="d1",
            manifest_version=3,
            state="failed",
            components=[m.ComponentStatusModel(name="c", state="failed")],
            error=m.StatusErrorModel(code="E", source="s", message="msg"),
        ),
        m.StatusAck(seq=1),
        m.Telemetry(oldest=1, first=1, last=2, count=2, codec="none", data=b"\x92\x01\x02"),
        m.TelemetryAck(seq=2),
        m.TermOpen(session_id="s1", command=["sh"], grant=b"g", certificate=b"c"),
        m.TermOpened(pid=42, operator="alice"),
        m.TermData(data=b"ls\n", fd=0),
        m.TermEof(),
        m.TermResize(rows=40, cols=120),
        m.TermExit(status=0, reason="done"),
        m.TermClose(reason="bye"),
        m.TermAck(consumed=3),
    ]


@dataclass(frozen=True)
class Seed:
    """What we send first on the stream (``local``), then the peer's bytes."""

    role: Sender
    local: tuple[BaseModel, ...]
    local_end: bool
    wire: bytes
    valid: bool = True  # a correct peer could send exactly this


def _wire(messages: Iterable[BaseModel], *, compress: bool = False) -> bytes:
    return b"".join(encode_frame(m.to_wire(x), compress=compress) for x in messages)


def seeds() -> list[Seed]:
    by_type = {type(x).model_fields["t"].default: x for x in sample_messages()}
    M = by_type.__getitem__
    A, C = Sender.AGENT, Sender.CONTROLLER
    out = [
        # the controller's view: agent-opened streams, and the agent's side of ours
        Seed(C, (), False, _wire([M("hello")])),
        # (ping, stats, error are valid only after our hello_ack: a seed for the mutator)
        Seed(C, (), False, _wire([M("hello"), M("ping"), M("stats"), M("error")]), False),
        Seed(C, (), False, _wire([M("status"), M("status"), M("status")])),
        Seed(C, (), False, _wire([M("telemetry"), M("telemetry")])),
        Seed(C, (M("desired"), M("blob")), True, _wire([M("desired_result")])),
        Seed(
            C,
            (M("term_open"),),
            False,
            _wire([M("term_opened"), M("term_data"), M("term_ack"), M("term_exit")]),
        ),
        # the agent's view
        Seed(A, (M("hello"),), False, _wire([M("hello_ack"), M("ping"), M("pong"), M("error")])),
        Seed(A, (), False, _wire([M("desired"), M("blob"), M("blob")])),
        Seed(A, (M("status"),), False, _wire([M("status_ack"), M("status_ack")])),
        Seed(A, (M("telemetry"),), False, _wire([M("telemetry_ack")])),
        Seed(
            A,
            (),
            False,
            _wire([M("term_open"), M("term_data"), M("term_resize"), M("term_eof")]),
            False,
        ),
        Seed(A, (), False, _wire([M("term_open"), M("term_close")])),
    ]
    big = m.Blob(digest=DIGEST, data=bytes(range(256)) * 12)  # about 3 KiB: several packets
    out += [Seed(A, (), False, _wire([M("desired"), big, big]))]
    # a push as the controller sends it to today's agents: compressed frames
    text = m.Blob(digest=DIGEST, data=b"spec:\n  image: registry/app:1.0\n" * 40)
    out += [Seed(A, (), False, _wire([M("desired"), text], compress=True))]
    out += [
        Seed(C, (), False, _wire([m.Telemetry(oldest=1, first=1, last=1, count=1, data=big.data)]))
    ]
    # every message type alone, in both directions (most of them on the wrong stream)
    for msg in by_type.values():
        out += [Seed(C, (), False, _wire([msg]), False), Seed(A, (), False, _wire([msg]), False)]
    return out


# --- mutation ------------------------------------------------------------------------------------
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xC0, 0xC1, 0xD9, 0xDC, 0xDE, 0xDF, 0xFF)
TYPE_NAMES = sorted(m.MESSAGE_TYPES) + ["", "nope"]


class Mutator:
    def __init__(self, rng: random.Random, corpus: list[bytes]) -> None:
        self.rng = rng
        self.corpus = corpus
        lengths = {0, 1, 2**31, 2**32 - 1}
        for size in FRAME_SIZES:
            lengths |= {size - 1, size, size + 1}
        self.lengths = [n.to_bytes(HEADER_SIZE, "big") for n in sorted(lengths)]
        self.ops: list[Callable[[bytearray], None]] = [
            self.flip,
            self.interesting,
            self.insert,
            self.delete,
            self.duplicate,
            self.splice,
            self.length,
            self.truncate,
            self.retype,
            self.pad,
        ]

    def mutate(self, data: bytes) -> bytes:
        buf = bytearray(data)
        if self.rng.random() < 0.1:
            return bytes(buf)  # the valid stream itself, only split differently
        for _ in range(self.rng.choice((1, 1, 1, 2, 2, 3, 4))):
            self.rng.choice(self.ops)(buf)
        return bytes(buf)

    def _pos(self, buf: bytearray) -> int:
        return self.rng.randrange(len(buf) + 1)

    def flip(self, buf: bytearray) -> None:
        if buf:
            i = self.rng.randrange(len(buf))
            buf[i] ^= 1 << self.rng.randrange(8)

    def interesting(self, buf: bytearray) -> None:
        if buf:
            buf[self.rng.randrange(len(buf))] = self.rng.choice(INTERESTING_BYTES)

    def insert(self, buf: bytearray) -> None:
        n = self.rng.randint(1, 8)
        i = self._pos(buf)
        buf[i:i] = self.rng.randbytes(n)

    def delete(self, buf: bytearray) -> None:
        i = self._pos(buf)
        del buf[i : i + self.rng.randint(1, 16)]

    def duplicate(self, buf: bytearray) -> None:
        i = self._pos(buf)
        chunk = buf[i : i + self.rng.randint(1, 64)]
        j = self._pos(buf)
        buf[j:j] = chunk

    def splice(self, buf: bytearray) -> None:
        other = self.rng.choice(self.corpus)
        buf[self._pos(buf) :] = other[self.rng.randrange(len(other) + 1) :]

    def length(self, buf: bytearray) -> None:
        i = self._pos(buf) if self.rng.random() < 0.3 else 0
        buf[i : i + HEADER_SIZE] = self.rng.choice(self.lengths)

    def truncate(self, buf: bytearray) -> None:
        del buf[self._pos(buf) :]

    def pad(self, buf: bytearray) -> None:
        """Append the start of a frame: an unfinished frame makes the core hold bytes."""
        size = self.rng.choice(FRAME_SIZES)
        buf += self.rng.randint(size // 2, size).to_bytes(HEADER_SIZE, "big")
        buf += self.rng.randbytes(self.rng.randint(1, 3000))

    def retype(self, buf: bytearray) -> None:
        i = buf.find(b"\xa1t")  # the map key "t": its value follows
        if 0 <= i < len(buf) - 2:
            name = self.rng.choice(TYPE_NAMES).encode()
            j = i + 2
            old_len = buf[j] & 0x1F if 0xA0 <= buf[j] <= 0xBF else 0
            buf[j : j + 1 + old_len] = bytes([0xA0 | len(name)]) + name


# --- checking ------------------------------------------------------------------------------------
class Violation(AssertionError):
    """The core broke one of its promises."""


EVENT_TYPES = (MessageReceived, StreamEnded, StreamFailed, ConnectionFailed)
LIMIT_CODES = (ErrorCode.STREAM_LIMIT, ErrorCode.BUFFER_LIMIT)


def exception_objects(root: object, budget: int = 200_000) -> list[object]:
    """Exceptions, tracebacks and frames reachable from ``root`` (the core's own graph)."""
    seen: set[int] = set()
    todo = [root]
    found: list[object] = []
    modules = (types.ModuleType, type)
    while todo and budget:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, modules):
            continue
        seen.add(id(obj))
        budget -= 1
        if isinstance(obj, BaseException | types.TracebackType | types.FrameType):
            found.append(obj)
            continue
        todo.extend(gc.get_referents(obj))
    return found


def check_core(core: ChannelCore) -> None:
    streams = core._streams  # the checker reads the core's books to audit them
    held = 0
    for stream in streams.values():
        if stream.decoder is not None:
            if stream.decoder.buffered != stream.held:
                raise Violation(
                    f"decoder holds {stream.decoder.buffered}, core counts {stream.held}"
                )
            if stream.decoder.failed:
                raise Violation("a live stream's decoder has failed")
            if stream.held >= HEADER_SIZE + core.max_frame:
                raise Violation(f"one stream holds {stream.held} bytes, over one frame")
        elif stream.held:
            raise Violation("an ended stream still counts unparsed bytes")
        held += stream.held
    if held != core.buffered:
        raise Violation(f"core counts {core.buffered} unparsed bytes, the streams hold {held}")
    if core.buffered > core.buffer_budget:
        raise Violation(f"{core.buffered} unparsed bytes over the {core.buffer_budget} budget")
    if core.failed_streams > core.max_failed_streams:
        raise Violation(f"{core.failed_streams} failed streams kept")
    if set(streams) & core._failed or set(streams) & core._ignored or core._failed & core._ignored:
        raise Violation("a stream is in two of live, failed and ignored")
    if core.closed is not None and (len(core) or core.buffered):
        raise Violation("a failed connection's core still holds streams")


def check_events(events: object, seen_failure: bool) -> bool:
    if not isinstance(events, list):
        raise Violation(f"events are a {type(events).__name__}, not a list")
    for ev in events:
        if not isinstance(ev, EVENT_TYPES):
            raise Violation(f"undocumented event {ev!r}")
        if isinstance(ev, MessageReceived):
            if not isinstance(ev.message, BaseModel) or not isinstance(ev.kind, StreamKind):
                raise Violation(f"bad message event {ev!r}")
        elif isinstance(ev, StreamFailed):
            if not ev.reset_by_peer and ev.code not in ErrorCode._value2member_map_:
                raise Violation(f"stream failed with an unknown code {ev.code:#x}")
            if len(ev.reason) > 2000:
                raise Violation(f"a {len(ev.reason)}-character reason")
        elif isinstance(ev, ConnectionFailed):
            if seen_failure or ev.code not in LIMIT_CODES or ev is not events[-1]:
                raise Violation(f"unexpected connection failure {ev!r}")
            seen_failure = True
    return seen_failure


@dataclass
class Stats:
    inputs: int = 0
    ops: int = 0
    cores: int = 0
    events: Counter[str] = field(default_factory=Counter)
    crashes: list[dict[str, Any]] = field(default_factory=list)


def apply(core: ChannelCore, op: Op) -> list[Any]:
    """Run one operation; only our own sends may raise (``LocalProtocolError``)."""
    name, sid = op[0], op[1]
    if name == "recv":
        return core.receive(sid, op[2], op[3])
    if name == "reset":
        return core.reset_received(sid, op[2])
    if name == "fail":
        return core.fail(sid, op[2])
    if name == "forget":
        core.forget(sid)
        return []
    try:
        if name == "end":
            core.end(sid)
        else:
            core.encode(sid, op[2])
    except LocalProtocolError:
        pass
    return []


def run_session(core: ChannelCore, ops: list[Op], stats: Stats | None = None) -> None:
    """Apply ``ops`` to ``core``, checking after each; raises ``Violation`` or the escape."""
    failed = False
    for op in ops:
        events = apply(core, op)
        failed = check_events(events, failed)
        if failed and core.closed is None:
            raise Violation("connection failure reported but the core is not closed")
        check_core(core)
        if stats is not None:
            stats.ops += 1
            for ev in events:
                name = type(ev).__name__
                if isinstance(ev, StreamFailed | ConnectionFailed):
                    name += f":{ErrorCode.describe(ev.code)}"
                stats.events[name] += 1


def new_core(rng: random.Random, role: Sender) -> ChannelCore:
    """Half with the default bounds, half with small ones that the inputs reach."""
    inflate = role is Sender.AGENT  # as in production: agents take compressed frames
    if rng.random() < 0.5:
        return ChannelCore(role, inflate=inflate)
    frame = rng.choice(FRAME_SIZES[:2])
    return ChannelCore(
        role,
        inflate=inflate,
        max_frame=frame,
        buffer_budget=rng.choice((frame, 2 * frame, 4 * frame, 1000)),
        max_failed_streams=rng.randint(1, 16),
        max_failed_total=rng.randint(4, 64),
    )


def make_ops(rng: random.Random, mutator: Mutator, seed: Seed, sid: int) -> list[Op]:
    ops: list[Op] = [("send", sid, msg) for msg in seed.local]
    if seed.local_end:
        ops.append(("end", sid))
    data = mutator.mutate(seed.wire)
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 4)))
    end = rng.random() < 0.5
    prev = 0
    for i, cut in enumerate([*cuts, len(data)]):
        last = i == len(cuts)
        ops.append(("recv", sid, data[prev:cut], end and last))
        prev = cut
    roll = rng.random()
    if roll < 0.15:
        ops.append(("reset", sid, rng.choice((0, int(ErrorCode.CANCELLED), 0x100, 2**62 - 1))))
    elif roll < 0.25:
        ops.append(("fail", sid, int(rng.choice(list(ErrorCode)))))
    elif roll < 0.35:
        ops.append(("end", sid))
    elif roll < 0.4:
        ops.append(("forget", sid))
    if rng.random() < 0.05:  # late bytes on a stream that may have failed or ended
        ops.append(("recv", sid, rng.randbytes(rng.randint(0, 16)), rng.random() < 0.5))
    return ops


def reproducer(seed: int, role: Sender, bounds: dict[str, int], ops: list[Op]) -> str:
    lines = [
        "# reproducer: python - < this file",
        "from margo_stream.protocol import messages as m",
        "from margo_stream.protocol.channel import ChannelCore",
        "from margo_stream.protocol.codes import Sender",
        "from bench.fuzz_channel import run_session",
        f"core = ChannelCore(Sender.{role.name}, **{bounds!r})",
        "ops = [",
    ]
    for op in ops:
        if op[0] == "send":
            lines.append(
                f"    ('send', {op[1]}, m.{type(op[2]).__name__}(**{op[2].model_dump()!r})),"
            )
        else:
            lines.append(f"    {op!r},")
    lines += ["]", f"run_session(core, ops)  # fuzz seed {seed}"]
    return "\n".join(lines)


def _bounds(core: ChannelCore) -> dict[str, int]:
    return {
        "inflate": core.inflate,
        "max_frame": core.max_frame,
        "buffer_budget": core.buffer_budget,
        "max_failed_streams": core.max_failed_streams,
        "max_failed_total": core.max_failed_total,
    }


def fuzz(inputs: int, seed: int, progress: Callable[[Stats, float], None] | None) -> Stats:
    rng = random.Random(seed)
    all_seeds = seeds()
    by_role = {r: [s for s in all_seeds if s.role is r] for r in Sender}
    mutator = Mutator(rng, [s.wire for s in all_seeds])
    stats = Stats()
    start = time.perf_counter()
    cores = 0
    while stats.inputs < inputs:
        role = rng.choice((Sender.AGENT, Sender.CONTROLLER))
        core = new_core(rng, role)
        bounds = _bounds(core)
        history: list[Op] = []
        recent: list[int] = []
        next_sid = 0
        for _ in range(min(rng.randint(*SESSION), inputs - stats.inputs)):
            if recent and rng.random() < 0.25:
                sid = rng.choice(recent)  # more on a stream that may have failed or ended
            else:
                sid, next_sid = next_sid, next_sid + 1
                recent = [*recent[-7:], sid]
            ops = make_ops(rng, mutator, rng.choice(by_role[role]), sid)
            history += ops
            stats.inputs += 1
            try:
                run_session(core, ops, stats)
            except Exception as exc:  # every escape is a finding
                text = reproducer(seed, role, bounds, history)
                stats.crashes.append(
                    {"input": stats.inputs, "error": f"{type(exc).__name__}: {exc}", "repro": text}
                )
                break
            if progress is not None and stats.inputs % 100_000 == 0:
                progress(stats, time.perf_counter() - start)
            if core.closed is not None:
                break  # the connection is over: the next inputs go to a new one
        cores += 1
        if cores % 1000 == 0:
            found = exception_objects(core)
            if found:
                stats.crashes.append(
                    {"input": stats.inputs, "error": f"core references {found[:3]!r}", "repro": ""}
                )
    stats.cores = cores
    return stats


def fuzz_decoder(inputs: int, seed: int) -> int:
    """Arbitrary bytes straight into a ``FrameDecoder``: only its documented error comes out."""
    from margo_stream.errors import RemoteProtocolError

    rng = random.Random(seed)
    mutator = Mutator(rng, [s.wire for s in seeds()])
    corpus = mutator.corpus
    for _ in range(inputs):
        decoder = FrameDecoder(4096, inflate=rng.random() < 0.5)  # the agent's half inflates
        data = mutator.mutate(rng.choice(corpus))
        try:
            for i in range(0, len(data), rng.randint(1, 64)):
                decoder.feed(data[i : i + 64])
                if decoder.buffered >= HEADER_SIZE + 4096:
                    raise Violation("decoder holds more than one frame")
            decoder.finish()
        except RemoteProtocolError:
            pass
    return inputs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="margo-bench fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--inputs", type=int, default=1_000_000, help="mutated streams to feed")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--decoder-inputs", type=int, default=0, help="also fuzz FrameDecoder alone")
    p.add_argument("--out", type=Path, help="write result.json (and crash reproducers) here")
    args = p.parse_args(argv)

    def progress(stats: Stats, elapsed: float) -> None:
        print(
            f"{stats.inputs:>9,} inputs  {stats.ops:>10,} ops  {elapsed:7.1f} s  "
            f"{stats.inputs / elapsed:8,.0f} inputs/s  crashes {len(stats.crashes)}",
            flush=True,
        )

    start = time.perf_counter()
    stats = fuzz(args.inputs, args.seed, progress)
    elapsed = time.perf_counter() - start
    if args.decoder_inputs:
        fuzz_decoder(args.decoder_inputs, args.seed)
    result = {
        "inputs": stats.inputs,
        "ops": stats.ops,
        "cores": stats.cores,
        "seconds": round(elapsed, 2),
        "inputs_per_s": round(stats.inputs / elapsed),
        "seed": args.seed,
        "decoder_inputs": args.decoder_inputs,
        "crashes": len(stats.crashes),
        "events": dict(sorted(stats.events.items())),
    }
    print(json.dumps(result, indent=2))
    for crash in stats.crashes[:5]:
        print(f"\nCRASH at input {crash['input']}: {crash['error']}\n{crash['repro']}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result, indent=2))
        for i, crash in enumerate(stats.crashes):
            (args.out / f"crash-{i}.py").write_text(crash["repro"] + "\n")
    return 1 if stats.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
