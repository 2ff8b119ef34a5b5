"""The one module that touches aioquic's private attributes (aioquic is pinned in pyproject.toml).

aioquic 1.7 has no public server-side client authentication: ``tls.Context`` only sends a
CertificateRequest when its private ``_request_client_certificate`` flag is set ("for test
purposes only"), and even then it never verifies the client's chain and accepts an empty
Certificate. So the controller:

1. sets that flag on every server connection (``MutualTlsServerConnection``), so the client
   must present a certificate and prove its key (aioquic checks CertificateVerify);
2. reads the presented chain here (``peer_certificates``) once the handshake completes, and
   verifies it itself against the tenant's bundle before it accepts any stream;
3. issues no session tickets and accepts no PSK (the server is built without ticket
   callbacks), so a resumed session can never skip the client certificate;
4. presents, per connection, the certificate of the tenant the client's ClientHello names as
   its server name (SNI), falling back to the configuration's (``DIR/controller/``): aioquic
   holds one certificate per configuration, so ``_choose_by_server_name`` peeks at the
   ClientHello just before aioquic's server handles it and sets the context's (public)
   certificate, chain and key, which aioquic reads only after that point;
5. derives the stateless reset token of every connection ID it issues from the ID and a
   kept key, and lets the agent read the tokens it was given, so a restarted controller can
   reset connections it no longer knows and the agent recognises the reset
   (``stateless_reset.py``; aioquic draws the tokens at random and ignores resets);
6. bounds what a peer can make us buffer undelivered (``bound_receive_credit``): aioquic
   doubles its connection credit (MAX_DATA) from the highest offsets *received*, so a peer
   that leaves a gap (never sends offset 0 of a stream) grows aioquic's receive buffers
   without bound; the credit here slides over the bytes *delivered* to the application
   instead, so at most one window (the configuration's ``max_data``) is ever held undelivered;
7. acknowledges as our traffic suits (``hold_acks``, ``ack_due_now``): aioquic holds every ACK
   its private ``_ack_delay`` (1 ms) and writes it only once due, so a sooner reply leaves
   without it. After the handshake (during it, the 1 ms lets ACKs ride with the next flight;
   at once cost 15-25 % of the handshake rate at 10,000 devices) an ACK is held up to
   :data:`ACK_HOLD` (5 ms), and ``Connection`` makes it due at once after a packet with no
   stream data (a keepalive PING), when it sends stream data itself (the ACK rides with the
   reply), when a packet opens or fills a gap in the packet numbers (``ack_ranges``; RFC 9000
   13.2.1) or once four packets with stream data wait (RFC 9000 13.2.2 recommends every
   second packet and allows others; four leaves a two-datagram push answered by one). A push
   and its result, a status and its ack take one datagram less each way. Not longer: a quiet
   link's probe timer is the RTT plus our 25 ms ``max_ack_delay`` (tried: bench/RESULTS.md).
8. paces with the congestion controller's own pacer when it has one (``use_own_pacer``): aioquic
   feeds its own the smoothed RTT, which misleads on mostly idle connections (``rate_cc``).
9. lets go of what only the handshake needed (``release_handshake_buffers``): the three
   16 KiB TLS output buffers aioquic keeps for a connection's life (``_crypto_buffers``; a
   server writes no TLS after the handshake) become empty ones of no capacity, so a write
   that should never happen raises; ``MutualTlsServerConnection`` shares the per-frame-type
   epoch sets every connection builds alike (``_share_epoch_sets``); the keys' logging
   callbacks go without a packet log, and the client's chain once checked
   (``take_client_chain``). 800 server connections in one process: 54.8 KB a connection
   with the buffers released, 48.4 with the rest (``/proc`` resident memory).
10. builds nothing when nothing can be built (``nothing_to_send``, ``count_losses``): a call
   of ``datagrams_to_send`` costs about 35 us even when it builds nothing, as after most pure
   ACKs (4.2 such calls a device in a 1,000-device fan-out). ``Connection`` skips it after a
   datagram that brought no stream data, declared no packet lost (``count_losses``) and left
   nothing due or waiting by the conservative reading of ``nothing_to_send``: an ACK can free
   the congestion window or declare packets lost while data waits, and then it builds.
11. has its pure ACKs acknowledged (``pure_acks_unacknowledged``): aioquic keeps each packet
   until an ACK covers it, and an idle agent only pings, sending no ACK frame, so every answer
   stayed (590 bytes a keepalive: 16 MB a minute at 10,000 devices). ``Connection`` adds a
   PING to an answer once ``ELICIT_AFTER`` wait (RFC 9000 13.2.4); the agent's ACK frees them.

``check_aioquic()`` fails loudly (at controller start, in the suite) if these internals change.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from aioquic import __version__ as aioquic_version
from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import Limit, QuicConnection, QuicConnectionState
from aioquic.quic.crypto import CryptoContext, NoCallback
from aioquic.quic.packet import QuicFrameType
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream, QuicStreamReceiver
from cryptography import x509

from margo_stream.errors import MargoError
from margo_stream.identity.fleet_manager import ServerCertificate
from margo_stream.transport.stateless_reset import ResetTokens

TESTED_AIOQUIC = ("1.7.",)
LIMIT_ATTRIBUTES = {"frame_type", "name", "sent", "used", "value"}
HELLO_HANDLER_PARAMETERS = ["input_buf", "initial_buf", "handshake_buf"]
HANDSHAKE_EPOCHS = (tls.Epoch.INITIAL, tls.Epoch.HANDSHAKE, tls.Epoch.ONE_RTT)
FRAME_HANDLERS = "_QuicConnection__frame_handlers"  # name-mangled ``__frame_handlers``

# server name from the ClientHello (None: none sent) -> the certificate to present, or None
CertificateChooser = Callable[[str | None], ServerCertificate | None]


class UnsupportedAioquic(MargoError):
    """The installed aioquic lacks the internals client authentication depends on."""


def check_aioquic() -> None:
    if not aioquic_version.startswith(TESTED_AIOQUIC):
        raise UnsupportedAioquic(
            f"aioquic {aioquic_version} is not a version margo-stream's client-certificate "
            f"hook was tested with ({', '.join(v + 'x' for v in TESTED_AIOQUIC)}); "
            "install the version pinned in pyproject.toml"
        )
    context = tls.Context(is_client=False)
    for attribute in (
        "_request_client_certificate",
        "_peer_certificate",
        "_peer_certificate_chain",
    ):
        if not hasattr(context, attribute):
            raise UnsupportedAioquic(
                f"aioquic {aioquic_version}: tls.Context has no {attribute!r}; "
                "the client-certificate hook cannot work"
            )
    _check_server_name_hook(context)
    client = QuicConnection(configuration=QuicConfiguration(is_client=True))
    for attribute in ("_host_cids", "_peer_cid", "_peer_cid_available", "_close_at"):
        if not hasattr(client, attribute):
            raise UnsupportedAioquic(
                f"aioquic {aioquic_version}: QuicConnection has no {attribute!r}; "
                "stateless resets cannot work"
            )
    if not hasattr(client._host_cids[0], "stateless_reset_token") or not callable(
        getattr(QuicConnection, "_replenish_connection_ids", None)
    ):
        raise UnsupportedAioquic(
            f"aioquic {aioquic_version}: connection IDs are issued differently; "
            "stateless resets cannot work"
        )
    if not callable(getattr(QuicConnection, "_initialize", None)):
        raise UnsupportedAioquic(
            f"aioquic {aioquic_version}: QuicConnection._initialize is gone; "
            "the client-certificate hook cannot work"
        )
    _check_receive_credit_hook(client)
    _check_handshake_buffers(QuicConnection(configuration=QuicConfiguration(is_client=True)))
    if not isinstance(getattr(client, "_ack_delay", None), float):
        raise UnsupportedAioquic(
            f"aioquic {aioquic_version}: QuicConnection has no float '_ack_delay'; "
            "holding ACKs cannot work"
        )
    if not isinstance(getattr(client, "_spaces", None), dict) or not all(
        hasattr(QuicPacketSpace(), a) for a in ("ack_at", "sent_packets", "ack_eliciting_in_flight")
    ):
        raise UnsupportedAioquic(
            f"aioquic {aioquic_version}: no 1-RTT packet space with 'ack_at', 'sent_packets' "
            "and 'ack_eliciting_in_flight'; acknowledging with the reply cannot work"
        )
    loss = getattr(client, "_loss", None)
    if not hasattr(loss, "_pacer") or not hasattr(loss, "_cc"):
        raise UnsupportedAioquic(
            f"aioquic {aioquic_version}: the recovery has no '_pacer' or '_cc'; "
            "the rate controller's pacing cannot work"
        )
    _check_idle_build(client)


# what ``nothing_to_send`` reads: the state flags of work aioquic's next build would do
IDLE_FLAGS = (
    "_close_pending",
    "_pacing_at",
    "_probe_pending",
    "_ping_pending",
    "_handshake_done_pending",
    "_streams_blocked_pending",
    "_retire_connection_ids",
    "_datagrams_pending",
    "_handshake_confirmed",
    "_state",
    "_network_paths",
    "_remote_preferred_address",
    "_crypto_streams",
    "_streams",
)


def _check_idle_build(connection: QuicConnection) -> None:
    """What ``nothing_to_send`` and ``count_losses`` rely on."""
    missing = [a for a in IDLE_FLAGS if not hasattr(connection, a)]
    if not callable(getattr(connection._loss, "_on_packets_lost", None)):
        missing.append("_loss._on_packets_lost")
    if not hasattr(QuicStream(), "is_finished") or not hasattr(
        QuicStream().sender, "reset_pending"
    ):
        missing.append("QuicStream.is_finished / sender.reset_pending")
    if missing:
        raise UnsupportedAioquic(
            f"aioquic {aioquic_version}: QuicConnection lacks {', '.join(missing)}; "
            "skipping builds that send nothing cannot work"
        )
    context = CryptoContext()
    if not hasattr(connection, "_quic_logger") or not all(
        hasattr(context, a) for a in ("_setup_cb", "_teardown_cb")
    ):
        raise UnsupportedAioquic(
            f"aioquic {aioquic_version}: no '_quic_logger' or CryptoContext callbacks; "
            "releasing the keys' logging callbacks cannot work"
        )


def count_losses(connection: QuicConnection, counted: Callable[[], None]) -> None:
    """Call ``counted()`` whenever the connection's recovery declares packets lost (point 10 of
    the module note). Lost stream data goes back to its stream, but a lost MAX_DATA or
    MAX_STREAM_DATA is only marked unsent: the count is what tells a caller about it."""
    loss = connection._loss
    declare = loss._on_packets_lost

    def on_packets_lost(**kwargs: Any) -> None:
        if kwargs["packets"]:  # a list or tuple; loss detection passes an empty one too
            counted()
        declare(**kwargs)

    loss._on_packets_lost = on_packets_lost  # type: ignore[method-assign]


def nothing_to_send(connection: QuicConnection, now: float) -> bool:
    """True only when ``datagrams_to_send(now)`` would build nothing (point 10 of the module
    note), given that no packet was declared lost and no stream data arrived since the last
    build (the caller knows both): the connection is established and confirmed, no ACK is
    due, no pacing, probe, PING, handshake-done, streams-blocked, connection-ID, datagram or
    close is pending, its path is validated with no challenge to answer, no TLS data waits,
    and no stream has data, a FIN, a reset or a stop to send or is finished (to be
    discarded). False whenever any of it is unsure."""
    if (
        connection._state is not QuicConnectionState.CONNECTED
        or not connection._handshake_confirmed
        or connection._close_pending
        or connection._pacing_at is not None
        or connection._probe_pending
        or connection._ping_pending
        or connection._handshake_done_pending
        or connection._streams_blocked_pending
        or connection._retire_connection_ids
        or connection._datagrams_pending
    ):
        return False
    for space in connection._loss.spaces:
        if space.ack_at is not None and space.ack_at <= now:
            return False
    paths = connection._network_paths
    if len(paths) != 1 or not paths[0].is_validated or paths[0].remote_challenges:
        return False  # no path, or a path to validate or probe
    if connection._remote_preferred_address is not None:
        return False  # a client may probe it
    if any(not cid.was_sent for cid in connection._host_cids):
        return False
    crypto = connection._crypto_streams.get(tls.Epoch.ONE_RTT)
    if crypto is not None and not crypto.sender.buffer_is_empty:
        return False
    for stream in connection._streams.values():
        sender = stream.sender
        if (
            not sender.buffer_is_empty
            or sender.reset_pending
            or stream.receiver.stop_pending
            or stream.is_finished
        ):
            return False
    return True


def _check_receive_credit_hook(connection: QuicConnection) -> None:
    """What ``bound_receive_credit`` relies on: the connection credit is a ``Limit`` with plain
    attributes in ``_local_max_data``, assigned once, raised only by assigning its ``value``;
    the live streams are in ``_streams``, each receiver buffering in ``_buffer``."""
    problem = None
    limit = getattr(connection, "_local_max_data", None)
    try:
        source = inspect.getsource(QuicConnection)
        raises = inspect.getsource(QuicConnection._write_connection_limits)
    except (AttributeError, OSError, TypeError) as exc:
        source = raises = f"unreadable: {exc}"
    if source.startswith("unreadable"):
        problem = f"QuicConnection's source is {source}"
    elif not isinstance(limit, Limit) or set(vars(limit)) != LIMIT_ATTRIBUTES:
        problem = f"_local_max_data is not a Limit with exactly {sorted(LIMIT_ATTRIBUTES)}"
    elif limit.frame_type != QuicFrameType.MAX_DATA:
        problem = "_local_max_data is not the MAX_DATA limit"
    elif source.count("self._local_max_data =") != 1 or "max_data.value *= 2" not in raises:
        problem = "the MAX_DATA credit is assigned or raised differently"
    elif not isinstance(getattr(connection, "_streams", None), dict):
        problem = "QuicConnection has no _streams dict"
    elif not isinstance(getattr(QuicStreamReceiver(0, True), "_buffer", None), bytearray):
        problem = "QuicStreamReceiver has no _buffer bytearray"
    if problem is not None:
        raise UnsupportedAioquic(
            f"aioquic {aioquic_version}: {problem}; the receive credit cannot be bounded "
            "by the delivered bytes"
        )


def _check_handshake_buffers(connection: QuicConnection) -> None:
    """What ``release_handshake_buffers`` and ``_share_epoch_sets`` rely on (``connection``: a
    new client connection, never used; nothing is sent): the TLS output
    buffers are a dict of ``Buffer`` per epoch, a server context past its handshake refuses a
    handshake message without writing to them, and the frame handlers are a dict of
    (handler, frozenset of epochs)."""
    problem = None
    connection.connect(("127.0.0.1", 9), now=0.0)  # builds its TLS context and buffers
    buffers = getattr(connection, "_crypto_buffers", None)
    handlers = getattr(connection, FRAME_HANDLERS, None)
    if not isinstance(buffers, dict) or set(buffers) != set(HANDSHAKE_EPOCHS):
        problem = "_crypto_buffers is not a dict of the INITIAL, HANDSHAKE and ONE_RTT epochs"
    elif not all(isinstance(b, Buffer) for b in buffers.values()):
        problem = "_crypto_buffers does not hold Buffer objects"
    elif not isinstance(handlers, dict) or not all(
        isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], frozenset)
        for v in handlers.values()
    ):
        problem = f"{FRAME_HANDLERS} is not a dict of (handler, frozenset of epochs)"
    else:
        context = tls.Context(is_client=False)
        context.state = tls.State.SERVER_POST_HANDSHAKE
        empty = {epoch: Buffer(capacity=0) for epoch in HANDSHAKE_EPOCHS}
        finished = bytes([tls.HandshakeType.FINISHED, 0, 0, 0])
        try:
            context.handle_message(finished, empty)
            problem = "a server past its handshake accepts a handshake message"
        except tls.AlertUnexpectedMessage:
            pass
        except Exception as exc:  # noqa: BLE001 - any other outcome is a change to report
            problem = f"a server past its handshake answers a handshake message with {exc!r}"
    if problem is not None:
        raise UnsupportedAioquic(
            f"aioquic {aioquic_version}: {problem}; the handshake's buffers cannot be released"
        )


def _check_server_name_hook(context: tls.Context) -> None:
    """What ``_choose_by_server_name`` relies on: the server's ClientHello handler and its
    arguments, the ClientHello parser and its server name, the context's certificate slots."""
    handler = getattr(context, "_server_handle_hello", None)
    try:
        parameters = list(inspect.signature(handler).parameters) if callable(handler) else None
    except (TypeError, ValueError):
        parameters = None
    if parameters != HELLO_HANDLER_PARAMETERS:
        raise UnsupportedAioquic(
            f"aioquic {aioquic_version}: tls.Context._server_handle_hello is gone or takes "
            f"{parameters} instead of {HELLO_HANDLER_PARAMETERS}; the per-tenant server "
            "certificate cannot be chosen"
        )
    if not callable(getattr(tls, "pull_client_hello", None)) or "server_name" not in getattr(
        tls.ClientHello, "__dataclass_fields__", {}
    ):
        raise UnsupportedAioquic(
            f"aioquic {aioquic_version}: tls.pull_client_hello or ClientHello.server_name is "
            "gone; the per-tenant server certificate cannot be chosen"
        )
    for attribute in ("certificate", "certificate_chain", "certificate_private_key"):
        if not hasattr(context, attribute):
            raise UnsupportedAioquic(
                f"aioquic {aioquic_version}: tls.Context has no {attribute!r}; the per-tenant "
                "server certificate cannot be chosen"
            )


def _choose_by_server_name(context: tls.Context, choose: CertificateChooser) -> None:
    """Before aioquic's server handles the ClientHello (the only place it reads the server
    name), read the name from it and present the certificate ``choose`` picks for it.

    aioquic first uses the certificate's key later in that same handler (signature algorithm
    negotiation, Certificate, CertificateVerify), so setting it here is in time. A ClientHello
    that does not parse is left to aioquic, which refuses it with the proper alert.
    """
    handle_hello = context._server_handle_hello

    def choosing_handle_hello(
        input_buf: Buffer, initial_buf: Buffer, handshake_buf: Buffer
    ) -> None:
        start = input_buf.tell()
        try:
            server_name = tls.pull_client_hello(input_buf).server_name
        except Exception:  # noqa: BLE001 - aioquic parses it again and raises its alert
            server_name = None
        input_buf.seek(start)
        chosen = choose(server_name)
        if chosen is not None:
            context.certificate = chosen.certificate
            context.certificate_chain = list(chosen.chain)
            context.certificate_private_key = chosen.private_key
        handle_hello(input_buf, initial_buf, handshake_buf)

    setattr(context, "_server_handle_hello", choosing_handle_hello)  # noqa: B010 - an instance's


class SlidingMaxData(Limit):
    """The connection's MAX_DATA credit as a window sliding over the delivered bytes.

    aioquic assigns ``value`` only to raise the credit (``value *= 2`` whenever the highest
    offsets received pass half of it). Here any such assignment is only the signal: the
    credit becomes (bytes delivered to the application, as StreamDataReceived events)
    + ``window``, and only once the credit the peer has left (``value - used``) falls below
    half a window, so MAX_DATA frames stay batched (one per half window in a steady
    transfer). It never shrinks. ``window`` is the initial credit, the configuration's
    ``max_data``.

    Delivered = ``used`` (the highest offsets received, summed over streams, as aioquic counts
    them) minus what aioquic still holds undelivered: the receive buffers of its live streams
    (``_buffer`` spans ``_buffer_start`` to the highest offset received, gaps included). A
    reset stream's final size and a discarded stream's bytes hold no memory, so they count as
    delivered (RFC 9000 4.5: a reset's final size consumes the credit). Since ``used`` never
    passes ``value`` and ``value`` never passes (delivered at the last raise) + ``window``,
    aioquic never holds more than ``window`` undelivered bytes across all streams, whatever a
    peer leaves out: the per-stream windows (MAX_STREAM_DATA) may keep doubling, the
    connection credit bounds their sum.
    """

    def __init__(self, limit: Limit, streams: dict[int, QuicStream]) -> None:
        # not Limit.__init__: its ``self.value = ...`` would be taken for a raise
        self.frame_type = limit.frame_type
        self.name = limit.name
        self.sent = limit.sent
        self.used = limit.used
        self._margo_value = limit.value
        self._margo_window = limit.value
        self._margo_streams = streams  # the dict itself: no reference back to the connection

    @property
    def value(self) -> int:
        return self._margo_value

    @value.setter
    def value(self, _proposed: int) -> None:
        if self._margo_value - self.used >= self._margo_window // 2:
            return
        delivered = self.used - undelivered_bytes(self._margo_streams)
        self._margo_value = max(self._margo_value, delivered + self._margo_window)


def undelivered_bytes(streams: dict[int, QuicStream]) -> int:
    """What aioquic holds received but not yet delivered, over the given streams."""
    return sum(len(stream.receiver._buffer) for stream in streams.values())


def connection_undelivered_bytes(connection: QuicConnection) -> int:
    """What ``connection`` holds received but not yet delivered to the application."""
    return undelivered_bytes(connection._streams)


def bound_receive_credit(connection: QuicConnection) -> None:
    """Make ``connection``'s MAX_DATA credit slide over the delivered bytes (``SlidingMaxData``),
    its window the configuration's ``max_data``. Call it right after constructing the
    connection, before any packet is received."""
    limit = connection._local_max_data
    if not isinstance(limit, SlidingMaxData):
        connection._local_max_data = SlidingMaxData(limit, connection._streams)


ACK_HOLD = 0.005  # seconds an ACK may wait for a reply to ride with (max_ack_delay is 25 ms)


def hold_acks(connection: QuicConnection, hold: float = ACK_HOLD) -> None:
    """Hold each ACK up to ``hold`` seconds after the packet that asked for it."""
    connection._ack_delay = hold


def ack_ranges(connection: QuicConnection) -> int:
    """Ranges of 1-RTT packet numbers received, not yet known acknowledged: a count changed by
    a datagram means a gap opened or filled (or, after a loss, an old one was let go)."""
    space = connection._spaces.get(tls.Epoch.ONE_RTT)
    return 0 if space is None else len(space.ack_queue)


def ack_due_now(connection: QuicConnection) -> None:
    """Make a held ACK (of 1-RTT packets) due now: the next transmit writes it."""
    space = connection._spaces.get(tls.Epoch.ONE_RTT)
    if space is not None and space.ack_at is not None:
        space.ack_at = 0.0


def pure_acks_unacknowledged(connection: QuicConnection) -> int:
    """Our 1-RTT packets that elicit no ACK and that no ACK has covered yet (point 11)."""
    space = connection._spaces.get(tls.Epoch.ONE_RTT)
    return 0 if space is None else len(space.sent_packets) - space.ack_eliciting_in_flight


def use_own_pacer(connection: QuicConnection) -> None:
    """Put the pacer the connection's congestion controller makes (``make_pacer()``, if it
    has that method) in place of aioquic's."""
    loss = connection._loss
    make = getattr(loss._cc, "make_pacer", None)
    if make is not None:
        loss._pacer = make()


_NO_OUTPUT = Buffer(capacity=0)  # never written: a server past its handshake writes nothing
_EPOCH_SETS: dict[frozenset[tls.Epoch], frozenset[tls.Epoch]] = {}


def release_handshake_buffers(connection: QuicConnection) -> None:
    """A server connection whose handshake is over: swap its three 16 KiB TLS output buffers
    for one shared buffer of no capacity (point 8 of the module note). No-op on a client, or
    on a server whose TLS context is not past its handshake."""
    context = getattr(connection, "tls", None)
    if context is None or context.state is not tls.State.SERVER_POST_HANDSHAKE:
        return
    buffers = connection._crypto_buffers
    if any(buffers[epoch].tell() for epoch in HANDSHAKE_EPOCHS):
        return  # unsent TLS output (never seen): leave it to aioquic
    for epoch in HANDSHAKE_EPOCHS:
        buffers[epoch] = _NO_OUTPUT
    if connection._quic_logger is None:
        # each key's setup and teardown callback is a partial of a bound method (12 a
        # connection) that only writes to a packet log; without one, none is needed
        for pair in connection._cryptos.values():
            for context in (pair.recv, pair.send):
                context._setup_cb = context._teardown_cb = NoCallback


def take_client_chain(
    connection: QuicConnection,
) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
    """``peer_certificates``, read once: a server connection past its handshake then forgets
    the chain (the leaf and intermediates, parsed; about 3.5 KB a connection), so later reads
    answer ``(None, [])``. A client keeps the chain it was shown."""
    leaf, chain = peer_certificates(connection)
    context = getattr(connection, "tls", None)
    if context is not None and context.state is tls.State.SERVER_POST_HANDSHAKE:
        context._peer_certificate = None
        context._peer_certificate_chain = []
    return leaf, chain


def _share_epoch_sets(connection: QuicConnection) -> None:
    """Point ``connection``'s frame-handler table at one shared frozenset per set of epochs
    (equal and immutable, so nothing reads them differently)."""
    handlers: dict[int, tuple[Any, frozenset[tls.Epoch]]] = getattr(connection, FRAME_HANDLERS)
    for frame_type, (handler, epochs) in handlers.items():
        handlers[frame_type] = (handler, _EPOCH_SETS.setdefault(epochs, epochs))


class MutualTlsServerConnection(QuicConnection):
    """A server connection whose TLS context requests a client certificate, presents the
    certificate ``choose_certificate`` picks for the client's server name, whose connection
    IDs carry reset tokens derived from them (``stateless_reset.py``), whose receive credit
    slides over the delivered bytes (``SlidingMaxData``) and whose frame-handler table shares
    its epoch sets with every other connection's."""

    def __init__(
        self,
        *args: Any,
        reset_tokens: ResetTokens | None = None,
        choose_certificate: CertificateChooser | None = None,
        **kwargs: Any,
    ) -> None:
        self._margo_choose_certificate = choose_certificate  # _initialize may run in __init__
        super().__init__(*args, **kwargs)
        self._margo_reset_tokens = reset_tokens
        self._derive_reset_tokens()  # before the transport parameters carry the first one
        bound_receive_credit(self)
        _share_epoch_sets(self)

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        self.tls._request_client_certificate = True
        if self._margo_choose_certificate is not None:
            _choose_by_server_name(self.tls, self._margo_choose_certificate)

    def _replenish_connection_ids(self) -> None:
        super()._replenish_connection_ids()
        self._derive_reset_tokens()  # before NEW_CONNECTION_ID frames carry them

    def _derive_reset_tokens(self) -> None:
        if self._margo_reset_tokens is not None:
            for cid in self._host_cids:
                cid.stateless_reset_token = self._margo_reset_tokens.token(cid.cid)


def host_reset_tokens(connection: QuicConnection) -> dict[bytes, bytes]:
    """Our connection IDs and the reset tokens they were issued with."""
    return {c.cid: c.stateless_reset_token for c in connection._host_cids}


def peer_reset_tokens(connection: QuicConnection) -> list[bytes]:
    """The reset tokens of the peer's connection IDs we use: the one we send with and any
    reserved for a path being probed. RFC 9000 10.3.1: an endpoint must not look for the
    tokens of connection IDs it has not used or has retired."""
    cids = [connection._peer_cid]
    cids += [p.peer_cid for p in connection._network_paths if p.peer_cid is not None]
    return [c.stateless_reset_token for c in cids if c.stateless_reset_token]


def receipt_mark(connection: QuicConnection) -> float | None:
    """A value that moves whenever aioquic takes a packet (decrypted and processed): its idle
    deadline, set anew by every such packet. Unchanged across a datagram means that possibly
    none of it was taken, when RFC 9000 10.3.1 requires the stateless-reset check (a datagram
    taken within the same tick of the clock leaves it unchanged too: a check not needed)."""
    return connection._close_at


def peer_certificates(
    connection: QuicConnection,
) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
    """The leaf and chain the peer presented (``None`` when it sent an empty Certificate)."""
    context = getattr(connection, "tls", None)
    if context is None:
        return None, []
    return context._peer_certificate, list(context._peer_certificate_chain)
