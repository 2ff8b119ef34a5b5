"""Socket buffers for the controller's one UDP socket.

Every device's packets arrive on that one socket. When 10,000 devices answer a fleet-wide push
together, thousands of datagrams queue while the event loop is busy sending, and whatever does
not fit the receive buffer is dropped by the kernel and retransmitted by QUIC a timeout later
(measured: 12,900-15,800 datagrams dropped during one 10,000-device fan-out with the 8 MiB the
kernel's default ``net.core.rmem_max`` allows). A small datagram costs the buffer 1-2 KiB, so
the controller asks for 64 MiB each way; ``SO_RCVBUF`` is capped by ``net.core.rmem_max``, so
where the process may (CAP_NET_ADMIN) it sets the size past the cap (``SO_RCVBUFFORCE``), and
where it may not it says which sysctl to raise.
"""

from __future__ import annotations

import logging
import platform
import socket
import sys

log = logging.getLogger("margo.quic.server")

WANTED = 64 << 20
# Python does not export these; the values are Linux's generic ones (x86, arm, riscv)
_LINUX = sys.platform == "linux" and platform.machine() in (
    "x86_64",
    "i686",
    "aarch64",
    "armv7l",
    "riscv64",
)
_FORCE = {
    socket.SO_RCVBUF: getattr(socket, "SO_RCVBUFFORCE", 33 if _LINUX else None),
    socket.SO_SNDBUF: getattr(socket, "SO_SNDBUFFORCE", 32 if _LINUX else None),
}
_SYSCTL = {socket.SO_RCVBUF: "net.core.rmem_max", socket.SO_SNDBUF: "net.core.wmem_max"}


def size_buffers(sock: socket.socket, wanted: int = WANTED) -> dict[str, int]:
    """Ask for ``wanted`` bytes of receive and send buffer; returns what the kernel granted
    (Linux reports twice the requested size: half of it is bookkeeping)."""
    granted = {}
    for option, name in ((socket.SO_RCVBUF, "receive"), (socket.SO_SNDBUF, "send")):
        sock.setsockopt(socket.SOL_SOCKET, option, wanted)
        size = sock.getsockopt(socket.SOL_SOCKET, option)
        force = _FORCE[option]
        if size < wanted and force is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, wanted)
                size = sock.getsockopt(socket.SOL_SOCKET, option)
            except PermissionError:
                pass
        if size < wanted:
            log.warning(
                "UDP %s buffer is %d KiB, not the %d KiB asked for: raise %s (bursts "
                "from many devices at once are dropped and retransmitted)",
                name,
                size >> 10,
                wanted >> 10,
                _SYSCTL[option],
                extra={"buffer": name, "granted": size, "wanted": wanted},
            )
        granted[name] = size
    return granted


__all__ = ["WANTED", "size_buffers"]
