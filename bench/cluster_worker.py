"""A worker process of ``margo-bench cluster``: the transport bench's QUIC devices
(:mod:`bench.fleet_worker`: real ``AgentSession``, real desired-state verification, status
reports) given a list of controllers, as ``margo-agent --controller A,B`` is.

Each device walks the list with the agent's own sans-IO core
(``agent.controller_list.ControllerOrder`` and ``agent.backoff.Backoff``): a lost connection
goes to the next controller at once, back-off only after a whole failed pass. The only thing
the bench chooses is where each device starts: ``home`` ``first`` (every device's shuffled
order begins with the first controller: the fleet is on it before a failover) or ``spread``
(device ``i`` begins with controller ``i mod n``: an even split). The order is drawn from the
agent's own ``order_rng(device, seed)``, trying seeds until it begins there.

Besides the fleet worker's events it emits ``conn`` (batched: ``[device, controller index,
monotonic time, "up" | "down"]``) whenever a device's session is answered or ends.
"""

from __future__ import annotations

import time
from typing import Any

import anyio

from agent.backoff import Backoff
from agent.controller_list import ControllerOrder, Dial, Target, Wait, order_rng, parse_controllers
from bench.fleet_worker import CARRIED, FLUSH, Device, Worker, _emit, main
from bench.transports.quic import QuicClient


def home_order(device: str, controllers: str, home: int) -> ControllerOrder:
    """The agent's order for ``device`` over ``controllers``, drawn with the first seed whose
    shuffle begins with entry ``home``."""
    entries = parse_controllers(controllers)
    for seed in range(1000):
        order = ControllerOrder(entries, order_rng(device, str(seed)), Backoff(base=0.5, cap=8.0))
        if order.entries[0] == entries[home]:
            return order
    raise RuntimeError(f"no order of {controllers!r} begins with entry {home}")


class ClusterWorker(Worker):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.controllers: str = cfg["controllers"]  # "HOST:PORT,HOST:PORT"
        self.index_of = {str(e): i for i, e in enumerate(parse_controllers(self.controllers))}
        self.home: str = cfg.get("home", "first")
        self.conns: list[list[Any]] = []

    def _home(self, dev: Device) -> int:
        return dev.index % len(self.index_of) if self.home == "spread" else 0

    def _client(self, dev: Device, target: Target) -> QuicClient:
        return QuicClient(
            dev.identity,
            target.address,
            target.port,
            state_dir=self.state_root / dev.name,
            idle_timeout=float(self.cfg.get("idle_timeout", 60.0)),
        )

    async def run_device(self, dev: Device, jitter: float) -> None:
        order = home_order(dev.name, self.controllers, self._home(dev))
        await anyio.sleep(jitter)
        while not self.stopping:
            action = order.next_action()
            if isinstance(action, Wait):
                await anyio.sleep(action.delay)
                continue
            assert isinstance(action, Dial)
            target = action.target
            where = self.index_of[str(target.entry)]
            client = self._client(dev, target)
            if dev.client is not None:
                for attr in CARRIED:
                    if hasattr(dev.client, attr):
                        setattr(client, attr, getattr(dev.client, attr))
                self._retire(dev.client)
            dev.client = client
            up = 0.0
            try:
                async with self.connect_sem:
                    await client.connect()
                up = time.monotonic()
                order.ready(target)
                dev.connects += 1
                if dev.connected_at is None:
                    dev.connected_at = up
                self.conns.append([dev.index, where, up, "up"])
                await self.serve(dev, client)
            except Exception as exc:  # noqa: BLE001 - counted, then the next controller
                dev.errors += 1
                if len(self.failures) < 50:
                    self.failures.append(f"{type(exc).__name__}: {exc}"[:200])
            finally:
                await client.close()
            if self.stopping:
                return
            if up:
                now = time.monotonic()
                self.conns.append([dev.index, where, now, "down"])
                order.lost(target, now - up)
            else:
                order.failed(target)

    async def _flush_got(self) -> None:
        while True:
            await anyio.sleep(FLUSH)
            if self.got:
                batch, self.got = self.got, []
                _emit("got", items=batch)
            if self.conns:
                batch, self.conns = self.conns, []
                _emit("conn", items=batch)


if __name__ == "__main__":
    raise SystemExit(main(ClusterWorker))
