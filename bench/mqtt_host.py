"""The MQTT side of the transport bench: the real controller with an MQTT bridge beside its store.

``python -m bench.mqtt_host`` takes ``margo-controller``'s options plus ``--broker-dir`` (where
the bench's ``MosquittoBroker`` wrote its configuration and the bridge's certificate) and
``--bridge-port``. It runs the same ``Controller`` (QUIC listener, operator API, store,
desired-state signing) and, in the same event loop, a ``bench.transports.mqtt.MqttBridge``
on the controller's own store, added as one more device transport
(``Controller.add_device_transport``) so the operator's apply reaches it through the
controller's ``DesiredChangeFanout`` exactly as it reaches the HTTP/2 push server. The broker is a separate process owned by the bench, so a controller restart (the
storm scenario) leaves devices connected to the broker, as an MQTT deployment would.

When the bridge is subscribed it writes ``<data>/mqtt-bridge.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anyio
import anyio.abc

from bench.transports.mqtt import MosquittoBroker, MqttBridge
from controller.cli import build_parser, config_from_args
from margo_stream.cli.common import run_service
from margo_stream.fsutil import atomic_write
from margo_stream.logs import setup_logging

PROG = "bench.mqtt_host"


def main(argv: list[str] | None = None) -> int:
    parser: argparse.ArgumentParser = build_parser()
    parser.prog = PROG
    parser.add_argument("--broker-dir", type=Path, required=True)
    parser.add_argument("--bridge-port", type=int, required=True)
    parser.add_argument("--tenant", action="append", default=[])
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    config = config_from_args(args)
    from controller.service import Controller

    controller = Controller(config)
    tenants = args.tenant or ["bench"]
    broker = MosquittoBroker(args.certs, args.broker_dir, tenants)  # started by the bench
    broker.bridge_port = args.bridge_port

    async def run() -> None:
        async with anyio.create_task_group() as tg:

            async def controller_then_stop(
                *, task_status: anyio.abc.TaskStatus[Controller]
            ) -> None:
                await controller.run(task_status=task_status)  # returns after its own shutdown
                tg.cancel_scope.cancel()

            await tg.start(controller_then_stop)
            bridge = MqttBridge(controller.store, broker, tenants)
            await tg.start(bridge.run)
            controller.add_device_transport("mqtt", args.bridge_port, bridge)
            atomic_write(
                config.data / "mqtt-bridge.json",
                json.dumps({"bridge_port": args.bridge_port}).encode(),
            )

    return run_service(PROG, run, controller.shutdown)


if __name__ == "__main__":
    raise SystemExit(main())
