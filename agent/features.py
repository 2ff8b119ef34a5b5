"""The features that ride the channel, plugged into an agent."""

from __future__ import annotations

from agent import desired
from agent.service import Agent
from agent.telemetry import replay
from agent.terminal import stream as terminal


def install_features(agent: Agent) -> None:
    """Desired state + status, telemetry and terminals register their handlers here."""
    desired.install(agent)
    replay.install(agent)
    terminal.install(agent)
