"""The controller's UDP socket gets the buffers it asks for, or a warning naming the sysctl."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from margo_stream.transport.udp_buffers import size_buffers


def rmem_max() -> int:
    return int(Path("/proc/sys/net/core/rmem_max").read_text())


def test_a_size_under_the_cap_is_granted() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        granted = size_buffers(sock, 128 << 10)
    assert granted["receive"] >= 128 << 10 and granted["send"] >= 128 << 10


@pytest.mark.skipif(not Path("/proc/sys/net/core/rmem_max").exists(), reason="Linux only")
def test_past_the_cap_root_forces_it_and_others_are_told_the_sysctl(caplog) -> None:
    wanted = rmem_max() * 4
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
        caplog.at_level(logging.WARNING, logger="margo.quic.server"),
    ):
        granted = size_buffers(sock, wanted)
    if os.geteuid() == 0:  # CAP_NET_ADMIN: SO_RCVBUFFORCE
        assert granted["receive"] >= wanted and not caplog.records
    else:
        assert granted["receive"] < wanted
        assert "net.core.rmem_max" in caplog.text
