"""The features that ride the channel, built once at start-up from what they depend on.

``build_features`` makes desired state, status, telemetry, terminals and the rollout driver,
each from the store, the session registry and a task spawner, and returns them with the
``SessionHooks`` every device session consults: which feature handles which stream kind, and
who hears of a device that finished its hello or went away.
"""

from __future__ import annotations

from dataclasses import dataclass

from controller.config import ControllerConfig
from controller.desired import DesiredConfig, DesiredState
from controller.document_cache import DocumentCache
from controller.ports import SessionHooks, TaskSpawner
from controller.registry import SessionRegistry
from controller.rollouts.driver import RolloutDriver
from controller.root_chains import RootChains
from controller.status import StatusIngest
from controller.store.base import Store
from controller.telemetry import TelemetryIngest
from controller.terminal import TerminalService
from margo_stream.protocol.codes import StreamKind


@dataclass(frozen=True, slots=True)
class Features:
    hooks: SessionHooks
    documents: DocumentCache
    roots: RootChains
    desired: DesiredState
    status: StatusIngest
    telemetry: TelemetryIngest
    terminals: TerminalService
    rollouts: RolloutDriver  # run by the controller with its DesiredChanges


def build_features(
    config: ControllerConfig, store: Store, registry: SessionRegistry, tasks: TaskSpawner
) -> Features:
    documents = DocumentCache()
    roots = RootChains(config.certs)
    desired = DesiredState(
        DesiredConfig(
            certs=config.certs,
            manifest_lifetime_days=config.manifest_lifetime_days,
            push_window=config.push_window,
        ),
        store,
        registry,
        tasks,
        documents,
        roots,
    )
    status = StatusIngest(store, tasks)
    telemetry = TelemetryIngest(store, tasks)
    hooks = SessionHooks(
        stream_handlers={
            StreamKind.STATUS: status.handle,
            StreamKind.TELEMETRY: telemetry.handle,
        },
        ready=[desired.on_ready],
        closed=[desired.on_close],
    )
    return Features(
        hooks=hooks,
        documents=documents,
        roots=roots,
        desired=desired,
        status=status,
        telemetry=telemetry,
        terminals=TerminalService(store, registry),
        rollouts=RolloutDriver(store, registry.instance_id or "controller", documents=documents),
    )
