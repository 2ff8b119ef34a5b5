"""The bare-aioquic reference for ``margo-bench connect``: what plain aioquic does on this
machine, so our handshake rate has something to be compared with.

The server is aioquic's own ``aioquic.asyncio.server.QuicServer`` with
``QuicConnectionProtocol`` connections: server-only TLS (no client certificate), no streams,
no session tickets, the same P-256 server certificate and the same transport parameters as
the controller (datagram size, idle timeout, socket buffers), on uvloop. The client is
aioquic's ``QuicConnectionProtocol`` over one UDP socket per connection bound to loopback, as
our agents do; it verifies the server's chain like our agents do.

Run as a process: ``python -m bench.bare_quic --cert C --key K`` prints one JSON line
``{"port": P, "pid": PID}`` once listening, and serves until stdin closes or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from bench.report_util import raise_nofile_limit
from margo_stream.gcpolicy import run_gc_policy
from margo_stream.transport.udp_buffers import size_buffers

BARE_ALPN = "margo-bench-bare"
DATAGRAM_SIZE = 1350  # what server_configuration/client_configuration use


def server_config(cert: str, key: str, *, idle_timeout: float = 60.0) -> QuicConfiguration:
    configuration = QuicConfiguration(
        is_client=False,
        alpn_protocols=[BARE_ALPN],
        idle_timeout=idle_timeout,
        max_datagram_size=DATAGRAM_SIZE,
    )
    configuration.load_cert_chain(cert, key)
    return configuration


def client_config(
    cafile: str, *, server_name: str, idle_timeout: float = 60.0
) -> QuicConfiguration:
    configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=[BARE_ALPN],
        idle_timeout=idle_timeout,
        server_name=server_name,
        max_datagram_size=DATAGRAM_SIZE,
    )
    configuration.load_verify_locations(cafile=cafile)
    return configuration


class BareClient(QuicConnectionProtocol):
    """A plain aioquic client connection that remembers whether it was terminated."""

    terminated = False

    def quic_event_received(self, event: qe.QuicEvent) -> None:
        if isinstance(event, qe.ConnectionTerminated):
            self.terminated = True


async def open_client(
    host: str, port: int, configuration: QuicConfiguration
) -> tuple[asyncio.DatagramTransport, BareClient]:
    """Start a handshake; the caller awaits ``protocol.wait_connected()``."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: BareClient(QuicConnection(configuration=configuration)), local_addr=(host, 0)
    )
    protocol.connect((host, port))
    return transport, protocol


async def serve(host: str, cert: str, key: str, idle_timeout: float) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    size_buffers(sock)  # what the controller's listener asks for
    sock.bind((host, 0))
    configuration = server_config(cert, key, idle_timeout=idle_timeout)
    transport, _ = await loop.create_datagram_endpoint(
        lambda: QuicServer(configuration=configuration, create_protocol=QuicConnectionProtocol),
        sock=sock,
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def stdin_closed() -> None:
        while await reader.readline():
            pass
        stop.set()

    watcher = asyncio.ensure_future(stdin_closed())
    # the same collector policy as the controller's, so the comparison is the protocols' alone
    gc_task = asyncio.ensure_future(run_gc_policy())
    print(json.dumps({"port": sock.getsockname()[1], "pid": os.getpid()}), flush=True)
    await stop.wait()
    watcher.cancel()
    gc_task.cancel()
    transport.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.bare_quic",
        description="Plain aioquic server (the reference for margo-bench connect).",
    )
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--idle-timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    raise_nofile_limit()
    import uvloop

    uvloop.run(serve(args.host, args.cert, args.key, args.idle_timeout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
