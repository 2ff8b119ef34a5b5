"""The agent's resolver edge: the addresses of the controller names, for one pass.

Each name of ``--controller`` is looked up again before every pass (``agent.controller_list``
decides when), all of them at once and within one time bound: a name that fails or does not
answer in time is logged and has no address this pass; the pass goes on with the others.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio

from agent.controller_list import ControllerEntry

log = logging.getLogger("margo.agent")


@dataclass(slots=True)
class Resolution:
    addresses: dict[ControllerEntry, list[str]] = field(default_factory=dict)
    errors: dict[ControllerEntry, str] = field(default_factory=dict)


async def resolve_entries(entries: Sequence[ControllerEntry], timeout: float) -> Resolution:
    """Every address (A and AAAA) of each entry's name, looked up concurrently for at most
    ``timeout`` seconds in all."""
    out = Resolution()
    loop = asyncio.get_running_loop()

    async def one(entry: ControllerEntry) -> None:
        try:
            infos = await loop.getaddrinfo(entry.host, entry.port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            out.errors[entry] = exc.strerror or str(exc)
            return
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if addresses:
            out.addresses[entry] = addresses
        else:
            out.errors[entry] = "no address"

    with anyio.move_on_after(timeout):
        async with anyio.create_task_group() as tg:
            for entry in entries:
                tg.start_soon(one, entry)
    for entry in entries:
        if entry not in out.addresses and entry not in out.errors:
            out.errors[entry] = f"no answer within {timeout:g} s"
    for entry, reason in out.errors.items():
        log.warning(
            "cannot resolve controller %s: %s",
            entry,
            reason,
            extra={"event": "controller-unresolved", "controller": str(entry), "reason": reason},
        )
    return out
