"""Assembly: the agent's identity, its features and the ``Agent`` that runs them, built once.

Every feature is handed the one ``agent.ports.AgentSetup`` (an ``AgentHost``) and plugs its
stream handlers, session and background tasks, hello fields and shutdown hooks into it; the
``Agent`` is then given the same setup. Nothing looks a feature up by name afterwards.
"""

from __future__ import annotations

from agent import desired, metrics_http
from agent.config import AgentConfig
from agent.logs import feature as logs
from agent.ports import AgentSetup
from agent.service import Agent
from agent.telemetry import replay
from agent.terminal import feature as terminal
from margo_stream.errors import ConfigError, IdentityError
from margo_stream.identity.trust import load_device_credentials


def load_setup(config: AgentConfig) -> AgentSetup:
    """The device's identity, checked (``ConfigError`` if it is unusable), and no features yet."""
    try:
        creds = load_device_credentials(config.identity)
    except IdentityError as exc:
        raise ConfigError(str(exc)) from None
    return AgentSetup(config, creds)


def install_features(setup: AgentSetup) -> replay.TelemetryFeature:
    """Desired state + status, telemetry and terminals plug into ``setup`` here."""
    state = desired.install(setup)
    telemetry = replay.install(setup)
    terminal.install(setup, trust=state.verifier)  # grants are checked against its root
    logs.install(setup, state.reconciler)  # the components' logs, for the controller's asks
    return telemetry


def build_agent(config: AgentConfig) -> Agent:
    setup = load_setup(config)
    telemetry = install_features(setup)
    agent = Agent(setup)
    metrics_http.install(setup, agent, telemetry)  # --metrics: reads both
    return agent
