"""The features that ride the channel, plugged into a controller."""

from __future__ import annotations

from controller import desired, status, telemetry, terminal
from controller.service import Controller


def install_features(controller: Controller) -> None:
    """Desired state, status, telemetry and terminals register their handlers and hooks here."""
    desired.install(controller)
    status.install(controller)
    telemetry.install(controller)
    terminal.install(controller)
