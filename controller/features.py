"""The features that ride the channel, plugged into a controller."""

from __future__ import annotations

from controller.service import Controller


def install_features(controller: Controller) -> None:
    """Desired state, telemetry and terminals register their stream handlers and hooks here."""
