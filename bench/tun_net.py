"""A private network namespace joined to the root namespace by a pair of TUN devices.

Theory of operation
-------------------
:meth:`TunPair.create` takes a free *slot* ``k`` (an exclusive ``flock`` on a lock file, so
concurrent relays never share one; the lock dies with the process), creates the namespace
``margo-tun-<k>`` (a stale one left by a killed process is deleted first), opens two TUN
devices (``/dev/net/tun``, ``TUNSETIFF`` with ``IFF_TUN | IFF_NO_PI``: whole IP packets, no
header) and keeps both file descriptors. One device stays in the root namespace, the other is
moved into the namespace; the two are addressed as a point-to-point /30 out of 10.199.0.0/16
(slot ``k`` owns ``10.199.0.0 + 4k``: ``.1`` in the namespace, ``.2`` in the root namespace),
both with MTU 1500 and IPv6 off (no router solicitations on the link), and the namespace's
``lo`` is brought up.

The kernel routes a packet for the namespace's address out of the root-side device, so it
appears on that device's file descriptor; whoever owns the descriptors (the impaired link,
:mod:`bench.relay_tun`) writes it to the other descriptor and the namespace's kernel receives
it, and the same way back. The devices are not persistent: closing the descriptors removes
them. :meth:`TunPair.close` closes both, deletes the namespace and releases the slot.

:meth:`TunPair.inside` runs a block with the calling thread in the namespace (``setns`` is per
thread): a socket created there belongs to the namespace for its whole life, wherever it is
used afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TunPair", "TunError", "unavailable_reason"]

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
NETNS_DIR = Path("/run/netns")
LOCK_DIR = Path("/run/margo-tun")
NETWORK = ipaddress.IPv4Network("10.199.0.0/16")
SLOTS = NETWORK.num_addresses // 4
MTU = 1500


class TunError(OSError):
    """The namespace or a TUN device could not be set up."""


def unavailable_reason() -> str | None:
    """Why a :class:`TunPair` cannot be made on this machine, or ``None`` if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN devices)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    return None


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise TunError(err, f"setns: {os.strerror(err)}")


def _ip(*args: str, stdin: str | None = None) -> None:
    done = subprocess.run(
        ["ip", *args], input=stdin, capture_output=True, text=True, check=False, timeout=30
    )
    if done.returncode != 0:
        raise TunError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        os.set_blocking(fd, False)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _disable_ipv6(device: str) -> None:
    # /proc/sys/net follows the calling thread's namespace.
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{device}/disable_ipv6").write_text("1")


def _take_slot() -> tuple[int, int]:
    LOCK_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    start = os.getpid() % SLOTS  # spread concurrent relays, then probe upwards
    for i in range(SLOTS):
        slot = (start + i) % SLOTS
        fd = os.open(LOCK_DIR / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return slot, fd
    raise TunError("no free 10.199.0.0/16 slot")


@dataclass
class TunPair:
    """Two TUN devices, one in a private namespace, and the namespace; see the module doc."""

    slot: int
    namespace: str
    root_device: str
    ns_device: str
    root_addr: str
    ns_addr: str
    root_fd: int = -1
    ns_fd: int = -1
    _lock_fd: int = -1
    _ns_created: bool = False

    @classmethod
    def create(cls) -> TunPair:
        reason = unavailable_reason()
        if reason is not None:
            raise TunError(reason)
        slot, lock_fd = _take_slot()
        base = NETWORK.network_address + 4 * slot
        pair = cls(
            slot=slot,
            namespace=f"margo-tun-{slot}",
            root_device=f"mgt{slot}r",
            ns_device=f"mgt{slot}n",
            root_addr=str(base + 2),
            ns_addr=str(base + 1),
            _lock_fd=lock_fd,
        )
        try:
            pair._setup()
        except BaseException:
            pair.close()
            raise
        return pair

    def _setup(self) -> None:
        ns = self.namespace
        if (NETNS_DIR / ns).exists():  # left by a process that was killed: we hold its slot
            _ip("netns", "delete", ns)
        _ip("netns", "add", ns)
        self._ns_created = True
        self.root_fd = _open_tun(self.root_device)
        self.ns_fd = _open_tun(self.ns_device)
        _disable_ipv6(self.root_device)
        _ip(
            "-batch",
            "-",
            stdin=(
                f"link set {self.ns_device} netns {ns}\n"
                f"addr add {self.root_addr}/30 dev {self.root_device}\n"
                f"link set {self.root_device} mtu {MTU} up\n"
            ),
        )
        with self.inside():
            _disable_ipv6(self.ns_device)
        _ip(
            "-n",
            ns,
            "-batch",
            "-",
            stdin=(
                "link set lo up\n"
                f"addr add {self.ns_addr}/30 dev {self.ns_device}\n"
                f"link set {self.ns_device} mtu {MTU} up\n"
            ),
        )

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """Run the block with the calling thread in the namespace (sockets made there stay)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(NETNS_DIR / self.namespace, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(home)

    def close(self) -> None:
        """Remove both devices and the namespace, release the slot (idempotent)."""
        for name in ("root_fd", "ns_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self._ns_created:
            self._ns_created = False
            with contextlib.suppress(TunError, subprocess.TimeoutExpired):
                _ip("netns", "delete", self.namespace)
        if self._lock_fd >= 0:
            fd, self._lock_fd = self._lock_fd, -1
            os.close(fd)

    def exists(self) -> bool:
        """Whether the namespace or either device is still there (for tests)."""
        if (NETNS_DIR / self.namespace).exists():
            return True
        return any(Path(f"/sys/class/net/{d}").exists() for d in (self.root_device, self.ns_device))
